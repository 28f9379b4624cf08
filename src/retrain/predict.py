"""Top-k predictions of a trained model for image files.

    python -m retrain predict photo.jpg other.png --top-k 3 [--json]
    python -m retrain predict photo.jpg --model models/tflite/model_int8.tflite

The model is a Keras model (`.keras`) or a LiteRT export (`.tflite`); both see the pixels
of the one image loader. The class names come from the model card that lists the model
file's sha256 (`models/model_card.json`); without one, from `--classes`. An unreadable
file gets a one-line error on stderr; the other files are still predicted, and the exit
status is 1 if any file failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from retrain.card import card_for
from retrain.errors import DataError, UserError, first_line
from retrain.images import load_image
from retrain.manifests import read_class_list

DEFAULT_CLASSES = "data/manifests/classes.txt"


class KerasClassifier:
    """A saved Keras model called the way `LiteRTClassifier` is: pixels in, probabilities out."""

    def __init__(self, model):
        self.model = model
        self.input_shape = tuple(int(d) for d in model.input.shape[1:])
        self.outputs = int(model.output.shape[-1])

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return np.asarray(self.model(pixels.astype(np.float32), training=False))


def load_classifier(model_path: str | Path):
    """A `.tflite` file as a LiteRTClassifier, anything else as a KerasClassifier."""
    model_path = Path(model_path)
    if not model_path.exists():
        raise UserError(f"{model_path}: model not found (run `dvc repro` first)")
    if model_path.suffix == ".tflite":
        classifier = _load_tflite(model_path)
        shape = classifier.input_shape
        if len(shape) != 3 or shape[-1] != 3:
            raise UserError(f"{model_path}: takes inputs of shape (None, "
                            f"{', '.join(map(str, shape))}), not RGB images")
        return classifier
    return KerasClassifier(_load_keras(model_path))


def _load_tflite(model_path: Path):
    from retrain.litert import LiteRTClassifier, litert_available

    if not litert_available():
        raise UserError(f"{model_path}: running .tflite models needs the LiteRT "
                        "interpreter: pip install ai-edge-litert")
    try:
        return LiteRTClassifier(model_path)
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"{model_path}: not a LiteRT model ({first_line(exc)})") from None


def _load_keras(model_path: Path):
    import keras

    import retrain.base  # noqa: F401  registers the Preprocess layer for loading

    try:
        model = keras.models.load_model(model_path)
    except (ValueError, OSError) as exc:  # a folder, a SavedModel, a file of another kind
        reason = first_line(exc)
        raise UserError(f"{model_path}: not a saved Keras model ({reason}); use "
                        "models/model.keras") from None
    shape = tuple(model.input.shape)
    if len(shape) != 4 or shape[-1] != 3 or not shape[1]:
        raise UserError(f"{model_path}: takes inputs of shape {shape}, not RGB images "
                        "(models/head.keras takes features; use models/model.keras)")
    return model


def predict_files(classifier, paths: list[str], classes: list[str], top_k: int):
    """Yield (path, [(class, probability), ...] or None, error or None) per file, in order."""
    size = classifier.input_shape[0]
    for path in paths:
        try:
            pixels = load_image(path, size)[None]
        except DataError as exc:
            yield path, None, str(exc)
            continue
        probabilities = classifier(pixels)[0]
        order = np.argsort(-probabilities, kind="stable")[:top_k]
        yield path, [(classes[i], float(probabilities[i])) for i in order], None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retrain predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--model", default="models/model.keras",
                        help=".keras or .tflite (models/tflite/model_int8.tflite, ...)")
    parser.add_argument("--classes", help="class names, one per line, in the model's output "
                        "order; checked against the model card where one describes the "
                        f"model (default: the card's, else {DEFAULT_CLASSES})")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="one JSON object per image")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        raise UserError("--top-k: expected a positive integer")
    classifier = load_classifier(args.model)
    classes, source = model_classes(args.model, args.classes)
    if len(classes) != classifier.outputs:
        raise UserError(f"{source}: {len(classes)} classes but the model has "
                        f"{classifier.outputs} outputs")
    failed = 0
    for path, top, error in predict_files(classifier, args.images, classes, args.top_k):
        if error:
            failed += 1
            print(f"error: {error}", file=sys.stderr)
        elif args.json:
            print(json.dumps({"path": path, "top": [{"class": c, "probability": p}
                                                    for c, p in top]}))
        else:
            print(path + "\n" + "\n".join(f"  {p:7.2%}  {c}" for c, p in top))
    return 1 if failed else 0


def model_classes(model_path: str | Path, classes_path: str | None
                  ) -> tuple[list[str], Path]:
    """The model's class names and the file they came from: the card describing the model
    file, which a class list given by hand must match name for name; without a card, the
    class list."""
    found = card_for(model_path)
    if found is None:
        classes_path = Path(classes_path or DEFAULT_CLASSES)
        return read_class_list(classes_path), classes_path
    card, card_path = found
    expected = card["classes"]
    if classes_path is not None:
        given = read_class_list(classes_path)
        if given != expected:
            raise UserError(f"{classes_path}: class names do not match {card_path}, which "
                            f"ships with {Path(model_path).name}: {_difference(given, expected)}")
    return expected, card_path


def _difference(given: list[str], expected: list[str]) -> str:
    if len(given) != len(expected):
        return f"{len(given)} classes, the model has {len(expected)}"
    index = next(i for i, (a, b) in enumerate(zip(given, expected)) if a != b)
    return f"output {index} is {expected[index]!r} in the card, {given[index]!r} here"
