"""The prefilter, against a tiny real Keras classifier whose weights the test sets.

The classifier averages the pixels and feeds the mean red value r to a 1000-way softmax in
which only a few ImageNet classes (`weighted`) have a non-zero weight a, so each class's
probability for a solid colour image is known exactly: e^(a r) / Z for a weighted class,
1 / Z for any other, with Z = w e^(a r) + 1000 - w for w weighted classes.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import zipfile

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO
from PIL import Image

from retrain.errors import DataError, DownloadError, ParamsError
from retrain.manifests import build_manifests, data_metrics
from retrain.params import validate
from retrain.prefilter import (
    check_prefilter_params,
    imagenet_classifier,
    load_prefilter_model,
    make_prefilter,
    prefilter_scores,
)

SLOPE = 0.05  # logit per unit of mean red
CARS = [656, 627, 817, 511, 468, 751, 705, 757, 717, 734, 654, 675, 864, 609, 436]
REDS = [0, 80, 100, 130, 160, 190, 220, 255]  # 0 and 80 score below 0.1 for one class
SPLIT = {"val_fraction": 0.3, "test_fraction": 0.3, "seed": 0}
DEFAULTS = yaml.safe_load((REPO / "params.yaml").read_text())


def expected_score(red: float, weighted=(656,), chosen=(656,)) -> float:
    e = math.exp(SLOPE * red)
    hits = len(set(weighted) & set(chosen))
    return (hits * e + len(set(chosen)) - hits) / (len(weighted) * e + 1000 - len(weighted))


def save_classifier(path, classes, size=8):
    import keras

    pixels = keras.Input((size, size, 3))
    mean = keras.layers.GlobalAveragePooling2D()(pixels)
    model = keras.Model(pixels, keras.layers.Dense(1000, activation="softmax")(mean))
    kernel = np.zeros((3, 1000), np.float32)
    kernel[0, classes] = SLOPE
    model.layers[-1].set_weights([kernel, np.zeros(1000, np.float32)])
    model.save(path)
    return path


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """Scores images by mean red, through ImageNet class 656 (minivan)."""
    return save_classifier(tmp_path_factory.mktemp("model") / "red.keras", [656])


@pytest.fixture
def red_tree(tmp_path):
    """raw/set/<class>/*.png: 3 classes x 8 solid colours, red from REDS, distinct green."""
    root = tmp_path / "raw" / "set"
    for c in range(3):
        (root / f"class_{c}").mkdir(parents=True)
        for i, red in enumerate(REDS):
            Image.new("RGB", (16, 16), (red, 10 * c + i, 0)).save(root / f"class_{c}/{i}.png")
    return tmp_path / "raw"


def prefilter_params(model, classes=(656,), threshold=0.1):
    return {"enabled": True, "imagenet_classes": list(classes), "threshold": threshold,
            "model": str(model)}


def test_scores_are_the_summed_probability_of_the_chosen_classes(tmp_path, red_tree):
    two = save_classifier(tmp_path / "two.keras", [656, 627])
    model = load_prefilter_model(str(two))
    paths = [red_tree / "set" / "class_0" / f"{i}.png" for i in range(len(REDS))]
    for chosen in ([656], [656, 627], [627, 656, 656], [1, 2], CARS):
        np.testing.assert_allclose(prefilter_scores(paths, model, chosen, batch_size=3),
                                   [expected_score(r, (656, 627), chosen) for r in REDS],
                                   rtol=1e-5)
    assert prefilter_scores([], model, [656]).shape == (0,)


def test_images_below_the_threshold_are_excluded_before_the_split(classifier, red_tree):
    manifests = build_manifests(red_tree, **SPLIT,
                                prefilter=make_prefilter(prefilter_params(classifier)))
    kept = pd.concat(manifests.splits.values())
    assert len(kept) == 3 * 6
    assert not kept["path"].str.endswith(("/0.png", "/1.png")).any()
    reasons = dict(zip(manifests.excluded["path"], manifests.excluded["reason"], strict=True))
    assert reasons == {f"set/class_{c}/{i}.png": f"prefilter score {expected_score(r):.4f} < 0.1"
                       for c in range(3) for i, r in enumerate(REDS[:2])}
    assert reasons["set/class_0/1.png"] == "prefilter score 0.0518 < 0.1"
    assert data_metrics(manifests)["excluded"]["prefiltered"] == 6
    highest = f"{expected_score(255):.4f}"
    with pytest.raises(DataError, match=rf"all 24 images score below prefilter.threshold 0.999 "
                       rf"\(highest {highest}\)"):
        build_manifests(red_tree, **SPLIT, prefilter=make_prefilter(
            prefilter_params(classifier, threshold=0.999)))


def test_prefilter_runs_before_class_selection(classifier, red_tree):
    # class_2 is the largest class (10 images) but keeps only 2 past the prefilter, so
    # top_classes=2 must keep class_0 and class_1 (6 each).
    for i in (2, 3, 4, 5, 8, 9):
        Image.new("RGB", (16, 16), (10 + i, 40, 0)).save(red_tree / "set/class_2" / f"{i}.png")
    manifests = build_manifests(red_tree, **SPLIT, top_classes=2,
                                prefilter=make_prefilter(prefilter_params(classifier)))
    assert manifests.classes == ["class_0", "class_1"]
    excluded = data_metrics(manifests)["excluded"]
    assert excluded["prefiltered"] == 2 + 2 + 8 and excluded["unselected_class"] == 2


def test_split_stage_with_the_prefilter(classifier, red_tree):
    params = copy.deepcopy(DEFAULTS)
    params["split"].update(val_fraction=0.3, test_fraction=0.3)
    params["prefilter"] = prefilter_params(classifier, CARS, threshold=0.5)
    (red_tree.parent / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, REPO / "stages" / "split.py", "--raw", "raw",
                             "--out", "manifests", "--metrics", "metrics",
                             "--details", "details.json"],
                            cwd=red_tree.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((red_tree.parent / "details.json").read_text())
    # Only class 656 carries weight in this classifier: r=160 scores 0.749, r=130 0.401.
    assert metrics["excluded"]["prefiltered"] == 3 * 4
    assert metrics["images"]["train"]["total"] + metrics["images"]["val"]["total"] \
        + metrics["images"]["test"]["total"] == 3 * 4
    excluded = pd.read_csv(red_tree.parent / "manifests" / "excluded.csv")
    assert excluded["reason"].str.fullmatch(r"prefilter score 0\.\d{4} < 0\.5").all()


@pytest.mark.parametrize("change, message", [
    ({"imagenet_classes": []}, "prefilter.imagenet_classes: empty"),
    ({"model": "missing.keras"}, "prefilter.model: missing.keras: file not found"),
])
def test_unusable_settings_are_refused_before_any_work(change, message):
    check_prefilter_params({**DEFAULTS["prefilter"], **change})  # disabled: nothing checked
    with pytest.raises(ParamsError, match=message):
        check_prefilter_params({**DEFAULTS["prefilter"], "enabled": True,
                                "imagenet_classes": [656], **change})


def test_split_stage_names_a_missing_classifier_and_writes_nothing(tmp_path):
    params = copy.deepcopy(DEFAULTS)
    params["prefilter"] = prefilter_params("gone.keras")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, REPO / "stages" / "split.py", "--raw", "raw",
                             "--out", "out", "--metrics", "m.json", "--details", "d.json"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: prefilter.model: gone.keras: file not found (expected imagenet or a path to "
        "a saved .keras classifier)"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()


def test_params_schema_takes_imagenet_or_a_keras_file():
    for good in ("imagenet", "models/prefilter.keras"):
        validate({**DEFAULTS, "prefilter": {**DEFAULTS["prefilter"], "model": good}})
    with pytest.raises(ParamsError, match="prefilter.model: expected imagenet or a path"):
        validate({**DEFAULTS, "prefilter": {**DEFAULTS["prefilter"], "model": "weights.h5"}})


def test_a_classifier_without_1000_outputs_is_refused(tmp_path):
    import keras

    pixels = keras.Input((8, 8, 3))
    model = keras.Model(pixels, keras.layers.Dense(10)(keras.layers.Flatten()(pixels)))
    model.save(tmp_path / "ten.keras")
    with pytest.raises(ParamsError, match="has 10 outputs; an ImageNet classifier has 1000"):
        load_prefilter_model(str(tmp_path / "ten.keras"))
    (tmp_path / "junk.keras").write_text("not a model")
    with pytest.raises(ParamsError, match=r"junk.keras: not a saved Keras model \(a .keras "):
        load_prefilter_model(str(tmp_path / "junk.keras"))
    with zipfile.ZipFile(tmp_path / "zipped.keras", "w") as archive:  # a zip, but no model
        archive.writestr("notes.txt", "hello")
    with pytest.raises(ParamsError, match="zipped.keras: not a loadable Keras model"):
        load_prefilter_model(str(tmp_path / "zipped.keras"))


def test_imagenet_classifier_takes_raw_pixels(tmp_path):
    import keras

    model = imagenet_classifier(weights=None)  # same graph; the real weights need a download
    assert model.input_shape == (None, 224, 224, 3) and model.output_shape == (None, 1000)
    assert model.get_layer("preprocess").backbone == "mobilenet_v2"
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 224, 224, 3)).astype("float32")
    network = model.get_layer("imagenet_classifier")
    expected = network(keras.applications.mobilenet_v2.preprocess_input(pixels.copy()))
    np.testing.assert_allclose(model(pixels), expected, atol=1e-6)
    # Saved, it is the `.keras` file an offline machine points prefilter.model at.
    model.save(tmp_path / "imagenet.keras")
    reloaded = load_prefilter_model(str(tmp_path / "imagenet.keras"))
    np.testing.assert_allclose(prefilter_scores([], reloaded, [1]), [])
    np.testing.assert_allclose(reloaded(pixels), expected, atol=1e-6)


def test_a_failed_weights_download_is_one_line(monkeypatch):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/x.h5: None -- "
                        "[Errno -2] Name or service not known")

    monkeypatch.setattr("keras.src.utils.file_utils.get_file", offline)
    with pytest.raises(DownloadError, match=r"prefilter.model: imagenet: cannot get the "
                       r"MobileNetV2 ImageNet weights \(URL fetch failure"):
        imagenet_classifier()
