"""Other transfer-learning jobs through the pipeline, on generated data.

Two runs of every stage but export and card, each a scratch workspace on a custom profile
derived from the small one:
- a binary set (imbalanced 30/15, balanced class weights) trained with the from-scratch
  recipe (random weights, every layer and BatchNorm trainable);
- a 43-class set that class selection cuts to 40 (min_images_per_class, then top_classes),
  with the default fine-tuning (BatchNorm frozen).
Plus every `dvc exp run` line of the README's Use cases section, applied the way DVC applies
`-S` and validated like a stage validates its params.
"""

from __future__ import annotations

import json
import re
import shlex

import keras
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, dvc, run_once_per_session

from retrain.params import load_params
from retrain.prefilter import check_prefilter_params
from retrain.workspace import apply_profile, create_workspace, deep_merge

SMALL = yaml.safe_load((REPO / "profiles" / "small.yaml").read_text())
BINARY_COUNTS = [30, 15]
FORTY_COUNTS = [10] * 40 + [4, 2, 2]  # class_040 loses to top_classes, 041/042 to min K
CARS = [656, 627, 817, 511, 468, 751, 705, 757, 717, 734, 654, 675, 864, 609, 436]


def run_use_case(dest, name: str, generate: dict, params: dict):
    """A workspace on the small profile at 32 px with `params` merged over it, after
    `dvc repro render crossval`: every stage but export and card, which no check here reads
    and the session's full small-profile run covers (about a minute on 2 cores). crossval
    runs though nothing here reads it: its stratified folds are where few images per class
    would fail first."""
    workspace = create_workspace(dest, source=REPO)
    profile = {"generate": {"dest": f"data/generated/{name}.tgz", "size": 32, "seed": 0,
                            **generate},
               "params": deep_merge(SMALL["params"], {"model": {"image_size": 32}, **params})}
    (workspace / "profiles" / f"{name}.yaml").write_text(yaml.safe_dump(profile))
    apply_profile(workspace, name)
    dvc(workspace, "repro", "render", "crossval")
    return workspace


# Session scope: under xdist a worker may run other modules' tests between two tests of
# this one, and a module-scoped run would be torn down and made again. Built once per
# session even if xdist spreads a group's tests over workers (the tests only read it).
@pytest.fixture(scope="session")
def binary_run(tmp_path_factory):
    return run_once_per_session(tmp_path_factory, "binary-run", lambda dest: run_use_case(
        dest, "binary",
        {"classes": 2, "per_class": BINARY_COUNTS},
        {"split": {"test_fraction": 0.25},
         "head": {"class_weights": True},
         "finetune": {"from_layer": 0, "train_batchnorm": True, "epochs": 1}}))


@pytest.fixture(scope="session")
def forty_class_run(tmp_path_factory):
    return run_once_per_session(tmp_path_factory, "forty-class-run", lambda dest: run_use_case(
        dest, "forty",
        {"classes": len(FORTY_COUNTS), "per_class": FORTY_COUNTS},
        {"split": {"test_fraction": 0.2, "min_images_per_class": 3, "top_classes": 40},
         "finetune": {"epochs": 1}}))


def read_json(path):
    return json.loads(path.read_text())


def check_metrics_against_predictions(metrics: dict, table: pd.DataFrame, classes: list[str]):
    """Recompute every test metric from the per-image predictions table, by hand."""
    probabilities = table[[f"prob_{c}" for c in classes]].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-4)
    predicted_probability = table.apply(lambda row: row[f"prob_{row['predicted']}"], axis=1)
    np.testing.assert_allclose(predicted_probability, probabilities.max(axis=1))
    actual, predicted = table["actual"].to_numpy(), table["predicted"].to_numpy()
    assert set(actual) <= set(classes) and set(predicted) <= set(classes)
    recalls, f1s = [], []
    for name in classes:
        tp = int(np.sum((actual == name) & (predicted == name)))
        fp = int(np.sum((actual != name) & (predicted == name)))
        fn = int(np.sum((actual == name) & (predicted != name)))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert metrics["per_class"][name] == pytest.approx(
            {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}), name
        if tp + fn:
            recalls.append(recall)
        f1s.append(f1)
    assert metrics["test_accuracy"] == pytest.approx(np.mean(actual == predicted))
    assert metrics["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    assert metrics["macro_f1"] == pytest.approx(np.mean(f1s))
    picked = probabilities[np.arange(len(table)), [classes.index(a) for a in actual]]
    if picked.min() >= 1e-4:  # the table rounds to 6 decimals
        assert metrics["test_loss"] == pytest.approx(-np.mean(np.log(picked)), abs=1e-3)


def check_evaluation(workspace, classes: list[str]):
    metrics = read_json(workspace / "reports" / "details" / "evaluate.json")
    test = pd.read_csv(workspace / "data" / "manifests" / "test.csv")
    for name, csv in (("head", "predictions_head.csv"), ("finetuned", "predictions.csv")):
        table = pd.read_csv(workspace / "reports" / csv)
        assert list(table["path"]) == list(test["path"])
        assert list(table["actual"]) == list(test["label"])
        assert sorted(metrics[name]["per_class"]) == classes
        check_metrics_against_predictions(metrics[name], table, classes)
    assert (workspace / "reports" / "figures" / "confusion_matrix.png").stat().st_size > 0


def batchnorm_weights(model_path) -> dict[str, list[np.ndarray]]:
    """gamma, beta, moving_mean and moving_variance of every backbone BatchNorm layer."""
    import retrain.base  # noqa: F401  registers the Preprocess layer for loading

    backbone = keras.models.load_model(model_path).get_layer("backbone")
    layers = [layer for layer in backbone.layers
              if isinstance(layer, keras.layers.BatchNormalization)]
    assert layers
    return {kind: [np.asarray(getattr(layer, kind)) for layer in layers]
            for kind in ("gamma", "beta", "moving_mean", "moving_variance")}


# One xdist worker per run (`make test` distributes with --dist loadgroup); xdist hands out
# groups of two or more tests first, so both runs start early instead of ending the suite.
@pytest.mark.xdist_group("binary_run")
def test_binary_set_end_to_end(binary_run):
    classes = ["class_000", "class_001"]
    data = read_json(binary_run / "reports" / "details" / "data.json")
    assert data["classes"] == 2 and data["excluded"]["total"] == 0
    assert sum(data["images"][s]["total"] for s in ("train", "val", "test")) == 45
    assert data["images"]["test"] == {"class_000": 6, "class_001": 3, "total": 9}
    check_evaluation(binary_run, classes)
    head = keras.models.load_model(binary_run / "models" / "head.keras")
    assert head.output_shape == (None, 2)  # the same softmax head, two outputs


@pytest.mark.xdist_group("binary_run")
def test_from_scratch_recipe_trains_every_layer_and_batchnorm(binary_run):
    finetune = read_json(binary_run / "reports" / "details" / "finetune.json")
    assert finetune["from_layer"] == 0
    assert finetune["path"] == "full" and "train_batchnorm" in finetune["reason"]
    # Only BatchNorm moving statistics stay non-trainable when every layer trains.
    weights = batchnorm_weights(binary_run / "models" / "model.keras")
    moving = sum(w.size for w in weights["moving_mean"] + weights["moving_variance"])
    assert finetune["params"]["non_trainable"] == moving
    # Random weights start with gamma 1, beta 0, moving mean 0, moving variance 1: all four
    # moved, so BatchNorm both learned and ran in training mode.
    for kind, start in (("gamma", 1), ("beta", 0), ("moving_mean", 0), ("moving_variance", 1)):
        assert any(not np.allclose(w, start) for w in weights[kind]), kind


@pytest.mark.xdist_group("forty_class_run")
def test_forty_classes_after_class_selection(forty_class_run):
    classes = [f"class_{i:03d}" for i in range(40)]
    data = read_json(forty_class_run / "reports" / "details" / "data.json")
    assert data["classes"] == 40
    assert data["excluded"]["unselected_class"] == 4 + 2 + 2 == data["excluded"]["total"]
    for split in ("train", "val", "test"):
        assert sorted(data["images"][split]) == [*classes, "total"]
    assert sum(data["images"][s]["total"] for s in ("train", "val", "test")) == 400
    assert (forty_class_run / "data" / "manifests" / "classes.txt").read_text().split() \
        == classes
    excluded = pd.read_csv(forty_class_run / "data" / "manifests" / "excluded.csv")
    reasons = excluded.groupby(excluded["path"].str.split("/").str[1])["reason"].first()
    assert reasons.to_dict() == {
        f"class_{i:03d}": f"class not selected ({n} images; split.min_images_per_class=3, "
                          "split.top_classes=40)"
        for i, n in ((40, 4), (41, 2), (42, 2))}
    check_evaluation(forty_class_run, classes)


@pytest.mark.xdist_group("forty_class_run")
def test_default_recipe_keeps_batchnorm_frozen(forty_class_run):
    # Random weights' statistics are unchanged.
    weights = batchnorm_weights(forty_class_run / "models" / "model.keras")
    assert all(np.allclose(w, 0) for w in weights["moving_mean"])
    assert all(np.allclose(w, 1) for w in weights["moving_variance"])


def use_cases_section() -> str:
    """The README from its `## Use cases` heading to the next `## ` heading."""
    readme = (REPO / "README.md").read_text()
    return re.search(r"^## Use cases$(.*?)(?=^## )", readme, flags=re.MULTILINE | re.DOTALL)[1]


def documented_runs() -> dict[str, list[str]]:
    """Experiment name -> `-S` overrides, for each `dvc exp run` line of the Use cases."""
    text = use_cases_section().replace("\\\n", " ")
    runs = {}
    for line in re.findall(r"^dvc exp run .*$", text, flags=re.MULTILINE):
        words = shlex.split(line.replace("$SHA256", "0" * 64))
        name = words[words.index("-n") + 1]
        runs[name] = [words[i + 1] for i, word in enumerate(words) if word == "-S"]
    return runs


@pytest.mark.parametrize("overrides", [pytest.param(overrides, id=name)
                                       for name, overrides in documented_runs().items()])
def test_documented_recipes_pass_params_validation(overrides, tmp_path, monkeypatch):
    from dvc.utils.hydra import apply_overrides

    monkeypatch.chdir(tmp_path)
    (tmp_path / "classifiers").mkdir()
    (tmp_path / "classifiers" / "imagenet-mobilenet-v2.keras").write_bytes(b"")
    (tmp_path / "params.yaml").write_bytes((REPO / "params.yaml").read_bytes())
    apply_overrides("params.yaml", overrides)
    params = load_params("params.yaml")  # model.* combinations included
    check_prefilter_params(params["prefilter"])
    set_keys = {o.split("=", 1)[0] for o in overrides}
    assert {"data.url", "data.sha256"} <= set_keys
    if params["prefilter"]["enabled"]:
        assert params["prefilter"]["imagenet_classes"] == CARS
    if params["model"]["weights"] == "none":  # the from-scratch baseline
        assert params["finetune"]["from_layer"] == 0 and params["finetune"]["train_batchnorm"]


def test_every_use_case_is_documented():
    runs = documented_runs()
    assert {"cars", "cats-vs-dogs", "my-3-classes", "my-3-classes-scratch"} <= set(runs)
    assert "prefilter.threshold=0.1" in runs["cars"]
    assert "head.class_weights=true" in runs["my-3-classes"]
    text = use_cases_section()
    for heading in ("car models", "Cats vs dogs", "three-class", "From-scratch"):
        assert re.search(rf"^### .*{heading}", text, flags=re.MULTILINE), heading
