"""The model card: what a deployed model expects, what it predicts, and how well.

`models/model_card.json` (and its Markdown twin) names the classes in output order, the
input contract, the backbone and weights, the dataset's sha256 and split sizes, the
training recipe (head and fine-tuning params, augmentation, seed), the test metrics, and
every exported format's parity with the Keras model. It also lists the sha256
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
# Where the signature's pixels differ from training's (tests/test_serving_decode.py).
SERVING_DECODING = ("the training pixels for JPEG, PNG, GIF, BMP and WebP (within 1 level "
                    "after resizing; a JPEG turned by its EXIF orientation) except: the EXIF "
                    "orientation of PNG and WebP files is ignored (turn them on the client or "
                    "send pixels); 1- and 4-bit BMPs and animated WebP are refused")
# What each file needs to load: the Keras file holds a layer of this package.
LOADING = ("model.keras needs the retrain package: its preprocessing is a retrain layer "
           "(retrain.base.Preprocess); `import retrain.base` before keras.models.load_model. "
           "serving/ (TensorFlow) and the .tflite files (LiteRT) need no retrain")
# Test metrics copied from evaluate's `finetuned` figures (reports/details/evaluate.json),
# each with its `*_ci95` where evaluate gives one (never an interval without its figure).
TEST_METRICS = ("test_accuracy", "macro_f1", "balanced_accuracy", "test_loss")
FORMAT_COLUMNS = ("accuracy", "macro_f1", "agreement", "agreement_ci95", "max_prob_diff",
                  "size_bytes", "latency_ms", "float_layers", "float_layers_through", "images",
                  "test_images", "held_out_images")
# A format is recommended only if it agrees top-1 with the Keras model on at least this
# share of the held-out images (float32, the reference, always may be).
SHIP_MIN_AGREEMENT = 0.98
# Single-image latencies within this fraction of each other count as equal: medians on a
# shared CPU move by about this much between runs.
LATENCY_TIE = 0.1


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def training_recipe(params: dict) -> dict:
    """What trained the model, from params.yaml: the head on the cached features, then the
    fine-tuning (learning rate as used: the head's times `lr_factor`)."""
    head, tune = params["head"], params["finetune"]
    return {
        "seed": params["seed"],
        "head": {key: head[key] for key in ("epochs", "learning_rate", "dropout",
                                            "batch_size", "class_weights",
                                            "early_stopping_patience")},
        "finetune": {"from_layer": tune["from_layer"],
                     "learning_rate": head["learning_rate"] * tune["lr_factor"],
                     **{key: tune[key] for key in ("epochs", "batch_size", "train_batchnorm",
                                                   "replicates")},
                     "augment": dict(tune["augment"])},
    }


# What the card says of the data audit (reports/details/audit.json): how far the labels
# are to be trusted, and what may have leaked into the test figures.
AUDIT_FIGURES = ("images", "label_agreement", "label_issues", "outliers",
                 "near_duplicate_groups", "cross_split_groups", "leaked_test_images")


def build_card(*, classes: list[str], model_params: dict, data_sha256: str,
               split_sizes: dict[str, int], evaluate: dict, export: dict,
               files: dict[str, Path], training: dict | None = None,
               audit: dict | None = None) -> dict:
    """The card as a dict. `files`: path as written in the card (relative to the card's
    folder) -> the file, for each model file the card describes; `training`: the recipe
    (`training_recipe`); `audit`: the audit's figures (None: not given, as for a model
    trained before the audit existed)."""
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
            "decoding": "EXIF orientation applied; grayscale, CMYK, palette made 8-bit RGB, "
                        "16-bit by its high byte; transparency composited onto white",
            "serving_image_bytes": SERVING_DECODING,
        },
        "model": {
            "backbone": model_params["backbone"],
            "weights": _weights_name(model_params["weights"]),
            "alpha": model_params["alpha"],
            "image_size": size,
        },
        "dataset": {"sha256": data_sha256, "split_sizes": dict(split_sizes),
                    "audit": _audit(audit)},
        "training": training,
        "test_metrics": {key: value for key, value in finetuned.items()
                         if key.removesuffix("_ci95") in TEST_METRICS},
        "replicates": _replicates(finetuned.get("replicates")),
        "formats": {name: {key: entry[key] for key in FORMAT_COLUMNS if key in entry}
                    for name, entry in export.items()},
        "files": {name: file_sha256(path) for name, path in files.items()},
        "loading": LOADING,
        "recommendation": recommend_format(export),
    }


def _audit(figures: dict | None) -> dict | None:
    if figures is None:
        return None
    if not figures.get("enabled", True):
        return {"enabled": False}
    return {key: figures[key] for key in AUDIT_FIGURES if key in figures}


def _audit_markdown(audit: dict | None) -> list[str]:
    """The Data section's line on the audit: the labels' agreement first, since a model
    that learned wrong labels looks as good as one that learned right ones."""
    if audit is None:
        return []
    if not audit.get("enabled", True):
        return ["- data audit: off (`audit.enabled: false`): nothing says how many labels "
                "are wrong"]
    agreement = audit.get("label_agreement")
    words = [f"labels agree on {agreement:.1%} of the {audit.get('images')} images with a "
             "classifier that never saw them" if agreement is not None else None,
             f"{audit.get('label_issues')} flagged as likely mislabelled",
             f"{audit.get('outliers')} as out of scope",
             f"{audit.get('near_duplicate_groups')} near-duplicate groups "
             f"({audit.get('cross_split_groups')} across splits, "
             f"{audit.get('leaked_test_images')} test images with a near-copy in train or val)"]
    return ["- data audit (`reports/audit/`): " + "; ".join(filter(None, words))]


def _replicates(spread: dict | None) -> dict | None:
    """With more than one fine-tuning replicate: their seeds and test accuracy's mean and sd.
    The files describe replicate 0 (finetune writes, exports and serves it). None for one
    replicate (no spread, and a mean that is test_accuracy again)."""
    if not spread or spread.get("count", 1) < 2:
        return None
    return {**{key: spread[key] for key in ("count", "test_accuracy_mean", "test_accuracy_sd")},
            "seeds": [row["seed"] for row in spread["per_replicate"]]}


def recommend_format(formats: dict[str, dict]) -> dict:
    """Which exported format to ship, from export's entries (reports/details/export.json).

    A format holds when it agrees with Keras on SHIP_MIN_AGREEMENT of the held-out images.
    Among those that hold, one is dominated when another is at least as accurate, no larger
    and no slower, and better on one of the three. The recommendation is the smallest file
    that holds and is not dominated.
    """
    holding = {name: entry for name, entry in formats.items()
               if name == "float32" or entry.get("agreement", 0) >= SHIP_MIN_AGREEMENT}
    dominated = {name: better for name in holding
                 for better in holding if better != name
                 and _dominates(holding[better], holding[name])}
    candidates = [name for name in holding if name not in dominated]
    return {
        "ship": min(candidates, key=lambda name: holding[name]["size_bytes"], default=None),
        "dominated_by": dominated,
        "below_agreement": sorted(set(formats) - set(holding)),
        "min_agreement": SHIP_MIN_AGREEMENT,
    }


def _dominates(a: dict, b: dict) -> bool:
    """`a` is no worse than `b` on accuracy, size and latency, and better on one."""
    slower = a["latency_ms"] > b["latency_ms"] * (1 + LATENCY_TIE)
    no_worse = (a["accuracy"] >= b["accuracy"] and a["size_bytes"] <= b["size_bytes"]
                and not slower)
    better = (a["accuracy"] > b["accuracy"] or a["size_bytes"] < b["size_bytes"]
              or a["latency_ms"] < b["latency_ms"] * (1 - LATENCY_TIE))
    return no_worse and better


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
        f"- serving/ `serve_image_bytes`: {contract['serving_image_bytes']}",
        "",
        "## Data",
        "",
        f"- archive sha256 `{dataset['sha256']}`",
        "- images per split: " + ", ".join(f"{split} {count}" for split, count
                                           in dataset["split_sizes"].items()),
        *_audit_markdown(dataset.get("audit")),
        "",
        *_training_markdown(card.get("training")),
        "## Test metrics (fine-tuned Keras model)",
        "",
        *[f"- {key}: {_number(value)}" for key, value in card["test_metrics"].items()],
        *(["", "`*_ci95`: 95% bootstrap interval over the test images (from `evaluate`: the "
               "test set resampled with replacement, the middle 95% of the metric's values)."]
          if any(key.endswith("_ci95") for key in card["test_metrics"]) else []),
        *_replicates_markdown(card.get("replicates")),
        "",
        "## Exported formats (against the Keras model)",
        "",
        f"Measured on {_measured_on(card['formats'])}: top-1 agreement with the Keras model "
        "(and its 95% Clopper-Pearson interval) and the largest probability difference on all "
        "of them, accuracy and macro F1 on the test images among them.",
        "",
        "| format | accuracy | macro F1 | top-1 agreement | agreement 95% | max prob. diff "
        "| size (MB) | latency (ms, 1 image) | layers in float |",
        "|---|---|---|---|---|---|---|---|---|",
        *[f"| {name} | {_number(e.get('accuracy'))} | {_number(e.get('macro_f1'))} "
          f"| {_number(e.get('agreement'))} | {_number(e.get('agreement_ci95'))} "
          f"| {_number(e.get('max_prob_diff'))} "
          f"| {e['size_bytes'] / 1e6:.2f} | {_number(e.get('latency_ms'))} "
          f"| {_float_layers(e)} |"
          for name, e in card["formats"].items()],
        "",
        *_recommendation_markdown(card),
        "## Files (sha256)",
        "",
        *[f"- `{name}` {digest}" for name, digest in card["files"].items()],
        "",
        f"Loading: {card.get('loading', LOADING)}.",
    ]
    return "\n".join(lines) + "\n"


def _sample(entry: dict) -> tuple[int, int] | None:
    """(measured, held-out) where export measured a format on a sample of the held-out
    images (export.measured_rows); None where it measured all, or did not say."""
    measured, total = entry.get("images"), entry.get("held_out_images")
    return None if measured is None or total is None or measured >= total else (measured, total)


def _more_images(entry: dict) -> str:
    """Where more images to measure on are: the held-out images left out of the sample."""
    if (sample := _sample(entry)) is None:
        return ""
    return (f" (it was measured on {sample[0]:,} of {sample[1]:,} held-out images: "
            "`export.held_out_images: 0` measures all of them)")


def _float_layers(entry: dict) -> str:
    """The card's "layers in float" cell: all (a float format), 0 (every layer int8), or
    how many and the last of them."""
    if "float_layers" not in entry:
        return "all"
    through = entry.get("float_layers_through")
    return f"{entry['float_layers']}" + (f" (through {through})" if through else "")


def _measured_on(formats: dict[str, dict]) -> str:
    """Which held-out images export measured the formats on."""
    entry = next(iter(formats.values()), {})
    if (sample := _sample(entry)) is not None:
        return (f"{sample[0]:,} of the {sample[1]:,} held-out images (validation and test: "
                "those whose sha256 sorts first, `export.held_out_images`)")
    if entry.get("images") is None:  # an export from before the counts were recorded
        return "the held-out images (validation and test)"
    return f"the {entry['images']:,} held-out images (validation and test)"


def _augmentation_words(augment: dict) -> str:
    drawn = [name for name, on in (("horizontal flip", augment["flip"]),
                                   (f"brightness +/-{augment['brightness']:g}",
                                    augment["brightness"]),
                                   (f"contrast +/-{augment['contrast']:g}",
                                    augment["contrast"])) if on]
    if not drawn:
        return "none"
    views = augment["views"]
    return ", ".join(drawn) + ("; new views every epoch" if not views else
                               f"; {views} views per image, drawn once, shown in turn")


def _head_epochs(head: dict) -> str:
    patience = head["early_stopping_patience"]
    if not patience:
        return f"{head['epochs']} epochs"
    return (f"up to {head['epochs']} epochs, stopped after {patience} without a lower "
            "validation loss (the best epoch's weights kept)")


def _training_markdown(training: dict | None) -> list[str]:
    if not training:
        return []
    head, tune = training["head"], training["finetune"]
    batchnorm = "BatchNorm learning its statistics" if tune["train_batchnorm"] \
        else "BatchNorm frozen"
    lines = [
        "## Training",
        "",
        f"- head (dropout {head['dropout']:g}, dense softmax) on the frozen backbone's pooled "
        f"features: {_head_epochs(head)}, learning rate {head['learning_rate']:g}, batch "
        f"{head['batch_size']}" + (", balanced class weights" if head["class_weights"] else ""),
        f"- fine-tuning: backbone layers from {tune['from_layer']} up trainable ({batchnorm}), "
        f"{tune['epochs']} epochs, learning rate {tune['learning_rate']:g}, batch "
        f"{tune['batch_size']}",
        f"- augmentation while fine-tuning: {_augmentation_words(tune['augment'])}",
        f"- seed {training['seed']}" + (
            f"; {tune['replicates']} fine-tuning replicates, this card's files are replicate 0"
            if tune["replicates"] > 1 else ""),
        "",
    ]
    return lines


def _replicates_markdown(replicates: dict | None) -> list[str]:
    if not replicates:
        return []
    seeds = replicates["seeds"]
    return ["", f"These figures are replicate 0's (seed {seeds[0]}), the model in the files "
                f"below. Fine-tuned {replicates['count']} times from the same head, split and "
                f"augmented views with seeds {', '.join(map(str, seeds))}, test accuracy has "
                f"mean {_number(replicates['test_accuracy_mean'])} and sd "
                f"{_number(replicates['test_accuracy_sd'])} over the replicates: the training "
                "run's own noise, beside the test images' in the interval above."]


def _recommendation_markdown(card: dict) -> list[str]:
    advice, formats = card.get("recommendation"), card["formats"]
    if not advice:
        return []
    lines = ["## Which format to ship", ""]
    if advice["ship"]:
        lines.append(f"- Ship **{advice['ship']}**: the smallest file that agrees top-1 with "
                     f"the Keras model on at least {advice['min_agreement']:.0%} of the "
                     "held-out images and that no other such format beats on accuracy, size "
                     "and latency together.")
        low = formats[advice["ship"]].get("agreement_ci95", [1.0])[0]
        if low < advice["min_agreement"] and advice["ship"] != "float32":
            # The point estimate clears the bar; on ~50 held-out images the interval cannot.
            lines.append(f"- Its agreement's 95% interval reaches down to {_number(low)}: "
                         f"these held-out images cannot show that it agrees on "
                         f"{advice['min_agreement']:.0%}; check it on more images before "
                         "relying on it" + _more_images(formats[advice["ship"]]) + ".")
    for name, better in advice["dominated_by"].items():
        lines.append(f"- {name} is not better than {better} on any axis: {better} is at "
                     "least as accurate, no larger and no slower.")
    for name in advice["below_agreement"]:
        low, high = formats[name].get("agreement_ci95", [None, None])
        lines.append(f"- {name} does not hold: it agrees with the Keras model on "
                     f"{_number(formats[name].get('agreement'))} of the held-out images "
                     f"(95% interval [{_number(low)}, {_number(high)}]), below "
                     f"{advice['min_agreement']:.0%}.")
    if "float16" in formats:
        lines.append("- float16 halves the file, not the time: on a CPU, XNNPACK converts its "
                     "weights to float32 when the model loads, so it runs as fast as float32 "
                     f"(latencies within {LATENCY_TIE:.0%} count as equal here).")
    return [*lines, ""]


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
