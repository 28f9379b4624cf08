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


def details_file(stage: str) -> str:
    """The stage's details file: every figure it measured."""
    return f"{DETAILS}/{stage}.json"


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
DATA_COLUMNS = ("images", "classes")  # split's sums (data_rows)
# Every column of the headline (README, "What you get"); `enabled` joins them when a stage
# is off.
COLUMNS = frozenset().union(MODEL_COLUMNS, FORMAT_COLUMNS, CROSSVAL_COLUMNS, DATA_COLUMNS,
                            *AUDIT_ROWS.values())
# Columns shown in other units than the figure they copy: the factor applied.
SCALE = {"size_mb": 1e-6}


def figure(figures: dict, dotted: str):
    """The value at the dotted key of nested `figures`, or None."""
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
        value = figure(figures, dotted)
        if value is not None:
            row[column] = round(value * SCALE[column], 6) if column in SCALE else value
    return row


def _rows(figures: dict, columns: dict[str, str]) -> dict[str, dict]:
    return {name: _row(entry, columns) for name, entry in figures.items()}


def model_rows(figures: dict) -> dict[str, dict]:
    """`evaluate`'s rows, one per model, from its details."""
    return _rows(figures, MODEL_COLUMNS)


def format_rows(figures: dict) -> dict[str, dict]:
    """`export`'s rows, one per exported format, from its details."""
    return _rows(figures, FORMAT_COLUMNS)


def crossval_row(summary: dict) -> dict:
    return _row(summary, CROSSVAL_COLUMNS)


def audit_rows(counts: dict) -> dict[str, dict]:
    return {name: _row(counts, columns) for name, columns in AUDIT_ROWS.items()}


def data_rows(figures: dict) -> dict[str, dict]:
    """`split`'s rows: the images (and classes) that made it in, and the files that did not."""
    return {"included": {"images": sum(split["total"] for split in figures["images"].values()),
                         "classes": figures["classes"]},
            "excluded": {"images": figures["excluded"]["total"]}}


# What a stage turned off by its params writes in each of its rows (and its details): a gate
# naming one of its figures reads it as off (`report`).
OFF = {"enabled": False}


def off_rows(names) -> dict[str, dict]:
    return {name: dict(OFF) for name in names}


def write_rows(folder: str | Path, rows: dict[str, dict]) -> None:
    """The folder, holding `<name>.json` per row and nothing else, replaced whole."""
    with atomic_path(folder, directory=True) as tmp:
        for name, row in rows.items():
            (tmp / f"{name}.json").write_text(json.dumps(row, indent=2) + "\n")


def stage_figure(path: str, key: str) -> tuple[str, str]:
    """The stage figure a gate on (`path`, `key`) reads, as (file, dotted key): a headline
    figure's source (`copied_from`); any other figure (a details figure, `size_mb`, the
    data rows) is itself."""
    return copied_from(path, key) or (path, key)


def copied_from(path: str, column: str) -> tuple[str, str] | None:
    """The stage figure a headline figure copies as it is, as (details file, dotted key),
    e.g. `metrics/models/finetuned.json`, `accuracy` -> `reports/details/evaluate.json`,
    `finetuned.test_accuracy`. None for a figure that is not in the headline, and for the
    few headline figures that are not a copy of one stage figure: `size_mb` (other units)
    and the data rows (`split`'s sums)."""
    if column in SCALE:
        return None
    path = PurePosixPath(path)
    folder, name = path.parent.as_posix(), path.stem
    if path.as_posix() == CROSSVAL and column in CROSSVAL_COLUMNS:
        return details_file("crossval"), CROSSVAL_COLUMNS[column]
    if folder == MODELS and column in MODEL_COLUMNS:
        return details_file("evaluate"), f"{name}.{MODEL_COLUMNS[column]}"
    if folder == EXPORT and column in FORMAT_COLUMNS:
        return details_file("export"), f"{name}.{FORMAT_COLUMNS[column]}"
    if folder == AUDIT and column in AUDIT_ROWS.get(name, {}):
        return details_file("audit"), AUDIT_ROWS[name][column]
    return None
