"""Test-split metrics for the head (on cached features) and the fine-tuned model (on images).

Accuracy alone misleads on imbalanced classes, so macro F1, balanced accuracy and
per-class precision/recall/F1 (scikit-learn) are reported next to it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, balanced_accuracy_score, classification_report, f1_score

# Keras clips probabilities to [eps, 1 - eps] in its cross-entropy; do the same so the
# loss here matches `model.evaluate`.
EPSILON = 1e-7


def cross_entropy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    picked = np.clip(probabilities[np.arange(len(labels)), labels], EPSILON, 1 - EPSILON)
    return float(-np.mean(np.log(picked)))


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray,
                           classes: list[str]) -> dict:
    predicted = probabilities.argmax(axis=1)
    indices = list(range(len(classes)))
    report = classification_report(labels, predicted, labels=indices, target_names=classes,
                                   output_dict=True, zero_division=0)
    return {
        "test_loss": cross_entropy(probabilities, labels),
        "test_accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, labels=indices, average="macro",
                                   zero_division=0)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "per_class": {
            name: {"precision": report[name]["precision"], "recall": report[name]["recall"],
                   "f1": report[name]["f1-score"], "support": int(report[name]["support"])}
            for name in classes
        },
    }


def predictions_table(paths, probabilities: np.ndarray, labels: np.ndarray,
                      classes: list[str]) -> pd.DataFrame:
    """One row per image: path, actual, predicted and every class's probability."""
    names = np.asarray(classes)
    table = pd.DataFrame({"path": list(paths), "actual": names[labels],
                          "predicted": names[probabilities.argmax(axis=1)]})
    for index, name in enumerate(classes):
        table[f"prob_{name}"] = np.round(probabilities[:, index], 6)
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
