"""Top-k predictions of a trained model for image files.

    python -m retrain predict photo.jpg other.png --top-k 3 [--json]

An unreadable file gets a one-line error on stderr; the other files are still predicted,
and the exit status is 1 if any file failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from retrain.errors import DataError, UserError, first_line
from retrain.images import load_image
from retrain.manifests import read_class_list


def load_classifier(model_path: str | Path):
    import keras

    import retrain.base  # noqa: F401  registers the Preprocess layer for loading

    model_path = Path(model_path)
    if not model_path.exists():
        raise UserError(f"{model_path}: model not found (run `dvc repro` first)")
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


def predict_files(model, paths: list[str], classes: list[str], top_k: int):
    """Yield (path, [(class, probability), ...] or None, error or None) per file, in order."""
    size = int(model.input.shape[1])
    for path in paths:
        try:
            pixels = load_image(path, size)[None].astype(np.float32)
        except DataError as exc:
            yield path, None, str(exc)
            continue
        probabilities = np.asarray(model(pixels, training=False))[0]
        order = np.argsort(-probabilities, kind="stable")[:top_k]
        yield path, [(classes[i], float(probabilities[i])) for i in order], None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retrain predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--model", default="models/model.keras")
    parser.add_argument("--classes", default="data/manifests/classes.txt",
                        help="class names, one per line, in the model's output order")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="one JSON object per image")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        raise UserError("--top-k: expected a positive integer")
    classes = read_class_list(args.classes)
    model = load_classifier(args.model)
    if len(classes) != model.output.shape[-1]:
        raise UserError(f"{args.classes}: {len(classes)} classes but the model has "
                        f"{model.output.shape[-1]} outputs")
    failed = 0
    for path, top, error in predict_files(model, args.images, classes, args.top_k):
        if error:
            failed += 1
            print(f"error: {error}", file=sys.stderr)
        elif args.json:
            print(json.dumps({"path": path, "top": [{"class": c, "probability": p}
                                                    for c, p in top]}))
        else:
            print(path + "\n" + "\n".join(f"  {p:7.2%}  {c}" for c, p in top))
    return 1 if failed else 0
