"""Prefilter: drop images an ImageNet classifier does not see as the subject of the set.

A set scraped from the web holds interiors, logos, brochures and people next to the cars it
was searched for. An ImageNet classifier scores every image by the summed probability of a
list of ImageNet classes (for cars: sports car, convertible, cab, ...); images scoring below
`prefilter.threshold` are dropped before the split and listed, with their score, in the
manifests' excluded.csv (`prefilter score 0.0312 < 0.1`).

The classifier (`prefilter.model`):
- `imagenet`: Keras MobileNetV2 with its ImageNet top at 224 px. Keras downloads its
  weights on first use into ~/.keras/models (`$KERAS_HOME/models`); `preprocess_input` is
  inside the graph (`retrain.base.Preprocess`), so it takes raw pixels.
- a path to a saved Keras classifier (`.keras`): 1000 softmax outputs in ImageNet order,
  raw RGB pixels in [0, 255] in (put any preprocessing inside the model), square input at
  its own size. This is how an air-gapped machine supplies the classifier. The file is not
  a DVC dependency of the split stage: give a changed classifier a new file name.

Keras and TensorFlow are imported only when the prefilter is enabled, so the split stage
stays fast without it.
"""

from __future__ import annotations

import functools
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from retrain.errors import DataError, DownloadError, ParamsError, first_line
from retrain.images import iter_image_batches

IMAGENET_CLASSES = 1000
IMAGENET_SIZE = 224
BATCH_SIZE = 32


def check_prefilter_params(prefilter: dict) -> None:
    """Fail early, before any image is read, on settings that cannot work."""
    if not prefilter["enabled"]:
        return
    if not prefilter["imagenet_classes"]:
        raise ParamsError("prefilter.imagenet_classes: empty; list the ImageNet class indices "
                          "whose summed probability scores an image (or set prefilter.enabled "
                          "to false)")
    model = prefilter["model"]
    if model != "imagenet" and not Path(model).is_file():
        raise ParamsError(f"prefilter.model: {model}: file not found (expected imagenet or a "
                          "path to a saved .keras classifier)")


def imagenet_classifier(weights: str | None = "imagenet"):
    """MobileNetV2 with its ImageNet top at 224 px, taking raw [0, 255] pixels."""
    import keras

    from retrain.backbones import get_backbone
    from retrain.base import Preprocess

    backbone = get_backbone("mobilenet_v2")
    try:
        network = backbone.constructor(weights=weights, include_top=True, alpha=1.0,
                                       input_shape=(IMAGENET_SIZE, IMAGENET_SIZE, 3),
                                       name="imagenet_classifier")
    except Exception as exc:  # Keras raises a bare Exception when the download fails
        reason = first_line(exc, 300)
        raise DownloadError(f"prefilter.model: imagenet: cannot get the MobileNetV2 ImageNet "
                            f"weights ({reason}); put the file in ~/.keras/models or set "
                            "prefilter.model to a saved .keras classifier") from None
    pixels = keras.Input((IMAGENET_SIZE, IMAGENET_SIZE, 3), name="pixels")
    x = Preprocess(backbone.name, name="preprocess")(pixels)
    return keras.Model(pixels, network(x, training=False), name="prefilter")


def load_prefilter_model(spec: str):
    """The classifier `prefilter.model` names, checked to give 1000 class probabilities."""
    if spec == "imagenet":
        return imagenet_classifier()
    import keras

    import retrain.base  # noqa: F401  registers Preprocess, for models saved with it

    if not zipfile.is_zipfile(spec):  # Keras would say "File not found" for a file it has
        raise ParamsError(f"prefilter.model: {spec}: not a saved Keras model (a .keras file "
                          "is a zip archive)")
    try:
        model = keras.models.load_model(spec, compile=False)
    except (ValueError, OSError, TypeError, KeyError) as exc:
        reason = first_line(exc)
        raise ParamsError(f"prefilter.model: {spec}: not a loadable Keras model ({reason})"
                          ) from None
    if model.output_shape[-1] != IMAGENET_CLASSES:
        raise ParamsError(f"prefilter.model: {spec}: has {model.output_shape[-1]} outputs; "
                          f"an ImageNet classifier has {IMAGENET_CLASSES}")
    input_size(model, spec)
    return model


def input_size(model, name: str = "prefilter.model") -> int:
    """The square image size the classifier takes (224 where its input size is free)."""
    shape = model.input_shape
    if not (isinstance(shape, tuple) and len(shape) == 4 and shape[-1] == 3
            and shape[1] == shape[2]):
        raise ParamsError(f"prefilter.model: {name}: expected one input of square RGB images "
                          f"(None, size, size, 3), got {shape}")
    return shape[1] or IMAGENET_SIZE


def prefilter_scores(paths: Sequence[str | Path], model, classes: Sequence[int],
                     batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Each image's summed probability over the distinct ImageNet indices in `classes`."""
    import tensorflow as tf

    columns = sorted(set(classes))
    call = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    scores = []
    for batch in iter_image_batches(paths, input_size(model), batch_size):
        probabilities = np.asarray(call(tf.constant(batch, tf.float32)), np.float64)
        scores.append(probabilities[:, columns].sum(axis=1))
    return np.concatenate(scores) if scores else np.zeros(0)


def drop_off_subject(raw_dir: Path, rows: list[dict], excluded: list[dict], *, model,
                     classes: Sequence[int], threshold: float,
                     batch_size: int = BATCH_SIZE) -> list[dict]:
    """Keep rows scoring at least `threshold`; add the others to `excluded` with their score.

    Identical files score the same, so each distinct file is scored once.
    """
    first_path: dict[str, str] = {}
    for row in rows:
        first_path.setdefault(row["sha256"], row["path"])
    digests = list(first_path)
    scores = prefilter_scores([Path(raw_dir) / first_path[d] for d in digests], model, classes,
                              batch_size)
    score_of = dict(zip(digests, scores.tolist(), strict=True))
    kept = []
    for row in rows:
        score = score_of[row["sha256"]]
        if score < threshold:
            excluded.append({"path": row["path"],
                             "reason": f"prefilter score {score:.4f} < {threshold:g}"})
        else:
            kept.append(row)
    if rows and not kept:
        raise DataError(f"prefilter: all {len(rows)} images score below prefilter.threshold "
                        f"{threshold:g} (highest {max(scores):.4f}); check "
                        "prefilter.imagenet_classes or lower the threshold")
    return kept


def make_prefilter(prefilter: dict) -> Callable[[Path, list, list], list] | None:
    """The row filter `build_manifests` runs, or None when `prefilter.enabled` is false.

    The classifier is loaded here, so a missing download or a bad file fails before the
    images are scanned.
    """
    if not prefilter["enabled"]:
        return None
    check_prefilter_params(prefilter)
    return functools.partial(drop_off_subject, model=load_prefilter_model(prefilter["model"]),
                             classes=prefilter["imagenet_classes"],
                             threshold=prefilter["threshold"])
