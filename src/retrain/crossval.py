"""Cross-validation of the head recipe on cached features: how far its validation accuracy
moves with the images it happens to be trained and checked on.

The `head.*` recipe (the same `build_head` and `train_head` as the `train_head` stage) is
trained on stratified folds of train+val, repeated with reshuffled folds; the test split is
never read. Byte-identical images share a fold, as they share a split.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import RepeatedStratifiedKFold

from retrain.errors import DataError

SCORES = ("val_accuracy", "macro_f1")


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
    per_fold = [score_fold(features, labels, train, val, classes, head, seed + index)
                for index, (train, val)
                in enumerate(fold_indices(labels, digests, folds, repeats, seed))]
    return summarise(per_fold, folds, repeats, seed)


def score_fold(features: np.ndarray, labels: np.ndarray, train: np.ndarray, val: np.ndarray,
               classes: int, head: dict, seed: int) -> dict[str, float]:
    """A fresh head, seeded on its own (so each fold reproduces alone), trained on `train`
    rows as the train_head stage trains, scored on `val` rows."""
    import keras

    from retrain.head import build_head, train_head
    from retrain.reproducibility import make_deterministic
    from retrain.training import balanced_class_weights

    keras.backend.clear_session()  # one fold's graphs do not slow the next
    make_deterministic(seed)
    model = build_head(features.shape[1], classes, head["dropout"], seed)
    weights = balanced_class_weights(labels[train], classes) if head["class_weights"] else None
    # Early stopping watches the held-out fold, as train_head watches val (so its score is
    # as optimistic as metrics/head.json's); without it, per-epoch scores are skipped.
    watched = (features[val], labels[val]) if head["early_stopping_patience"] else None
    train_head(model, (features[train], labels[train]), watched,
               learning_rate=head["learning_rate"], epochs=head["epochs"],
               batch_size=head["batch_size"], class_weight=weights,
               patience=head["early_stopping_patience"], verbose=0)
    probabilities = keras.ops.convert_to_numpy(model(features[val], training=False))
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
