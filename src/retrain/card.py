"""The model card: what a deployed model expects, what it predicts, and how well.

`models/model_card.json` (and its Markdown twin) names the classes in output order, the
input contract, the backbone and weights, the dataset's sha256 and split sizes, the test
metrics, and every exported format's parity with the Keras model. It also lists the sha256
of each model file it describes, so the card that ships with a model is found by content:
`predict` takes its class list from the card that names the model file's digest, and a
class list given by hand must then match it name for name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from retrain.errors import UserError

CARD_NAME = "model_card.json"
# How `retrain.images.load_image` turns a file into the model's input (and what the
# SavedModel's image-bytes signature repeats in the graph).
RESIZE = "bilinear with antialiasing (Pillow BILINEAR), straight to a square, no crop"
# Test metrics copied from metrics/evaluate.json's `finetuned` entry (plus any `*_ci95`).
TEST_METRICS = ("test_accuracy", "macro_f1", "balanced_accuracy", "test_loss")
FORMAT_COLUMNS = ("accuracy", "macro_f1", "agreement", "max_prob_diff", "size_bytes",
                  "latency_ms")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_card(*, classes: list[str], model_params: dict, data_sha256: str,
               split_sizes: dict[str, int], evaluate: dict, export: dict,
               files: dict[str, Path]) -> dict:
    """The card as a dict. `files`: path as written in the card (relative to the card's
    folder) -> the file, for each model file the card describes."""
    finetuned = evaluate.get("finetuned", {})
    size = model_params["image_size"]
    return {
        "classes": list(classes),
        "input": {
            "shape": [size, size, 3],
            "channels": "RGB",
            "value_range": [0, 255],
            "dtype": "float32 (model_int8.tflite: uint8)",
            "preprocessing": f"inside the model ({model_params['backbone']})",
            "resize": RESIZE,
            "decoding": "EXIF orientation applied; grayscale, CMYK, 16-bit made 8-bit RGB; "
                        "transparency composited onto white",
        },
        "model": {
            "backbone": model_params["backbone"],
            "weights": _weights_name(model_params["weights"]),
            "alpha": model_params["alpha"],
            "image_size": size,
        },
        "dataset": {"sha256": data_sha256, "split_sizes": dict(split_sizes)},
        "test_metrics": {key: value for key, value in finetuned.items()
                         if key in TEST_METRICS or key.endswith("_ci95")},
        "formats": {name: {key: entry[key] for key in FORMAT_COLUMNS if key in entry}
                    for name, entry in export.items()},
        "files": {name: file_sha256(path) for name, path in files.items()},
    }


def _weights_name(weights: str) -> str:
    """`imagenet`, `none`, or a weights file's name (not the path on the machine that ran)."""
    return weights if weights in ("imagenet", "none") else Path(weights).name


def card_markdown(card: dict) -> str:
    contract = card["input"]
    model, dataset = card["model"], card["dataset"]
    lines = [
        "# Model card",
        "",
        f"{model['backbone']} (alpha {model['alpha']}, weights `{model['weights']}`) "
        f"fine-tuned on {len(card['classes'])} classes.",
        "",
        "## Classes, in output order",
        "",
        *[f"{index}. {name}" for index, name in enumerate(card["classes"])],
        "",
        "## Input",
        "",
        f"- shape {' x '.join(map(str, contract['shape']))}, {contract['channels']}, values "
        f"in [{contract['value_range'][0]}, {contract['value_range'][1]}], "
        f"{contract['dtype']}",
        f"- preprocessing: {contract['preprocessing']}",
        f"- resize: {contract['resize']}",
        f"- decoding: {contract['decoding']}",
        "",
        "## Data",
        "",
        f"- archive sha256 `{dataset['sha256']}`",
        "- images per split: " + ", ".join(f"{split} {count}" for split, count
                                           in dataset["split_sizes"].items()),
        "",
        "## Test metrics (fine-tuned Keras model)",
        "",
        *[f"- {key}: {_number(value)}" for key, value in card["test_metrics"].items()],
        *(["", "`*_ci95`: 95% bootstrap interval over the test images (from `evaluate`: the "
               "test set resampled with replacement, the middle 95% of the metric's values)."]
          if any(key.endswith("_ci95") for key in card["test_metrics"]) else []),
        "",
        "## Exported formats (test split, against the Keras model)",
        "",
        "| format | accuracy | macro F1 | top-1 agreement | max prob. diff | size (MB) "
        "| latency (ms, 1 image) |",
        "|---|---|---|---|---|---|---|",
        *[f"| {name} | {_number(e.get('accuracy'))} | {_number(e.get('macro_f1'))} "
          f"| {_number(e.get('agreement'))} | {_number(e.get('max_prob_diff'))} "
          f"| {e['size_bytes'] / 1e6:.2f} | {_number(e.get('latency_ms'))} |"
          for name, e in card["formats"].items()],
        "",
        "## Files (sha256)",
        "",
        *[f"- `{name}` {digest}" for name, digest in card["files"].items()],
    ]
    return "\n".join(lines) + "\n"


def _number(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_number(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


def card_for(model_path: str | Path) -> tuple[dict, Path] | None:
    """The card that lists `model_path`'s sha256, looked for in the model's folder and the
    one above it (models/tflite/x.tflite -> models/model_card.json), or None."""
    model_path = Path(model_path)
    candidates = [model_path.parent / CARD_NAME, model_path.parent.parent / CARD_NAME]
    cards = [path for path in dict.fromkeys(candidates) if path.is_file()]
    if not cards or not model_path.is_file():
        return None
    digest = file_sha256(model_path)
    for path in cards:
        try:
            card = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: not a readable model card ({exc})") from None
        if digest in card.get("files", {}).values():
            return card, path
    return None
