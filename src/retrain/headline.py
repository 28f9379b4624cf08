"""What `dvc metrics show` and `dvc exp show` display: the few figures people compare.

A stage measures far more than anyone compares at a glance: per-class precision and recall,
images per class and split, exclusions by reason, parameter counts, timings. Every stage
writes every figure it measured to its details file, `reports/details/<stage>.json` (a
DVC-cached output, so that the run-cache keeps every stage: DVC leaves a stage with an
uncached output that is neither metrics nor plots out of it; the model card, `report`'s
gates and people read it). The stages whose figures are compared also write the headline
below under `metrics/` (what DVC shows): copies of a few of those figures.

`dvc metrics show` prints one row per metrics file and one column per figure name found in
any of them. So the headline is one small file per thing people compare (each model, each
export format, crossval, the data kept and excluded, each finding of the data audit) and
files about like things use the same names: a model and an export format both have an
`accuracy`, every audit finding is a count of `images`. About a dozen columns, whatever the
number of classes, models or formats: the table fits a 200-column terminal.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from retrain.atomic import atomic_path

DETAILS = "reports/details"
# The headline's folders and file (dvc.yaml passes the same paths to the stages).
DATA = "metrics/data"  # split: included.json, excluded.json
CROSSVAL = "metrics/crossval.json"
AUDIT = "metrics/audit"  # one file per finding, AUDIT_ROWS
MODELS = "metrics/models"  # evaluate: head.json, finetuned.json
EXPORT = "metrics/export"  # one file per exported format

# Each kind of row: column -> the stage figure it copies (a dotted key of the stage's details,
# below the row's own key where the details hold one entry per model or format).
MODEL_COLUMNS = {
    "accuracy": "test_accuracy",
    "ci95_low": "test_accuracy_ci95_low",
    "ci95_high": "test_accuracy_ci95_high",
    "macro_f1": "macro_f1",
    "balanced_accuracy": "balanced_accuracy",
    # test accuracy's sd over fine-tuning replicates: the training noise (None for one)
    "sd": "replicates.test_accuracy_sd",
}
FORMAT_COLUMNS = {  # accuracy and macro F1 on the test images export measured
    "accuracy": "accuracy",
    "macro_f1": "macro_f1",
    "agreement": "agreement",  # top-1 agreement with the Keras model
    "size_mb": "size_bytes",
    "latency_ms": "latency_ms",
}
CROSSVAL_COLUMNS = {  # validation figures, mean and sd over the folds
    "accuracy": "val_accuracy_mean",
    "sd": "val_accuracy_sd",
    "macro_f1": "macro_f1_mean",
}
AUDIT_ROWS = {
    # images flagged, and the share whose label a classifier that never saw them agrees with
    "label_issues": {"images": "label_issues", "agreement": "label_agreement"},
    "near_duplicates": {"images": "near_duplicate_images"},  # images in near-duplicate groups
    "test_leaks": {"images": "leaked_test_images"},  # test images with a twin in train or val
    "outliers": {"images": "outliers"},
}
# Columns shown in other units than the figure they copy.
UNITS = {"size_mb": 1e-6}


def _figure(figures: dict, dotted: str):
    node = figures
    for key in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _row(figures: dict, columns: dict[str, str]) -> dict:
    """The row's columns that hold a figure (a figure the stage did not measure, or measured
    as None, makes no column)."""
    row = {}
    for column, dotted in columns.items():
        value = _figure(figures, dotted)
        if value is not None:
            row[column] = round(value * UNITS[column], 6) if column in UNITS else value
    return row


def model_rows(figures: dict) -> dict[str, dict]:
    """`evaluate`'s rows, one per model, from its details."""
    return {model: _row(entry, MODEL_COLUMNS) for model, entry in figures.items()}


def format_rows(figures: dict) -> dict[str, dict]:
    """`export`'s rows, one per exported format, from its details."""
    return {name: _row(entry, FORMAT_COLUMNS) for name, entry in figures.items()}


def crossval_row(summary: dict) -> dict:
    return _row(summary, CROSSVAL_COLUMNS)


def audit_rows(counts: dict) -> dict[str, dict]:
    return {name: _row(counts, columns) for name, columns in AUDIT_ROWS.items()}


def data_rows(figures: dict) -> dict[str, dict]:
    """`split`'s rows: the images (and classes) that made it in, and the files that did not."""
    return {"included": {"images": sum(split["total"] for split in figures["images"].values()),
                         "classes": figures["classes"]},
            "excluded": {"images": figures["excluded"]["total"]}}


def turned_off(names) -> dict[str, dict]:
    """Rows of a stage turned off by its params: each says so, and a gate naming one of its
    figures reads it as off (`report`)."""
    return {name: {"enabled": False} for name in names}


def write_rows(folder: str | Path, rows: dict[str, dict]) -> None:
    """The folder, holding `<name>.json` per row and nothing else, replaced whole."""
    with atomic_path(folder, directory=True) as tmp:
        for name, row in rows.items():
            (tmp / f"{name}.json").write_text(json.dumps(row, indent=2) + "\n")


def replicate_spread(replicates: dict | None) -> dict | None:
    """The spread people compare from evaluate's replicate figures: count and test accuracy's
    mean and sd; None for one replicate (no spread, and a mean that is test_accuracy again)."""
    if not replicates or replicates.get("count", 1) < 2:
        return None
    return {key: replicates[key] for key in ("count", "test_accuracy_mean", "test_accuracy_sd")}


def source(path: str, column: str) -> tuple[str, str] | None:
    """The stage figure a headline figure copies, as (details file, dotted key), e.g.
    `metrics/models/finetuned.json`, `accuracy` -> `reports/details/evaluate.json`,
    `finetuned.test_accuracy`; None for a figure that is not in the headline."""
    path = PurePosixPath(path)
    folder, name = path.parent.as_posix(), path.stem
    if path.as_posix() == CROSSVAL and column in CROSSVAL_COLUMNS:
        return f"{DETAILS}/crossval.json", CROSSVAL_COLUMNS[column]
    if folder == MODELS and column in MODEL_COLUMNS:
        return f"{DETAILS}/evaluate.json", f"{name}.{MODEL_COLUMNS[column]}"
    if folder == EXPORT and column in FORMAT_COLUMNS and column not in UNITS:
        return f"{DETAILS}/export.json", f"{name}.{FORMAT_COLUMNS[column]}"
    if folder == AUDIT and column in AUDIT_ROWS.get(name, {}):
        return f"{DETAILS}/audit.json", AUDIT_ROWS[name][column]
    return None
