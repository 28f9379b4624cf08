"""The headline view: DVC shows the figures people compare; every other figure a stage
measured is in its details file, where the model card and report gates still find it."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import dvc

from retrain.evaluate import classification_metrics, leak_free_accuracy, replicate_figures
from retrain.headline import HEADLINE, data_headline, evaluate_headline, select
from retrain.report import check_gates

# What `dvc metrics show` shows per file on the small profile (one export format, int8).
SMALL_PROFILE_COLUMNS = {
    "metrics/data.json": {"classes", "images", "excluded"},
    "metrics/crossval.json": {"val_accuracy_mean", "val_accuracy_sd"},
    "metrics/evaluate.json": {f"{model}.{key}" for model in ("head", "finetuned") for key in (
        "test_loss", "test_accuracy", "test_accuracy_ci95_low", "test_accuracy_ci95_high",
        "macro_f1", "balanced_accuracy", "leak_free_test_accuracy")},
    "metrics/export.json": {"int8.agreement", "int8.size_bytes", "int8.latency_ms"},
}
# Added by the data audit (counts); whatever it holds must stay a handful of columns.
AUDIT = "metrics/audit.json"


def shown_columns(figures: dict, prefix: str = "") -> dict:
    """The dotted keys DVC makes columns of: numbers and booleans (lists are skipped)."""
    columns = {}
    for key, value in figures.items():
        if isinstance(value, dict):
            columns.update(shown_columns(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float)):
            columns[f"{prefix}{key}"] = value
    return columns


def test_select_keeps_matching_keys_in_their_nesting():
    figures = {"a": 1, "b": {"x": 2, "y": 3}, "c": {"x": 4, "z": {"x": 5}}, "d": [1, 2]}
    assert select(figures, ("a", "*.x")) == {"a": 1, "b": {"x": 2}, "c": {"x": 4}}
    assert select(figures, ("d", "c.z")) == {"d": [1, 2], "c": {"z": {"x": 5}}}
    assert select(figures, ("nothing",)) == {}


@pytest.mark.parametrize("classes", [3, 40])
def test_the_evaluate_headline_does_not_grow_with_the_classes(classes):
    rng = np.random.default_rng(0)
    labels = np.arange(200) % classes
    probabilities = rng.dirichlet(np.ones(classes), size=200)
    names = [f"class_{i}" for i in range(classes)]
    paths = pd.Series([f"{i}.jpg" for i in range(200)])
    figures = {model: classification_metrics(probabilities, labels, names)
               | leak_free_accuracy(probabilities, labels, paths, {"3.jpg"})
               for model in ("head", "finetuned")}
    headline = select(figures, HEADLINE["evaluate"])
    assert set(shown_columns(headline)) == SMALL_PROFILE_COLUMNS["metrics/evaluate.json"]
    # the same values, and the intervals as lists for whoever reads the file
    assert shown_columns(headline).items() <= shown_columns(figures).items()
    assert headline["finetuned"]["macro_f1_ci95"] == figures["finetuned"]["macro_f1_ci95"]
    assert "per_class" in figures["head"] and "test_loss" in figures["head"]


@pytest.mark.parametrize("count", [1, 3])
def test_the_evaluate_headline_shows_the_replicates_spread_only_when_there_is_one(count):
    rng = np.random.default_rng(1)
    labels = np.arange(60) % 3
    runs = [rng.dirichlet(np.ones(3), size=60) for _ in range(count)]
    paths = pd.Series([f"{i}.jpg" for i in range(60)])
    figures = {model: classification_metrics(runs[0], labels, ["a", "b", "c"])
               | leak_free_accuracy(runs[0], labels, paths, set())
               for model in ("head", "finetuned")}
    figures["finetuned"]["replicates"] = replicate_figures(runs, labels, [42 + k for k in
                                                                          range(count)])
    headline = evaluate_headline(figures)
    extra = set(shown_columns(headline)) - SMALL_PROFILE_COLUMNS["metrics/evaluate.json"]
    if count == 1:  # no spread to show, and a mean that is test_accuracy again
        assert extra == set()
    else:
        assert extra == {"finetuned.replicates.count", "finetuned.replicates.test_accuracy_mean",
                         "finetuned.replicates.test_accuracy_sd"}
        accuracies = [row["test_accuracy"] for row in
                      figures["finetuned"]["replicates"]["per_replicate"]]
        assert headline["finetuned"]["replicates"]["test_accuracy_sd"] == pytest.approx(
            np.std(accuracies, ddof=1))


def test_data_headline_counts_images_classes_and_exclusions():
    details = {"classes": 2, "empty_class_folders": 0,
               "images": {"train": {"a": 5, "b": 4, "total": 9},
                          "val": {"a": 2, "b": 1, "total": 3},
                          "test": {"a": 1, "b": 1, "total": 2}},
               "excluded": {"total": 3, "unreadable_images": 2, "cross_class_duplicates": 1}}
    assert data_headline(details) == {"classes": 2, "images": 14, "excluded": 3}


def test_a_gate_finds_a_figure_in_the_details_but_prefers_the_headline():
    headline = {"metrics/evaluate.json": {"finetuned.test_accuracy": {"old": 0.9, "new": 0.8}}}
    details = {"reports/details/evaluate.json": {
        "finetuned.test_accuracy": {"old": 0.9, "new": 0.8},
        "finetuned.per_class.roses.recall": {"old": 0.9, "new": 0.5}}}
    gates = [{"metric": name, "direction": "higher", "tolerance": 0.01}
             for name in ("finetuned.test_accuracy", "finetuned.per_class.roses.recall")]
    results = check_gates(headline, gates, "main", details)
    assert [(r.metric, r.path, r.status) for r in results] == [
        ("finetuned.test_accuracy", "metrics/evaluate.json", "regression"),
        ("finetuned.per_class.roses.recall", "reports/details/evaluate.json", "regression")]


@pytest.mark.slow
def test_dvc_shows_the_headline_and_the_details_hold_the_rest(pipeline_run):
    ws = pipeline_run
    shown = json.loads(dvc(ws, "metrics", "show", "--json").stdout)[""]["data"]
    columns = {path: set(shown_columns(entry["data"])) for path, entry in shown.items()}
    audit = columns.pop(AUDIT, set())
    assert columns == SMALL_PROFILE_COLUMNS
    assert len(audit) <= 6, audit

    # `dvc exp show` has the same metric columns
    experiments = json.loads(dvc(ws, "exp", "show", "--json").stdout)
    metrics = experiments[0]["data"]["metrics"]  # the workspace row
    assert {path: set(shown_columns(entry["data"])) for path, entry in metrics.items()
            if path != AUDIT} == SMALL_PROFILE_COLUMNS

    # Every headline figure is its stage's figure, and the details hold the rest.
    for path in SMALL_PROFILE_COLUMNS:
        stage = path.split("/")[-1]
        headline = json.loads((ws / path).read_text())
        details = json.loads((ws / "reports" / "details" / stage).read_text())
        if stage == "data.json":
            assert headline == data_headline(details)
        else:
            assert shown_columns(headline).items() <= shown_columns(details).items(), stage
    evaluate = json.loads((ws / "reports" / "details" / "evaluate.json").read_text())
    assert set(evaluate["finetuned"]["per_class"]) == set(
        (ws / "data" / "manifests" / "classes.txt").read_text().split())
    extract = json.loads((ws / "reports" / "details" / "extract.json").read_text())
    assert extract["images_per_second"] > 0 and extract["base_params"]["total"] > 0

    # The table a user sees: one row per metrics file, the headline's columns, no more.
    table = dvc(ws, "metrics", "show").stdout.splitlines()
    assert len(table[0].split()) == 1 + sum(map(len, SMALL_PROFILE_COLUMNS.values())) + len(
        audit)


# The terminal width the headline is read in.
TERMINAL_COLUMNS = 200


@pytest.mark.slow
def test_metrics_diff_all_lists_every_headline_figure_within_200_columns(pipeline_run):
    """`dvc metrics show` makes a column of every figure of every metrics file (too wide for a
    terminal); `dvc metrics diff --all` lists the same figures one per row."""
    ws = pipeline_run
    table = dvc(ws, "metrics", "diff", "--all").stdout.splitlines()
    header, *rows = table
    assert header.split() == ["Path", "Metric", "HEAD", "workspace", "Change"]
    headline = {(path.relative_to(ws).as_posix(), column)
                for path in (ws / "metrics").glob("*.json")
                for column in shown_columns(json.loads(path.read_text()))}
    assert {tuple(row.split()[:2]) for row in rows} == headline
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
