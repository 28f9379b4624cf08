"""Test-split metrics for the head (on cached features) and the fine-tuned model (on images).

Accuracy alone misleads on imbalanced classes, so macro F1, balanced accuracy and
per-class precision/recall/F1 (scikit-learn) are reported next to it; the three headline
metrics each carry a 95% bootstrap interval over the test images (retrain.uncertainty).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support, recall_score

from retrain.uncertainty import format_interval, metric_interval, metric_intervals

FIT_SPLITS = ("train", "val")

# Keras clips probabilities to [eps, 1 - eps] in its cross-entropy; do the same so the
# loss here matches `model.evaluate`.
EPSILON = 1e-7


def cross_entropy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    picked = np.clip(probabilities[np.arange(len(labels)), labels], EPSILON, 1 - EPSILON)
    return float(-np.mean(np.log(picked)))


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray,
                           classes: list[str]) -> dict:
    """Point estimates, their 95% bootstrap intervals over the test images, and per-class
    figures keyed by class name.

    Per-class figures come from `precision_recall_fscore_support` (arrays, not
    `classification_report`'s dict, where a class named `accuracy` or `macro avg` would
    collide with the summary rows). Macro F1 and balanced accuracy average over the classes
    that have test images: a class without any has no recall, and counting it as 0 would
    pull the average down for a split's accident, not the model's.
    """
    predicted = probabilities.argmax(axis=1)
    intervals = metric_intervals(labels, predicted)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=list(range(len(classes))), zero_division=0)
    return {
        **point_metrics(probabilities, labels),
        **intervals,
        **interval_bounds(intervals),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]),
                   "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(classes)
        },
    }


def point_metrics(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Loss, accuracy, macro F1 and balanced accuracy (the macro averages over the classes
    present, see `classification_metrics`)."""
    predicted = probabilities.argmax(axis=1)
    present = np.unique(labels)
    return {
        "test_loss": cross_entropy(probabilities, labels),
        "test_accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, labels=present, average="macro",
                                   zero_division=0)),
        "balanced_accuracy": float(recall_score(labels, predicted, labels=present,
                                                average="macro", zero_division=0)),
    }


def replicate_figures(probabilities: list[np.ndarray], labels: np.ndarray,
                      seeds: list[int]) -> dict:
    """Each fine-tuning replicate's test figures, and their mean and sample sd over the
    replicates: the training noise on these test images (sd None for one replicate)."""
    rows = [{"replicate": index, "seed": seed, **point_metrics(p, labels)}
            for index, (seed, p) in enumerate(zip(seeds, probabilities, strict=True))]
    summary: dict = {"count": len(rows)}
    for name in ("test_loss", "test_accuracy", "macro_f1", "balanced_accuracy"):
        values = np.array([row[name] for row in rows])
        summary[f"{name}_mean"] = float(values.mean())
        summary[f"{name}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else None
    return {**summary, "per_replicate": rows}


def leaked_test_images(near_duplicates: pd.DataFrame) -> set[str]:
    """Test images with a near-duplicate in train or val (the audit's groups: columns group,
    path, split): a model can score them by having seen their twin."""
    fit_side = near_duplicates.loc[near_duplicates["split"].isin(FIT_SPLITS), "group"]
    test = near_duplicates[near_duplicates["split"] == "test"]
    return set(test.loc[test["group"].isin(set(fit_side)), "path"])


def leak_free_accuracy(probabilities: np.ndarray, labels: np.ndarray, paths: pd.Series,
                       leaked: set[str]) -> dict:
    """Test accuracy without the leaked test images, with its 95% bootstrap interval, and
    how many images it is taken over (None where every test image leaked)."""
    clean = ~paths.isin(leaked).to_numpy()
    predicted = probabilities.argmax(axis=1)[clean]
    kept = labels[clean]
    accuracy = float(accuracy_score(kept, predicted)) if clean.any() else None
    interval = metric_interval("test_accuracy", kept, predicted) if clean.any() else None
    return {"leak_free_test_accuracy": accuracy,
            "leak_free_test_accuracy_ci95": interval,
            "leak_free_test_images": int(clean.sum())}


def interval_bounds(intervals: dict[str, list[float] | None]) -> dict[str, float]:
    """Each `<metric>_ci95` as two plain numbers, `<metric>_ci95_low` and `_high`:
    `dvc exp show` and `dvc metrics show` display numbers but skip lists, and a run's
    interval belongs next to its metric there too."""
    return {f"{key}_{side}": bound for key, interval in intervals.items()
            if interval is not None for side, bound in zip(("low", "high"), interval)}


def summary_lines(results: dict[str, dict], n_images: int) -> list[str]:
    """The stage's printout: each model's metrics with their intervals, and what those mean."""
    # A confidence interval for the model's metric on the population the test images were
    # drawn from; not where another test draw's own number would land (that number has
    # its own noise: it falls inside only about 85% of the time).
    lines = [f"evaluate: {n_images} test images; [95% bootstrap interval over the test images: "
             "where the model's metric on all images like these most likely lies]"]
    width = max(len(name) for name in results)
    for name, metrics in results.items():
        shown = [f"{label} {metrics[key]:.4f} {format_interval(metrics[key + '_ci95'])}"
                 for key, label in (("test_accuracy", "accuracy"), ("macro_f1", "macro F1"),
                                    ("balanced_accuracy", "balanced accuracy"))]
        lines.append(f"  {name:<{width}}  " + ", ".join(shown))
    if any(interval is not None and interval[0] == interval[1]
           for metrics in results.values() for interval in _intervals(metrics)):
        # Every test image right (or all resamples alike): the bootstrap sees no spread, but
        # n images all right leave an error rate up to about 3/n possible (the rule of
        # three: its 95% upper bound).
        lines.append(f"  an interval of zero width means the {n_images} test images all agree "
                     f"(e.g. every one right), not that the number is exact: an error rate "
                     f"up to about {min(1, 3 / n_images):.0%} can hide in {n_images} images")
    return lines


def _intervals(metrics: dict):
    return [value for key, value in metrics.items() if key.endswith("_ci95")]


# The predicted class of fine-tuning replicate k >= 1 (`predicted` is replicate 0's).
REPLICATE_COLUMN = "predicted_replicate_{}"


def predictions_table(paths, digests, probabilities: np.ndarray, labels: np.ndarray,
                      classes: list[str], replicates: list[np.ndarray] = ()) -> pd.DataFrame:
    """One row per image: path, sha256 (the manifests' content hash, by which `report`
    pairs two revisions' test images), actual, predicted and every class's probability;
    then the predicted class of each further replicate's probabilities in `replicates`
    (`report`'s recipe gates read them)."""
    names = np.asarray(classes)
    table = pd.DataFrame({"path": list(paths), "sha256": list(digests), "actual": names[labels],
                          "predicted": names[probabilities.argmax(axis=1)]})
    for index, name in enumerate(classes):
        table[f"prob_{name}"] = np.round(probabilities[:, index], 6)
    for index, other in enumerate(replicates, start=1):
        table[REPLICATE_COLUMN.format(index)] = names[other.argmax(axis=1)]
    return table


def predict_images(model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Probabilities for a uint8 image array (or memmap), batch by batch."""
    import tensorflow as tf

    call = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    outputs = [call(tf.constant(images[start : start + batch_size])).numpy()
               for start in range(0, len(images), batch_size)]
    if not outputs:
        return np.zeros((0, model.output.shape[-1]), np.float32)
    return np.concatenate(outputs)
