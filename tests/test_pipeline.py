"""The whole pipeline on the small profile: outputs, metrics, plots and the predict command."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import dvc
from PIL import Image
from sklearn.metrics import classification_report

pytestmark = pytest.mark.slow

FIGURES = ("confusion_matrix.png", "cam_correct.png", "cam_misclassified.png",
           "feature_channels.png", "learning_curves.png", "samples.png", "predictions.png")


def read_json(path):
    return json.loads(path.read_text())


def test_every_stage_wrote_its_outputs(pipeline_run):
    ws = pipeline_run
    status = dvc(ws, "status", "--json").stdout
    assert json.loads(status) == {}, status
    for split in ("train", "val", "test"):
        features = np.load(ws / "data" / "features" / f"{split}.npy")
        manifest = pd.read_csv(ws / "data" / "manifests" / f"{split}.csv")
        assert features.dtype == np.float32 and len(features) == len(manifest)
    extract = read_json(ws / "reports" / "details" / "extract.json")
    assert extract["base_params"]["trainable"] == 0
    assert extract["feature_map_shape"][-1] == extract["feature_size"]
    finetune = read_json(ws / "reports" / "details" / "finetune.json")
    assert 0 < finetune["params"]["trainable"] < finetune["params"]["total"]
    # How the model was made: auto precision on this CPU machine.
    assert (finetune["device"], finetune["precision"], finetune["replicas"]) == (
        "CPU", "float32", 1)
    assert finetune["train_images_per_second"] > 0
    # ResNet50V2 from its last stage: only the layers above the frozen ones train, on the
    # frozen part's outputs (LiteRT here).
    assert finetune["path"] == "cached" and finetune["cut"], finetune
    assert (ws / "models" / "serving" / "saved_model.pb").exists()
    assert not list(ws.rglob(".tmp-*")), "temporary outputs were left behind"


def test_the_model_learned_the_generated_classes(pipeline_run):
    head = read_json(pipeline_run / "metrics" / "models" / "head.json")
    classes = len((pipeline_run / "data" / "manifests" / "classes.txt").read_text().split())
    assert head["accuracy"] > 2 / classes  # chance is 1 / classes


@pytest.mark.parametrize("name, csv", [("finetuned", "predictions.csv"),
                                       ("head", "predictions_head.csv")])
def test_metrics_agree_with_the_predictions_csv(pipeline_run, name, csv):
    metrics = read_json(pipeline_run / "reports" / "details" / "evaluate.json")[name]
    table = pd.read_csv(pipeline_run / "reports" / csv)
    test = pd.read_csv(pipeline_run / "data" / "manifests" / "test.csv")
    assert table["path"].tolist() == test["path"].tolist()
    assert table["actual"].tolist() == test["label"].tolist()
    accuracy = (table["actual"] == table["predicted"]).mean()
    assert abs(accuracy - metrics["test_accuracy"]) < 1e-9
    probabilities = table.filter(like="prob_").to_numpy()
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-4)
    report = classification_report(table["actual"], table["predicted"], output_dict=True,
                                   zero_division=0)
    for label, figures in metrics["per_class"].items():
        assert figures["precision"] == pytest.approx(report[label]["precision"], abs=1e-12)
        assert figures["recall"] == pytest.approx(report[label]["recall"], abs=1e-12)
        assert figures["f1"] == pytest.approx(report[label]["f1-score"], abs=1e-12)
        assert figures["support"] == report[label]["support"]
    assert metrics["macro_f1"] == pytest.approx(report["macro avg"]["f1-score"], abs=1e-12)


@pytest.mark.parametrize("name", FIGURES)
def test_every_figure_is_a_sensible_png(pipeline_run, name):
    with Image.open(pipeline_run / "reports" / "figures" / name) as img:
        assert img.format == "PNG"
        assert 300 <= img.width <= 6000 and 200 <= img.height <= 6000
        assert np.asarray(img.convert("L")).std() > 5  # not a blank canvas


def test_plots_show_names_every_declared_plot(pipeline_run, tmp_path):
    dvc(pipeline_run, "plots", "show", "--out", str(tmp_path / "plots"))
    html = (tmp_path / "plots" / "index.html").read_text()
    # Every plot declared in dvc.yaml, by its title or (for image plots) its file name.
    for expected in ("Confusion matrix, fine-tuned model", "Confusion matrix, head",
                     "Loss per epoch", "Accuracy per epoch", "dvclive_head_plots_metrics",
                     "dvclive_finetune_plots_metrics", *FIGURES):
        assert expected in html, expected


def test_predict_command_matches_the_model(pipeline_run):
    import keras

    import retrain.base  # noqa: F401  registers the Preprocess layer
    from retrain.images import load_image

    ws = pipeline_run
    test = pd.read_csv(ws / "data" / "manifests" / "test.csv")
    images = [str(ws / "data" / "raw" / p) for p in test["path"][:3]]
    broken = ws.parent / "broken.jpg"
    broken.write_text("not a photo")
    result = subprocess.run(
        [sys.executable, "-m", "retrain", "predict", *images, str(broken), "--json",
         "--top-k", "2", "--model", str(ws / "models" / "model.keras"),
         "--classes", str(ws / "data" / "manifests" / "classes.txt")],
        capture_output=True, text=True)
    assert result.returncode == 1  # one file failed...
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {broken}")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["path"] for line in lines] == images  # ...and the others still printed
    model = keras.models.load_model(ws / "models" / "model.keras")
    classes = (ws / "data" / "manifests" / "classes.txt").read_text().splitlines()
    size = model.input.shape[1]
    for line, path in zip(lines, images):
        expected = model.predict(load_image(path, size)[None].astype("float32"), verbose=0)[0]
        top = line["top"]
        assert len(top) == 2 and top[0]["probability"] >= top[1]["probability"]
        for entry in top:
            assert entry["probability"] == pytest.approx(
                float(expected[classes.index(entry["class"])]), abs=1e-5)


@pytest.mark.parametrize("model, classes, message", [
    ("models/serving", None, r"models/serving: not a saved Keras model \("),
    ("models/head.keras", None, r"models/head.keras: takes inputs of shape \(None, \d+\), not "
                                r"RGB images"),
    (None, "data/manifests", r"data/manifests: cannot read the class list \(Is a directory\)"),
], ids=["savedmodel folder", "head", "classes folder"])
def test_predict_with_the_wrong_file_is_one_clear_error(pipeline_run, model, classes, message):
    from retrain.errors import UserError
    from retrain.predict import main

    ws = pipeline_run
    image = ws / "data" / "raw" / pd.read_csv(ws / "data" / "manifests" / "test.csv")["path"][0]
    args = [str(image), "--model", str(ws / (model or "models/model.keras")),
            "--classes", str(ws / (classes or "data/manifests/classes.txt"))]
    with pytest.raises(UserError, match=message) as info:
        main(args)
    assert "\n" not in str(info.value)


@pytest.mark.xdist_group("real_flowers_run")
def test_fine_tuning_on_real_photos_keeps_what_the_head_learned(real_flowers_run):
    """On 80 real test photos (5 classes), both models are far above chance, and fine-tuning
    does not lose accuracy beyond noise: McNemar's exact test on the photos where the two
    models disagree, one-sided (is the fine-tuned model worse?), must not reject at 1%."""
    from scipy.stats import binomtest

    ws = real_flowers_run
    correct = {}
    for name, csv in (("finetuned", "predictions.csv"), ("head", "predictions_head.csv")):
        table = pd.read_csv(ws / "reports" / csv)
        correct[name] = (table["actual"] == table["predicted"]).to_numpy()
    classes = len((ws / "data" / "manifests" / "classes.txt").read_text().split())
    tested = len(correct["head"])
    assert classes == 5 and tested >= 60
    for name, right in correct.items():
        # 99% Clopper-Pearson interval of the accuracy: its low end clears 2x chance
        low = binomtest(int(right.sum()), tested).proportion_ci(0.99).low
        assert low > 2 / classes, f"{name}: {right.mean():.3f} on {tested} photos, low {low:.3f}"
    only_head = int((correct["head"] & ~correct["finetuned"]).sum())
    only_finetuned = int((~correct["head"] & correct["finetuned"]).sum())
    if only_head + only_finetuned:
        worse = binomtest(only_head, only_head + only_finetuned, 0.5, alternative="greater")
        assert worse.pvalue > 0.01, (f"fine-tuning lost accuracy: {only_head} photos only the "
                                     f"head got right, {only_finetuned} only the fine-tuned "
                                     f"model (p = {worse.pvalue:.4f})")
