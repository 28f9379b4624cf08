"""Deployable LiteRT models and proof that they still predict what the Keras model predicts.

The fine-tuned classifier is converted through the same recipes as `extract`'s engine
(`retrain.litert`) to float32, float16 weights, and full-integer int8 (calibrated on
representative training images). Each file is then measured on the test split against the
Keras model: accuracy and macro F1 against the labels, top-1 agreement and the largest
probability difference against Keras, its size, and its single-image latency.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from retrain import litert
from retrain.evaluate import classification_metrics

# Format name (the `export.formats` values, the keys of metrics/export.json) -> file name.
FILES = {"float32": "model.tflite", "float16": "model_fp16.tflite", "int8": "model_int8.tflite"}
# Single-image latency is the median of this many interpreter calls after a warm-up call.
LATENCY_RUNS = 50


def representative_rows(train: pd.DataFrame, count: int, seed: int) -> pd.DataFrame:
    """`count` training rows drawn with the seed (all of them when the split is smaller),
    kept in manifest order so the same params always calibrate on the same images."""
    count = min(count, len(train))
    picked = np.random.default_rng(seed).choice(len(train), size=count, replace=False)
    return train.iloc[np.sort(picked)]


def export_formats(model, formats: list[str], representative: np.ndarray,
                   out_dir: str | Path) -> dict[str, Path]:
    """Write one .tflite file per format into `out_dir`; return format -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in formats:
        flatbuffer = litert.convert(model, name, representative if name == "int8" else None)
        paths[name] = out_dir / FILES[name]
        paths[name].write_bytes(flatbuffer)
    return paths


def measure(path: str | Path, images: np.ndarray, labels: np.ndarray, classes: list[str],
            keras_probabilities: np.ndarray, batch_size: int = 32,
            latency_runs: int = LATENCY_RUNS) -> dict:
    """The metrics/export.json entry of one exported file, on the test images (uint8).

    Accuracy and macro F1 are computed as `evaluate` computes them for the Keras model.
    """
    classifier = litert.LiteRTClassifier(path)
    probabilities = predict_images(classifier, images, batch_size)
    predicted = probabilities.argmax(axis=1)
    scores = classification_metrics(probabilities, labels, classes)
    return {
        "accuracy": scores["test_accuracy"],
        "macro_f1": scores["macro_f1"],
        "agreement": float(np.mean(predicted == keras_probabilities.argmax(axis=1))),
        "max_prob_diff": float(np.max(np.abs(probabilities - keras_probabilities))),
        "size_bytes": Path(path).stat().st_size,
        "latency_ms": classifier.latency_ms(np.asarray(images[:1]), latency_runs),
    }


def predict_images(classifier: litert.LiteRTClassifier, images: np.ndarray,
                   batch_size: int = 32) -> np.ndarray:
    """Probabilities for a uint8 image array (or memmap), batch by batch."""
    if not len(images):
        return np.zeros((0, classifier.outputs), np.float32)
    return np.concatenate([classifier(np.asarray(images[start : start + batch_size]))
                           for start in range(0, len(images), batch_size)])
