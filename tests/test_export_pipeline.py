"""The `export` and `card` stages in the small-profile pipeline: metrics DVC shows and a gate
can check, a card that matches the workspace, the serving signatures against `evaluate`, and
(What an `export.*` change re-runs, and a gate on an export figure: test_experiments.)"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import dvc

from retrain.card import file_sha256

pytestmark = pytest.mark.slow

EXPORT_KEYS = {"accuracy", "macro_f1", "agreement", "agreement_ci95", "max_prob_diff",
               "size_bytes", "latency_ms", "images", "test_images", "held_out_images"}


def test_export_metrics_and_card_describe_the_workspace(pipeline_run):
    from retrain.export import FILES, short_layer_name
    from retrain.litert import float_layer_names

    ws = pipeline_run
    params = yaml.safe_load((ws / "params.yaml").read_text())
    export = json.loads((ws / "reports" / "details" / "export.json").read_text())
    assert list(export) == params["export"]["formats"]
    sizes = {s: len(pd.read_csv(ws / "data" / "manifests" / f"{s}.csv")) for s in
             ("train", "val", "test")}
    for name, entry in export.items():
        assert set(entry) - {"float_layers", "float_layers_through"} == EXPORT_KEYS, name
        assert 0 <= entry["agreement"] <= 1 and 0 <= entry["accuracy"] <= 1
        low, high = entry["agreement_ci95"]
        assert low <= entry["agreement"] <= high
        # the small profile holds fewer held-out images than the sample: all measured
        assert entry["images"] == entry["held_out_images"] == sizes["val"] + sizes["test"]
        assert entry["test_images"] == sizes["test"]
    # As many layers from the input as the size budget allows, at most the count asked.
    assert 0 < export["int8"]["float_layers"] <= params["export"]["int8_float_layers"]
    kept = float_layer_names(ws / "models" / "tflite" / FILES["int8"])  # the file it shipped
    assert export["int8"]["float_layers"] == len(kept)
    assert export["int8"]["float_layers_through"] == short_layer_name(kept[-1])
    shown = json.loads(dvc(ws, "metrics", "show", "--json").stdout)
    shown = shown[""]["data"]  # DVC knows each format's row as a metrics file
    assert {f"metrics/export/{name}.json" for name in export} <= set(shown)

    card = json.loads((ws / "models" / "model_card.json").read_text())
    assert card["classes"] == (ws / "data" / "manifests" / "classes.txt").read_text().split()
    assert card["dataset"]["sha256"] == params["data"]["sha256"]
    assert card["dataset"]["split_sizes"] == sizes
    evaluate = json.loads((ws / "metrics" / "models" / "finetuned.json").read_text())
    assert card["test_metrics"]["test_accuracy"] == evaluate["accuracy"]
    assert card["formats"] == export
    for name, digest in card["files"].items():
        assert file_sha256(ws / "models" / name) == digest, name
    card_text = (ws / "models" / "model_card.md").read_text()
    assert card_text.startswith("# Model card")
    int8_row = next(line for line in card_text.splitlines() if line.startswith("| int8 |"))
    assert int8_row.endswith(f"| {len(kept)} (through {short_layer_name(kept[-1])}) |")
    assert card["training"]["seed"] == params["seed"]  # the recipe of this workspace's run
    assert card["training"]["finetune"]["from_layer"] == params["finetune"]["from_layer"]
    assert card["training"]["finetune"]["augment"] == params["finetune"]["augment"]
    audit = json.loads((ws / "reports" / "details" / "audit.json").read_text())
    assert card["dataset"]["audit"]["label_agreement"] == audit["label_agreement"]
    assert card["dataset"]["audit"]["label_issues"] == audit["label_issues"]
    assert "- data audit (`reports/audit/`): labels agree on" in (
        ws / "models" / "model_card.md").read_text()


def test_predict_takes_the_class_names_from_the_card(pipeline_run):
    ws = pipeline_run
    test = pd.read_csv(ws / "data" / "manifests" / "test.csv")
    predictions = pd.read_csv(ws / "reports" / "predictions.csv")
    image = ws / "data" / "raw" / test["path"][0]
    tflite = ws / "models" / "tflite" / "model_int8.tflite"
    # Run from another folder: no data/manifests/classes.txt to fall back on.
    result = subprocess.run([sys.executable, "-m", "retrain", "predict", str(image), "--json",
                             "--model", str(tflite)], capture_output=True, text=True,
                            cwd=ws.parent)
    assert result.returncode == 0, result.stderr
    top = json.loads(result.stdout)["top"]
    classes = (ws / "data" / "manifests" / "classes.txt").read_text().split()
    assert top[0]["class"] in classes
    assert predictions["path"][0] == test["path"][0]


def test_bytes_signature_gives_the_top1_of_evaluate(pipeline_run):
    """TF Serving's view: JPEG bytes through tf.saved_model.load, against evaluate's CSV."""
    import tensorflow as tf

    from retrain.serving import BYTES_SIGNATURE

    ws = pipeline_run
    predictions = pd.read_csv(ws / "reports" / "predictions.csv")
    loaded = tf.saved_model.load(str(ws / "models" / "serving"))
    encoded = tf.constant([(ws / "data" / "raw" / p).read_bytes() for p in predictions["path"]])
    outputs = loaded.signatures[BYTES_SIGNATURE](image_bytes=encoded)
    probabilities = next(iter(outputs.values())).numpy()
    classes = [column.removeprefix("prob_") for column in predictions.filter(like="prob_")]
    served = [classes[i] for i in probabilities.argmax(axis=1)]
    assert served == predictions["predicted"].tolist()
    expected = predictions.filter(like="prob_").to_numpy()
    assert np.abs(probabilities - expected).max() < 1e-3

