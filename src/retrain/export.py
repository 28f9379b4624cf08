"""Deployable LiteRT models and proof that they still predict what the Keras model predicts.

The fine-tuned classifier is converted through the same recipes as `extract`'s engine
(`retrain.litert`) to float32, float16 weights, and int8 (calibrated on representative
training images; the first `export.int8_float_layers` layers may stay float, as many as
keep the file within `export.int8_size_budget` of the float32 one). Each file is
then measured against the Keras model: top-1 agreement and the largest probability
difference on the held-out images (validation and test: images the model did not train
on; at most `export.held_out_images` of them, `measured_rows`), accuracy and macro F1
against the labels of the test images among them, its size, and its single-image latency.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from retrain import litert
from retrain.evaluate import classification_metrics
from retrain.manifests import first_by_digest

# Format name (the `export.formats` values, the keys of export's figures) -> file name.
FILES = {"float32": "model.tflite", "float16": "model_fp16.tflite", "int8": "model_int8.tflite"}
# Single-image latency: the median of LATENCY_RUNS interpreter calls after a warm-up call,
# taken in LATENCY_ROUNDS rounds interleaved across the formats (so a busy spell on a shared
# machine slows every format alike), and the median of the rounds.
LATENCY_RUNS = 50
LATENCY_ROUNDS = 5


def representative_rows(train: pd.DataFrame, count: int, seed: int) -> pd.DataFrame:
    """`count` training rows drawn with the seed (all of them when the split is smaller),
    kept in manifest order so the same params always calibrate on the same images."""
    count = min(count, len(train))
    picked = np.random.default_rng(seed).choice(len(train), size=count, replace=False)
    return train.iloc[np.sort(picked)]


def measured_rows(val: pd.DataFrame, test: pd.DataFrame, limit: int) -> pd.DataFrame:
    """The held-out rows (validation, then test, each in manifest order; column `split`) the
    formats are measured on: all of them up to `limit` (0: no limit), else `limit` of them,
    each split's share of it (a test split keeps at least one row), taken from the rows whose
    sha256 sorts first within that split.

    Agreement's interval narrows with the square root of the images: at 5,000 it is within
    about half a point, and measuring three formats and the Keras model on all 28,000
    held-out images of a 100,000-image set took 730 CPU-s against 100 on 5,000. A digest is
    a uniform draw that depends on the image alone: whatever the seed, an image stays in the
    sample until images whose digests sort before it are added.
    """
    total = len(val) + len(test)
    if not limit or total <= limit:
        quotas = (len(val), len(test))
    else:
        test_quota = min(len(test), max(1 if len(test) else 0, round(limit * len(test) / total)))
        quotas = (limit - test_quota, test_quota)
    parts = [rows.iloc[first_by_digest(rows, quota)].assign(split=name)
             for rows, quota, name in zip((val, test), quotas, ("val", "test"), strict=True)]
    return pd.concat(parts, ignore_index=True)


def export_formats(model, formats: list[str], representative: np.ndarray,
                   out_dir: str | Path, int8_float_layers: int = 0,
                   int8_size_budget: float | None = None) -> dict[str, Path]:
    """Write one .tflite file per format into `out_dir`; return format -> path.
    `int8_float_layers`: how many layers from the input the int8 file computes in float, at
    most; `int8_size_budget`: fewer where more would make the int8 file larger than this
    fraction of the float32 one (None: no limit)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in formats:
        options = ({"representative": representative, "float_layers": int8_float_layers,
                    "size_budget": int8_size_budget} if name == "int8" else {})
        # The calibration images are real photos: the conversion is checked on a few.
        flatbuffer = litert.convert(model, name, probe_images=representative[:litert.PROBE_IMAGES],
                                    **options)
        paths[name] = out_dir / FILES[name]
        paths[name].write_bytes(flatbuffer)
    return paths


def measure(path: str | Path, images: np.ndarray, labels: np.ndarray, classes: list[str],
            keras_probabilities: np.ndarray, test_rows: np.ndarray | None = None,
            batch_size: int = 32) -> dict:
    """The reports/details/export.json entry of one exported file, but its latency
    (`latency_rounds_ms`).

    `images` (uint8) are the held-out images, `keras_probabilities` the Keras model's on
    them: top-1 agreement (with its 95% Clopper-Pearson interval: the range of agreement
    rates these images cannot rule out) and the largest probability difference are taken
    over all of them. Accuracy and macro F1 are taken over the `test_rows` (a boolean
    mask, default all; the test split), as `evaluate` computes them for the Keras model.
    """
    test_rows = np.ones(len(images), bool) if test_rows is None else np.asarray(test_rows)
    classifier = litert.LiteRTClassifier(path)
    probabilities = predict_images(classifier, images, batch_size)
    agrees = probabilities.argmax(axis=1) == keras_probabilities.argmax(axis=1)
    scores = classification_metrics(probabilities[test_rows], labels[test_rows], classes)
    entry = {
        "accuracy": scores["test_accuracy"],
        "macro_f1": scores["macro_f1"],
        "agreement": float(np.mean(agrees)),
        "agreement_ci95": agreement_interval(int(agrees.sum()), len(agrees)),
        "max_prob_diff": float(np.max(np.abs(probabilities - keras_probabilities))),
        "size_bytes": Path(path).stat().st_size,
        "images": len(images),
        "test_images": int(test_rows.sum()),
    }
    if classifier.input_dtype == np.uint8:  # the int8 file: how much of it is float
        kept = litert.float_layer_names(path)  # from the input on: the last says how far
        entry["float_layers"] = len(kept)
        if kept:
            entry["float_layers_through"] = short_layer_name(kept[-1])
    return entry


def latency_rounds_ms(paths: dict[str, Path], image: np.ndarray,
                      rounds: int = LATENCY_ROUNDS, runs: int = LATENCY_RUNS
                      ) -> dict[str, list[float]]:
    """Per format, the single-image latency (median of `runs` calls) of each of `rounds`
    rounds interleaved across the formats. `image`: one uint8 image, shape (1, S, S, 3)."""
    classifiers = {name: litert.LiteRTClassifier(path) for name, path in paths.items()}
    measured = {name: [] for name in paths}
    for _ in range(rounds):
        for name, classifier in classifiers.items():
            measured[name].append(classifier.latency_ms(np.asarray(image), runs))
    return measured


def agreement_interval(agreeing: int, total: int) -> list[float]:
    """95% Clopper-Pearson (exact binomial) interval of the top-1 agreement rate."""
    interval = binomtest(agreeing, total).proportion_ci(0.95, method="exact")
    return [float(interval.low), float(interval.high)]


def short_layer_name(tensor_name: str) -> str:
    """A converted layer's output tensor name as people read it: the first of the fused
    names, without the outer model's scope (`backbone_1/block_2_depthwise_relu_1/Relu6`)."""
    return tensor_name.split(";")[0].split("/", 1)[-1]


def predict_images(classifier: litert.LiteRTClassifier, images: np.ndarray,
                   batch_size: int = 32) -> np.ndarray:
    """Probabilities for a uint8 image array (or memmap), batch by batch."""
    if not len(images):
        return np.zeros((0, classifier.outputs), np.float32)
    return np.concatenate([classifier(np.asarray(images[start : start + batch_size]))
                           for start in range(0, len(images), batch_size)])
