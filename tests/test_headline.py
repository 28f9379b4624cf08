"""The headline view: DVC shows the figures people compare, one row per model, format, crossval
and data finding over a dozen shared columns; every other figure a stage measured is in its
details file, where the model card and report gates still find it."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, dvc

from retrain import headline
from retrain.evaluate import classification_metrics, leak_free_accuracy, replicate_figures
from retrain.report import check_gates

# The terminal width the headline is read in.
TERMINAL_COLUMNS = 200
MODEL_COLUMNS = {"accuracy", "ci95_low", "ci95_high", "macro_f1", "balanced_accuracy"}


def shown_columns(figures: dict, prefix: str = "") -> dict:
    """The dotted keys DVC makes columns of: numbers and booleans (lists are skipped)."""
    columns = {}
    for key, value in figures.items():
        if isinstance(value, dict):
            columns.update(shown_columns(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float)):
            columns[f"{prefix}{key}"] = value
    return columns


def evaluate_details(classes: int, rows: int = 200, replicates: int = 1, seed: int = 0) -> dict:
    """evaluate's details as the stage builds them, on random probabilities."""
    rng = np.random.default_rng(seed)
    labels = np.arange(rows) % classes
    runs = [rng.dirichlet(np.ones(classes), size=rows) for _ in range(replicates)]
    names = [f"class_{i}" for i in range(classes)]
    paths = pd.Series([f"{i}.jpg" for i in range(rows)])
    figures = {model: classification_metrics(runs[0], labels, names)
               | leak_free_accuracy(runs[0], labels, paths, {"3.jpg"})
               for model in ("head", "finetuned")}
    figures["finetuned"]["replicates"] = replicate_figures(runs, labels,
                                                           [42 + k for k in range(replicates)])
    return figures


def copies_its_source(path: str, row: dict, details: dict, stage: str) -> None:
    """Each column of a headline row is the figure of `stage`'s details
    `headline.copied_from` names for it."""
    for column, value in row.items():
        file, dotted = headline.copied_from(path, column)
        assert file == f"reports/details/{stage}.json"
        assert headline.figure(details, dotted) == value, (path, column)


@pytest.mark.parametrize("classes", [3, 40])
def test_a_model_row_has_the_same_columns_whatever_the_classes(classes):
    details = evaluate_details(classes)
    rows = headline.model_rows(details)
    assert set(rows) == {"head", "finetuned"}
    for model, row in rows.items():
        assert set(row) == MODEL_COLUMNS
        copies_its_source(f"metrics/models/{model}.json", row, details, "evaluate")
    assert "per_class" in details["head"] and "test_loss" in details["head"]


@pytest.mark.parametrize("count", [1, 3])
def test_the_finetuned_row_shows_the_replicates_sd_only_when_there_is_one(count):
    details = evaluate_details(3, rows=60, replicates=count, seed=1)
    row = headline.model_rows(details)["finetuned"]
    if count == 1:  # no spread to show
        assert set(row) == MODEL_COLUMNS
    else:
        assert set(row) == MODEL_COLUMNS | {"sd"}
        accuracies = [r["test_accuracy"] for r in
                      details["finetuned"]["replicates"]["per_replicate"]]
        assert row["sd"] == pytest.approx(np.std(accuracies, ddof=1))
        copies_its_source("metrics/models/finetuned.json", row, details, "evaluate")


def test_format_crossval_and_audit_rows_copy_their_stage_figures():
    export = {"int8": {"accuracy": 0.8, "macro_f1": 0.79, "agreement": 0.97,
                       "agreement_ci95": [0.9, 1.0], "size_bytes": 728520,
                       "latency_ms": 0.67, "float_layers": 40}}
    row = headline.format_rows(export)["int8"]
    assert row == {"accuracy": 0.8, "macro_f1": 0.79, "agreement": 0.97, "size_mb": 0.72852,
                   "latency_ms": 0.67}
    assert headline.copied_from("metrics/export/int8.json", "agreement") == (
        "reports/details/export.json", "int8.agreement")
    assert headline.copied_from("metrics/export/int8.json", "size_mb") is None  # other units

    crossval = {"val_accuracy_mean": 0.7, "val_accuracy_sd": 0.05, "macro_f1_mean": 0.68,
                "per_fold": {"val_accuracy": [0.7, 0.7]}, "folds": 2}
    row = headline.crossval_row(crossval)
    assert row == {"accuracy": 0.7, "sd": 0.05, "macro_f1": 0.68}
    copies_its_source("metrics/crossval.json", row, crossval, "crossval")

    counts = {"images": 500, "label_issues": 14, "label_agreement": 0.8,
              "near_duplicate_groups": 3, "near_duplicate_images": 7, "cross_split_groups": 2,
              "leaked_test_images": 1, "outliers": 5}
    rows = headline.audit_rows(counts)
    assert rows == {"label_issues": {"images": 14, "agreement": 0.8},
                    "near_duplicates": {"images": 7}, "test_leaks": {"images": 1},
                    "outliers": {"images": 5}}
    for name, row in rows.items():
        copies_its_source(f"metrics/audit/{name}.json", row, counts, "audit")
    assert headline.copied_from("metrics/audit/outliers.json", "agreement") is None


def test_data_rows_count_images_included_and_excluded():
    details = {"classes": 2, "empty_class_folders": 0,
               "images": {"train": {"a": 5, "b": 4, "total": 9},
                          "val": {"a": 2, "b": 1, "total": 3},
                          "test": {"a": 1, "b": 1, "total": 2}},
               "excluded": {"total": 3, "unreadable_images": 2, "cross_class_duplicates": 1}}
    assert headline.data_rows(details) == {"included": {"images": 14, "classes": 2},
                                           "excluded": {"images": 3}}


def test_write_rows_replaces_the_folder_whole(tmp_path):
    folder = tmp_path / "metrics" / "export"
    headline.write_rows(folder, {"float32": {"agreement": 1.0}, "int8": {"agreement": 0.9}})
    headline.write_rows(folder, {"int8": {"agreement": 0.95}})  # float32 no longer exported
    assert sorted(p.name for p in folder.iterdir()) == ["int8.json"]
    assert json.loads((folder / "int8.json").read_text()) == {"agreement": 0.95}


def test_a_gate_finds_a_figure_in_the_details_but_prefers_the_headline():
    shown = {"metrics/models/finetuned.json": {"accuracy": {"old": 0.9, "new": 0.8}},
             "metrics/audit/outliers.json": {"images": {"old": 2, "new": 2}}}
    details = {"reports/details/evaluate.json": {
        "finetuned.test_accuracy": {"old": 0.9, "new": 0.8},
        "finetuned.per_class.roses.recall": {"old": 0.9, "new": 0.5}},
        "reports/details/audit.json": {"images": {"old": 200, "new": 100}}}
    gates = [{"metric": name, "direction": "higher", "tolerance": 0.01}
             for name in ("metrics/models/finetuned.json:accuracy", "finetuned.test_accuracy",
                          "finetuned.per_class.roses.recall", "images")]
    results = check_gates(shown, gates, "main", details)
    assert [(r.metric, r.path, r.status) for r in results] == [
        ("metrics/models/finetuned.json:accuracy", "metrics/models/finetuned.json",
         "regression"),
        ("finetuned.test_accuracy", "reports/details/evaluate.json", "regression"),
        ("finetuned.per_class.roses.recall", "reports/details/evaluate.json", "regression"),
        # in both: only the headline's is gated
        ("images", "metrics/audit/outliers.json", "pass")]


def test_a_gate_on_a_headline_figure_the_base_lacks_compares_its_stage_figure():
    """A base written before the headline held the figure (another layout) still has the
    stage figure it copies: the gate compares that, not "new"."""
    shown = {"metrics/models/finetuned.json": {"accuracy": {"old": None, "new": 0.8}}}
    details = {"reports/details/evaluate.json": {
        "finetuned.test_accuracy": {"old": 0.9, "new": 0.8}}}
    gate = {"metric": "metrics/models/finetuned.json:accuracy", "direction": "higher",
            "tolerance": 0.01}
    [result] = check_gates(shown, [gate], "main", details)
    assert (result.old, result.new, result.status) == (0.9, 0.8, "regression")
    [alone] = check_gates(shown, [gate], "main", {})
    assert alone.status == "new"


@pytest.mark.parametrize("name, path, figure", [
    ("metrics/models/finetuned.json:accuracy", "metrics/models/finetuned.json",
     ("reports/details/evaluate.json", "finetuned.test_accuracy")),
    ("finetuned.macro_f1", "reports/details/evaluate.json",
     ("reports/details/evaluate.json", "finetuned.macro_f1")),
    ("metrics/crossval.json:accuracy", "metrics/crossval.json",
     ("reports/details/crossval.json", "val_accuracy_mean")),
    ("reports/details/crossval.json:macro_f1_mean", "reports/details/crossval.json",
     ("reports/details/crossval.json", "macro_f1_mean")),
    ("label_agreement", "reports/details/audit.json",
     ("reports/details/audit.json", "label_agreement")),
    ("metrics/audit/label_issues.json:agreement", "metrics/audit/label_issues.json",
     ("reports/details/audit.json", "label_agreement")),
    ("metrics/export/int8.json:size_mb", "metrics/export/int8.json",
     ("metrics/export/int8.json", "size_mb")),
])
def test_a_gate_named_by_the_headline_or_the_details_reaches_the_same_paired_test(
        name, path, figure):
    from retrain.report import GateResult, _evaluated_model, stage_figure

    result = GateResult(name, path, "higher", 0.01, 0.9, 0.8)
    assert stage_figure(result) == figure
    assert _evaluated_model(result) == (
        "finetuned" if figure[0].endswith("evaluate.json") else None)


@pytest.mark.parametrize("name", ["metrics/audit/label_issues.json:agreement",
                                  "reports/details/audit.json:label_agreement"])
def test_a_gate_naming_its_file_reads_the_stage_as_off_in_either_file(name):
    shown = {"metrics/audit/label_issues.json": {"enabled": {"old": False, "new": False}}}
    details = {"reports/details/audit.json": {"enabled": {"old": False, "new": False}}}
    gate = {"metric": name, "direction": "higher", "tolerance": 0.01}
    [result] = check_gates(shown, [gate], "main", details)
    assert result.status == "off"
    shown["metrics/audit/label_issues.json"] = {"enabled": {"old": None, "new": False},
                                                "agreement": {"old": 0.8, "new": None}}
    details["reports/details/audit.json"] = {"enabled": {"old": True, "new": False},
                                             "label_agreement": {"old": 0.8, "new": None}}
    [result] = check_gates(shown, [gate], "main", details)
    assert result.status == "turned off" and result.old == 0.8


def test_every_default_gate_names_a_headline_figure_copied_from_a_stage_figure():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for gate in params["report"]["gates"]:
        path, _, column = gate["metric"].rpartition(":")
        assert headline.copied_from(path, column) is not None, gate["metric"]


def widest_rows() -> dict[str, dict]:
    """Every headline row the default pipeline writes (three export formats, replicates, the
    audit on), with figures as wide as they come: 100,000 images, six-digit fractions."""
    details = evaluate_details(40, replicates=3)
    export = {name: {"accuracy": 0.876543, "macro_f1": 0.876543, "agreement": 0.987654,
                     "size_bytes": 98765432, "latency_ms": 123.456789}
              for name in ("float32", "float16", "int8")}
    counts = {"images": 100_000, "label_issues": 12345, "label_agreement": 0.876543,
              "near_duplicate_images": 23456, "leaked_test_images": 3456, "outliers": 1000}
    data = {"classes": 1000, "images": {"train": {"total": 70_000}, "val": {"total": 20_000},
                                        "test": {"total": 10_000}},
            "excluded": {"total": 123_456}}
    crossval = {"val_accuracy_mean": 0.876543, "val_accuracy_sd": 0.0123456,
                "macro_f1_mean": 0.876543}
    rows = {f"{headline.DATA}/{name}.json": row for name, row in
            headline.data_rows(data).items()}
    rows[headline.CROSSVAL] = headline.crossval_row(crossval)
    rows |= {f"{headline.AUDIT}/{name}.json": row
             for name, row in headline.audit_rows(counts).items()}
    rows |= {f"{headline.MODELS}/{name}.json": row
             for name, row in headline.model_rows(details).items()}
    rows |= {f"{headline.EXPORT}/{name}.json": row
             for name, row in headline.format_rows(export).items()}
    return rows


def test_dvc_metrics_show_fits_a_200_column_terminal(tmp_path):
    """The project's metrics declarations (dvc.yaml) over the widest rows the stages write:
    the table DVC prints, header included, fits."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    declared = {stage: {"cmd": "true", "metrics": spec["metrics"]}
                for stage, spec in stages.items() if "metrics" in spec}
    folders = {next(iter(entry)) for spec in declared.values() for entry in spec["metrics"]}
    assert folders == {headline.DATA, headline.CROSSVAL, headline.AUDIT, headline.MODELS,
                       headline.EXPORT}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": declared}))
    for path, row in widest_rows().items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(json.dumps(row))
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path,
                   check=True)
    table = subprocess.run([sys.executable, "-m", "dvc", "metrics", "show"], cwd=tmp_path,
                           check=True, capture_output=True, text=True).stdout.splitlines()
    assert len(table) == 1 + len(widest_rows())  # a header and a row per file
    assert max(map(len, table)) <= TERMINAL_COLUMNS, "\n".join(table)


@pytest.mark.slow
def test_dvc_shows_the_headline_and_the_details_hold_the_rest(pipeline_run):
    ws = pipeline_run
    shown = json.loads(dvc(ws, "metrics", "show", "--json").stdout)[""]["data"]
    rows = {path: shown_columns(entry["data"]) for path, entry in shown.items()}
    # the small profile: one export format (int8), one replicate, the audit on
    assert set(rows) == {"metrics/data/included.json", "metrics/data/excluded.json",
                         "metrics/crossval.json", "metrics/models/head.json",
                         "metrics/models/finetuned.json", "metrics/export/int8.json",
                         *(f"metrics/audit/{name}.json" for name in headline.AUDIT_ROWS)}
    assert set(rows["metrics/models/finetuned.json"]) == MODEL_COLUMNS
    columns = set().union(*rows.values())
    assert columns <= headline.COLUMNS and len(headline.COLUMNS) == 11, columns

    # Every headline figure is a copy of its stage's figure.
    for path, row in rows.items():
        if path.startswith(headline.DATA):
            continue
        for column, value in row.items():
            source = headline.copied_from(path, column)
            if source is None:  # a figure in other units
                assert column in headline.SCALE
                continue
            details = json.loads((ws / source[0]).read_text())
            assert headline.figure(details, source[1]) == value, (path, column)
    data = json.loads((ws / "reports" / "details" / "data.json").read_text())
    assert {f"{headline.DATA}/{name}.json": row for name, row in
            headline.data_rows(data).items()} == {p: r for p, r in rows.items()
                                                   if p.startswith(headline.DATA)}
    evaluate = json.loads((ws / "reports" / "details" / "evaluate.json").read_text())
    assert set(evaluate["finetuned"]["per_class"]) == set(
        (ws / "data" / "manifests" / "classes.txt").read_text().split())
    extract = json.loads((ws / "reports" / "details" / "extract.json").read_text())
    assert extract["images_per_second"] > 0 and extract["base_params"]["total"] > 0

    # The table a user sees: one row per metrics file, the shared columns, no more.
    table = dvc(ws, "metrics", "show").stdout.splitlines()
    assert len(table) == 1 + len(rows)
    assert len(table[0].split()) == 1 + len(columns)
    assert max(map(len, table)) <= TERMINAL_COLUMNS, "\n".join(table)


@pytest.mark.slow
def test_metrics_diff_all_lists_every_headline_figure_within_200_columns(pipeline_run):
    """`dvc metrics diff --all` lists the same figures one per row."""
    ws = pipeline_run
    table = dvc(ws, "metrics", "diff", "--all").stdout.splitlines()
    header, *rows = table
    assert header.split() == ["Path", "Metric", "HEAD", "workspace", "Change"]
    shown = {(path.relative_to(ws).as_posix(), column)
             for path in (ws / "metrics").rglob("*.json")
             for column in shown_columns(json.loads(path.read_text()))}
    assert {tuple(row.split()[:2]) for row in rows} == shown
    assert max(map(len, table)) <= TERMINAL_COLUMNS, "\n".join(table)


@pytest.mark.slow
def test_dvc_exp_show_adds_every_param_and_every_file_dependency(pipeline_run):
    """Why `dvc exp show` is wider than a terminal whatever the headline holds: besides the
    metrics, DVC tabulates the whole params.yaml (keys no stage declares included) and every
    file or folder a stage depends on, and has no setting that hides them."""
    ws = pipeline_run
    workspace_row = json.loads(dvc(ws, "exp", "show", "--json").stdout)[0]["data"]
    params = yaml.safe_load((ws / "params.yaml").read_text())
    assert workspace_row["params"]["params.yaml"]["data"] == params

    stages = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"].values()
    declared = {param.split(".")[0] for stage in stages for param in stage.get("params", [])}
    assert "report" in params and "report" not in declared  # shown all the same
    assert set(workspace_row["deps"]) == {dep for stage in stages for dep in stage["deps"]}
