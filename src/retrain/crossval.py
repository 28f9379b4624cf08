"""Cross-validation of the head recipe on cached features: how far its validation accuracy
moves with the images it happens to be trained and checked on.

The `head.*` recipe (the same `build_head` and `train_head` as the `train_head` stage) is
trained on stratified folds of train+val, repeated with reshuffled folds; the test split is
never read. Byte-identical images share a fold, as they share a split. With early stopping
(`head.early_stopping_patience`), a fold's head stops on a stratified fifth of its own
training rows, never on the rows it is scored on: its score is not chosen on them.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import RepeatedStratifiedKFold

from retrain.errors import DataError

SCORES = ("val_accuracy", "macro_f1")
# With early stopping, one part in EARLY_STOPPING_PARTS of a fold's training rows is held
# out for it to watch (a fifth, as the val split is a fifth of the data for train_head).
EARLY_STOPPING_PARTS = 5
# Batches per call of the traced train step: a whole epoch of a fold in one call rather than
# one Python round trip per batch (the same batches, in the same order, the same updates).
STEPS_PER_EXECUTION = 10_000


def fold_indices(labels: np.ndarray, digests: np.ndarray, folds: int, repeats: int,
                 seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, validation rows) for each fold of each repeat.

    The folds are drawn over distinct images (one per sha256) and expanded to every row
    holding that image, so no image is on both sides of a fold.
    """
    unique, first, group_of_row = np.unique(digests, return_index=True, return_inverse=True)
    group_labels = labels[first]
    splitter = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    try:
        with warnings.catch_warnings():
            # A class with fewer images than folds misses some validation folds: scikit-learn
            # warns, the figures stay meaningful (macro F1 counts the classes present).
            warnings.simplefilter("ignore", UserWarning)
            group_folds = list(splitter.split(np.zeros(len(unique)), group_labels))
    except ValueError:  # more folds than images in every class
        raise DataError(f"crossval.folds={folds} is more than the distinct images of every "
                        f"class in train+val (largest: {np.bincount(group_labels).max()}); "
                        "lower it, or 0 turns cross-validation off") from None
    return [(np.flatnonzero(np.isin(group_of_row, train)),
             np.flatnonzero(np.isin(group_of_row, val))) for train, val in group_folds]


def fold_scores(true: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Accuracy and macro F1 over the classes present in the fold (a class absent from it
    would add an F1 of 0 that says nothing about the model)."""
    present = np.unique(true)
    return {"val_accuracy": float(accuracy_score(true, predicted)),
            "macro_f1": float(f1_score(true, predicted, labels=present, average="macro",
                                       zero_division=0))}


def cross_validate_head(features: np.ndarray, labels: np.ndarray, digests: np.ndarray,
                        classes: int, head: dict, *, folds: int, repeats: int,
                        seed: int) -> dict:
    """Train the head recipe on every fold; the mean and sample sd of its fold scores."""
    splits = fold_indices(labels, digests, folds, repeats, seed)
    reused = ReusedHead(features.shape[1], classes, head)
    per_fold = []
    for index, (train, val) in enumerate(splits):
        fit, watched = (early_stopping_split(train, labels, digests, seed + index)
                        if head["early_stopping_patience"] else (train, None))
        per_fold.append(score_fold(reused, features, labels, fit, val, seed + index, watched))
    return {**summarise(per_fold, folds, repeats, seed),
            "folds_digest": folds_digest(splits, digests)}


def folds_digest(splits: list[tuple[np.ndarray, np.ndarray]], digests: np.ndarray) -> str:
    """One sha256 of which images each fold validated on, in fold order: two runs with the
    same digest ran the same folds, so `report` pairs their scores fold by fold. Another
    seed, or any change to the images or their labels (the folds are stratified), gives
    another digest."""
    import hashlib

    hashed = hashlib.sha256()
    for _, val in splits:
        hashed.update(",".join(sorted(digests[val])).encode() + b";")
    return hashed.hexdigest()


def early_stopping_split(train: np.ndarray, labels: np.ndarray, digests: np.ndarray,
                         seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows to fit, rows early stopping watches): a fold's training rows split in
    EARLY_STOPPING_PARTS stratified parts over distinct images, one part watched."""
    try:
        fit, watched = fold_indices(labels[train], digests[train], EARLY_STOPPING_PARTS, 1,
                                    seed)[0]
    except DataError:
        raise DataError(f"head.early_stopping_patience: crossval's training folds have fewer "
                        f"than {EARLY_STOPPING_PARTS} distinct images in every class, too few "
                        "to hold some out for early stopping; lower crossval.folds or set "
                        "the patience to 0") from None
    return train[fit], train[watched]


class ReusedHead:
    """One head built and compiled once, restarted from a fold's own seeded initialisation
    before each fold: Keras set-up (building, tracing the train step) costs more than a
    fold's arithmetic, so it is paid once, while every fold trains as a fresh head would."""

    def __init__(self, feature_size: int, classes: int, head: dict) -> None:
        import keras

        from retrain.head import build_head, compile_classifier

        keras.backend.clear_session()  # earlier graphs do not slow these folds
        self.shape = (feature_size, classes, head["dropout"])
        self.recipe = head
        self.model = build_head(*self.shape, seed=0)
        compile_classifier(self.model, head["learning_rate"],
                           steps_per_execution=STEPS_PER_EXECUTION)
        self.fresh_optimizer = [v.numpy() for v in self.model.optimizer.variables]

    def restart(self, seed: int) -> None:
        """Seed everything, then set the weights and the dropout's seed generator to those
        of a head built with `seed`, and the optimizer to its untrained state (step 0, no
        moments)."""
        from retrain.head import build_head
        from retrain.reproducibility import make_deterministic

        make_deterministic(seed)
        fresh = build_head(*self.shape, seed=seed)
        for variable, value in zip(self.model.variables, fresh.variables, strict=True):
            variable.assign(value)
        for variable, value in zip(self.model.optimizer.variables, self.fresh_optimizer,
                                   strict=True):
            variable.assign(value)


def score_fold(head: ReusedHead, features: np.ndarray, labels: np.ndarray, train: np.ndarray,
               val: np.ndarray, seed: int, watched: np.ndarray | None = None
               ) -> dict[str, float]:
    """The head restarted as a fresh head seeded on its own (so each fold reproduces alone),
    trained on `train` rows as the train_head stage trains, scored on `val` rows. Early
    stopping (the recipe's patience) watches the `watched` rows (`early_stopping_split`)."""
    import keras

    from retrain.head import train_head
    from retrain.training import balanced_class_weights

    recipe, classes = head.recipe, head.shape[1]
    head.restart(seed)
    weights = balanced_class_weights(labels[train], classes) if recipe["class_weights"] else None
    patience = recipe["early_stopping_patience"]
    if patience and watched is None:
        raise ValueError("early stopping needs the rows it watches")
    # Without early stopping, per-epoch validation scores are skipped.
    watched_data = (features[watched], labels[watched]) if patience else None
    train_head(head.model, (features[train], labels[train]), watched_data,
               learning_rate=recipe["learning_rate"], epochs=recipe["epochs"],
               batch_size=recipe["batch_size"], class_weight=weights,
               patience=recipe["early_stopping_patience"], verbose=0, compile=False)
    probabilities = keras.ops.convert_to_numpy(head.model(features[val], training=False))
    return fold_scores(labels[val], probabilities.argmax(axis=1))


def summarise(per_fold: list[dict[str, float]], folds: int, repeats: int, seed: int) -> dict:
    summary = {"enabled": True, "folds": folds, "repeats": repeats, "seed": seed}
    for name in SCORES:
        values = np.array([fold[name] for fold in per_fold])
        summary[f"{name}_mean"] = round(float(values.mean()), 6)
        summary[f"{name}_sd"] = round(float(values.std(ddof=1)), 6)
    summary["per_fold"] = {name: [round(fold[name], 6) for fold in per_fold]
                           for name in SCORES}
    return summary
