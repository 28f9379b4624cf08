"""Cross-validation of the head recipe: folds that respect identical images, figures that
reproduce for a seed, an off switch, and the stage's output on the pipeline."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import REPO

from retrain.crossval import (
    ReusedHead,
    cross_validate_head,
    early_stopping_split,
    fold_indices,
    fold_scores,
    score_fold,
)

HEAD = {"dropout": 0.2, "learning_rate": 0.05, "epochs": 3, "batch_size": 16,
        "class_weights": False, "early_stopping_patience": 0}


def separable_features(rows: int = 60, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.arange(rows) % classes
    features = rng.normal(size=(rows, 8)).astype("float32")
    features[np.arange(rows), labels] += 4  # a learnable signal, not a perfect one
    return features, labels


def test_folds_cover_every_row_once_per_repeat_and_keep_copies_together():
    labels = np.repeat([0, 1], 10)
    digests = np.array([f"img{i}" for i in range(20)])
    digests[1] = digests[0]  # a byte-identical pair within class 0
    folds = fold_indices(labels, digests, folds=5, repeats=2, seed=0)
    assert len(folds) == 10
    for repeat in (folds[:5], folds[5:]):
        held_out = np.concatenate([val for _, val in repeat])
        assert sorted(held_out) == list(range(20))
    for train, val in folds:
        assert not set(train) & set(val)
        assert ({0, 1} <= set(val)) or ({0, 1} <= set(train))  # the pair is never split
        assert sorted(np.bincount(labels[val], minlength=2)) in ([2, 2], [1, 2], [2, 3])
    assert [v.tolist() for _, v in folds[:5]] != [v.tolist() for _, v in folds[5:]]


def test_early_stopping_watches_part_of_the_training_rows_never_the_scored_fold():
    labels = np.repeat([0, 1, 2], 20)
    digests = np.array([f"img{i}" for i in range(60)])
    digests[1] = digests[0]  # a byte-identical pair within class 0
    for index, (train, val) in enumerate(fold_indices(labels, digests, 3, 1, seed=0)):
        fit, watched = early_stopping_split(train, labels, digests, seed=index)
        assert sorted(np.concatenate([fit, watched])) == sorted(train)
        assert not set(fit) & set(watched) and not set(watched) & set(val)
        assert set(labels[watched]) == {0, 1, 2}  # stratified: every class watched
        assert 0.15 <= len(watched) / len(train) <= 0.25
        assert not ({0, 1} & set(watched) and {0, 1} & set(fit))  # the pair stays together


def test_early_stopping_on_too_few_images_names_the_param():
    from retrain.errors import DataError

    labels, digests = np.repeat([0, 1], 3), np.array([f"img{i}" for i in range(6)])
    with pytest.raises(DataError, match="head.early_stopping_patience"):
        early_stopping_split(np.arange(6), labels, digests, seed=0)


@pytest.mark.slow
def test_cross_validation_is_deterministic_for_a_seed():
    features, labels = separable_features()
    digests = np.array([f"img{i}" for i in range(len(labels))])

    def run(seed):
        return cross_validate_head(features, labels, digests, 3, HEAD, folds=2, repeats=1,
                                   seed=seed)

    first = run(seed=3)
    assert run(seed=3) == first
    assert run(seed=4)["per_fold"] != first["per_fold"]
    assert len(first["per_fold"]["val_accuracy"]) == 2
    assert first["val_accuracy_mean"] > 0.6  # chance is 1/3
    assert first["val_accuracy_sd"] == pytest.approx(
        np.std(first["per_fold"]["val_accuracy"], ddof=1), abs=1e-6)


@pytest.mark.slow
def test_a_fold_scores_as_a_fresh_head_whatever_folds_ran_before_it():
    """The reused head restarts each fold as the train_head stage's fresh head: weights,
    dropout seed, optimizer state, early stopping (on its inner split) and class weights
    included."""
    import keras

    from retrain.head import build_head, train_head
    from retrain.reproducibility import make_deterministic
    from retrain.training import balanced_class_weights

    features, labels = separable_features()
    labels[:12] = 0  # imbalanced, so the class weights are not all 1
    recipe = {**HEAD, "class_weights": True, "early_stopping_patience": 1}
    digests = np.array([f"img{i}" for i in range(len(labels))])
    splits = fold_indices(labels, digests, folds=3, repeats=1, seed=7)
    reused = ReusedHead(features.shape[1], 3, recipe)
    inner = [early_stopping_split(train, labels, digests, 7 + index)
             for index, (train, _) in enumerate(splits)]
    in_order = [score_fold(reused, features, labels, fit, val, 7 + index, watched)
                for index, ((fit, watched), (_, val)) in enumerate(zip(inner, splits))]

    (fit, watched), (_, val) = inner[2], splits[2]
    keras.backend.clear_session()
    make_deterministic(9)
    fresh = build_head(features.shape[1], 3, recipe["dropout"], 9)
    train_head(fresh, (features[fit], labels[fit]), (features[watched], labels[watched]),
               learning_rate=recipe["learning_rate"], epochs=recipe["epochs"],
               batch_size=recipe["batch_size"], patience=1, verbose=0,
               class_weight=balanced_class_weights(labels[fit], 3))
    predicted = keras.ops.convert_to_numpy(fresh(features[val], training=False)).argmax(1)
    assert in_order[2] == pytest.approx(fold_scores(labels[val], predicted), abs=1e-6)
    for trained, expected in zip(reused.model.get_weights(), fresh.get_weights(), strict=True):
        np.testing.assert_allclose(trained, expected, atol=1e-6)
    assert in_order[2] != in_order[1]


def test_zero_folds_writes_a_file_saying_crossval_is_off(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["crossval"]["folds"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(REPO / "stages", tmp_path / "stages")
    result = subprocess.run(
        [sys.executable, "stages/crossval.py", "--features", "absent", "--manifests", "absent",
         "--metrics", "metrics/crossval.json", "--details", "details/crossval.json"],
        cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "crossval: off" in result.stdout
    assert json.loads((tmp_path / "metrics" / "crossval.json").read_text()) == {
        "enabled": False}
    written = json.loads((tmp_path / "details" / "crossval.json").read_text())
    assert written == {"enabled": False, "folds": 0, "repeats": params["crossval"]["repeats"],
                       "seed": params["crossval"]["seed"]}


@pytest.mark.slow
def test_pipeline_cross_validates_train_and_val_only(pipeline_run):
    params = yaml.safe_load((pipeline_run / "params.yaml").read_text())["crossval"]
    metrics = json.loads((pipeline_run / "reports" / "details" / "crossval.json").read_text())
    assert (metrics["folds"], metrics["repeats"]) == (params["folds"], params["repeats"])
    for name in ("val_accuracy", "macro_f1"):
        values = metrics["per_fold"][name]
        assert len(values) == params["folds"] * params["repeats"]
        assert metrics[f"{name}_mean"] == pytest.approx(np.mean(values), abs=1e-6)
        assert 0 <= metrics[f"{name}_sd"] <= 1
    classes = len((pipeline_run / "data" / "manifests" / "classes.txt").read_text().split())
    assert metrics["val_accuracy_mean"] > 1.5 / classes  # chance is 1 / classes


def test_the_folds_digest_names_the_folds_and_changes_with_the_labels_or_the_seed():
    """`report` pairs two crossval runs fold by fold only when they ran the same folds."""
    from retrain.crossval import fold_indices, folds_digest

    labels = np.repeat(np.arange(3), 10)
    digests = np.array([f"{i:064x}" for i in range(30)])

    def digest(labels, seed):
        return folds_digest(fold_indices(labels, digests, 5, 2, seed), digests)

    relabelled = labels.copy()
    relabelled[[0, 1]] = 2
    assert digest(labels, 42) == digest(labels.copy(), 42)
    assert digest(labels, 42) != digest(labels, 7)
    assert digest(labels, 42) != digest(relabelled, 42)
