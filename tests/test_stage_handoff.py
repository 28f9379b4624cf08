"""Across stages, fine-tuning starts from the very network the head was trained on.

`extract` builds a base and caches its features, `train_head` fits the head on them, and
`finetune` builds the base again in another process, after loading the head. The stage
scripts run here in order, as DVC runs them, and the model `finetune` assembles is checked
before its first training step: on the test images it must give the head's probabilities on
the cached test features, for every kind of `model.weights`.
"""

import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, real_weights_or_skip

pytestmark = pytest.mark.slow

# ResNet50V2, not MobileNetV2, where weights are random: random MobileNetV2 features are
# ~1e-12 (see profiles/small.yaml), so any two random bases would give the same probabilities.
RESNET = {"backbone": "resnet50_v2", "image_size": 32, "alpha": 1.0}
MOBILENET_035 = {"backbone": "mobilenet_v2", "image_size": 224, "alpha": 0.35}


class StoppedBeforeTraining(Exception):
    pass


def run_stage(name: str, *args: str) -> None:
    """Run stages/<name>.py in this process, with the arguments dvc.yaml would give it."""
    argv = sys.argv
    sys.argv = [f"stages/{name}.py", *args]
    try:
        runpy.run_path(str(REPO / "stages" / f"{name}.py"), run_name="__main__")
    finally:
        sys.argv = argv


def weights_file(tmp_path: Path) -> str:
    """A no-top weights file unlike any seeded initialisation the pipeline would draw."""
    from retrain.base import build_base

    path = tmp_path / "resnet50_v2_no_top.weights.h5"
    build_base({**RESNET, "weights": "none"}, seed=1234).get_layer("backbone").save_weights(path)
    return str(path)


def imagenet_from_shared(tmp_path: Path, monkeypatch) -> str:
    """`imagenet` as Keras resolves it, its download found in a Keras home we fill offline."""
    from keras.src.backend import config

    real = real_weights_or_skip()
    (tmp_path / "keras" / "models").mkdir(parents=True)
    (tmp_path / "keras" / "models" / real.name).symlink_to(real)  # the name Keras asks for
    monkeypatch.setattr(config, "_KERAS_DIR", str(tmp_path / "keras"))
    return "imagenet"


@pytest.mark.parametrize("mode", ["none", "file", "imagenet"])
def test_finetune_starts_from_the_head_and_base_that_extract_used(mode, class_tree, tmp_path,
                                                                  monkeypatch):
    import keras

    import retrain.finetune
    from retrain.images import cached_image_array
    from retrain.manifests import read_split

    if mode == "imagenet":
        model = {**MOBILENET_035, "weights": imagenet_from_shared(tmp_path, monkeypatch)}
    else:
        model = {**RESNET, "weights": weights_file(tmp_path) if mode == "file" else "none"}
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"] = model
    params["finetune"]["from_layer"] = 100
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(class_tree, ws / "data" / "raw")
    monkeypatch.chdir(ws)

    run_stage("split", "--raw", "data/raw", "--out", "data/manifests",
              "--metrics", "metrics/data", "--details", "reports/details/data.json")
    run_stage("extract", "--raw", "data/raw", "--manifests", "data/manifests",
              "--out", "data/features", "--details", "reports/details/extract.json")
    run_stage("train_head", "--features", "data/features", "--manifests", "data/manifests",
              "--model", "models/head.keras", "--live", "dvclive/head",
              "--details", "reports/details/head.json")

    test = read_split("data/manifests", "test")
    test_images = cached_image_array([Path("data/raw") / p for p in test["path"]],
                                     test["sha256"], model["image_size"], tmp_path / "cache")
    seen = {}

    def record_then_stop(models, *args, **kwargs):
        model = next(iter(models))  # replicate 0, as the stage built it
        seen["probabilities"] = model.predict(np.asarray(test_images, np.float32), verbose=0)
        raise StoppedBeforeTraining

    monkeypatch.setattr(retrain.finetune, "fine_tune_replicates", record_then_stop)
    with pytest.raises(StoppedBeforeTraining):
        run_stage("finetune", "--raw", "data/raw", "--manifests", "data/manifests",
                  "--head", "models/head.keras", "--head-details", "reports/details/head.json",
                  "--model", "models/model.keras", "--serving", "models/serving",
                  "--replicates", "models/replicates",
                  "--live", "dvclive/finetune", "--details", "reports/details/finetune.json")

    head = keras.models.load_model("models/head.keras")
    expected = head.predict(np.load("data/features/test.npy"), verbose=0)
    # A comparison that could not fail would prove nothing: these images must look different.
    assert expected.std(axis=0).max() > 1e-3
    np.testing.assert_allclose(seen["probabilities"], expected, atol=1e-4)
