"""Every figure is a valid PNG of sensible size, from tiny synthetic inputs, and the render
stage writes all of them (or nothing) from a tiny real workspace."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from retrain.errors import DataError
from retrain.figures import (
    cam_figure,
    confusion_matrix_figure,
    feature_channels_figure,
    learning_curves_figure,
    predictions_figure,
    read_curves,
    read_predictions,
    round_robin_by_class,
    samples_figure,
    seeded_choice,
)

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("confusion_matrix.png", "cam_correct.png", "cam_misclassified.png",
           "feature_channels.png", "learning_curves.png", "samples.png", "predictions.png")


def assert_png(path: Path, low: int = 300, high: int = 6000) -> tuple[int, int]:
    assert path.is_file(), path
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        width, height = img.size
        img.load()
    assert low <= width <= high and low <= height <= high, (path.name, img.size)
    return width, height


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, (6, 48, 48, 3), dtype=np.uint8)


def _labels(classes: int, count: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    names = [f"class_{i:03d}" for i in range(classes)]
    rng = np.random.default_rng(seed)
    actual = rng.integers(0, classes, count)
    predicted = np.where(rng.random(count) < 0.7, actual, rng.integers(0, classes, count))
    return names, [names[i] for i in actual], [names[i] for i in predicted]


def test_confusion_matrix_for_five_classes(tmp_path):
    classes = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
    actual = ["daisy", "daisy", "roses", "tulips", "tulips", "sunflowers"]
    predicted = ["daisy", "tulips", "roses", "tulips", "roses", "sunflowers"]
    width, height = assert_png(confusion_matrix_figure(actual, predicted, classes,
                                                       tmp_path / "cm.png"))
    assert width > height  # two matrices side by side


def test_confusion_matrix_for_300_classes_stays_bounded(tmp_path):
    classes, actual, predicted = _labels(300, 3000, seed=1)
    clipped = confusion_matrix_figure(actual, predicted, classes, tmp_path / "clip.png", clip=5)
    width, _ = assert_png(clipped)
    assert width >= 1500  # grew with the classes, within the cap checked above


def test_confusion_matrix_names_an_unknown_class(tmp_path):
    with pytest.raises(DataError, match="'lilies'"):
        confusion_matrix_figure(["roses"], ["lilies"], ["roses", "tulips"], tmp_path / "cm.png")
    assert not (tmp_path / "cm.png").exists()


def test_cam_figure_and_its_empty_version(tmp_path, images):
    heat = np.random.default_rng(1).random(images.shape[:3]).astype(np.float32)
    assert_png(cam_figure(images, heat, ["a", "b"] * 3, ["a", "a"] * 3, [0.9, 0.4] * 3,
                          tmp_path / "cam.png", title="CAM", empty_message="none"))
    assert_png(cam_figure(images[:0], heat[:0], [], [], [], tmp_path / "empty.png",
                          title="CAM, misclassified", empty_message="No misclassified images"))


def test_feature_channels_figure(tmp_path, images):
    feature_map = np.random.default_rng(2).random((3, 3, 40)).astype(np.float32)
    assert_png(feature_channels_figure(images[0], feature_map, tmp_path / "channels.png"))
    # Fewer channels than a dozen, all zero: still a valid figure.
    assert_png(feature_channels_figure(images[0], np.zeros((2, 2, 5)), tmp_path / "few.png"))


def _write_live(folder: Path, first_step: int, epochs: int, with_val: bool = True) -> None:
    for split in ("train", "val") if with_val else ("train",):
        for metric in ("loss", "accuracy"):
            path = folder / "plots" / "metrics" / split / f"{metric}.tsv"
            path.parent.mkdir(parents=True, exist_ok=True)
            steps = np.arange(first_step, first_step + epochs)
            values = np.linspace(0.4, 0.9, epochs) if metric == "accuracy" \
                else np.linspace(1.5, 0.5, epochs)
            pd.DataFrame({"step": steps, metric: values}).to_csv(path, sep="\t", index=False)


def test_learning_curves_from_dvclive_folders(tmp_path):
    _write_live(tmp_path / "head", 0, 5)
    _write_live(tmp_path / "finetune", 5, 3, with_val=False)
    head = read_curves(tmp_path / "head")
    assert list(head.columns) == ["step", "train_loss", "train_accuracy", "val_loss",
                                  "val_accuracy"]
    phases = [("head", head), ("finetune", read_curves(tmp_path / "finetune"))]
    assert_png(learning_curves_figure(phases, tmp_path / "curves.png"))
    with pytest.raises(DataError, match="missing"):
        read_curves(tmp_path / "missing")


def test_samples_and_predictions_grids(tmp_path, images):
    assert_png(samples_figure(images, ["cat", "dog", "cat", "dog", "cat", "dog"],
                              tmp_path / "samples.png"))
    assert_png(predictions_figure(images[:1], ["cat"], ["dog"], tmp_path / "one.png",
                                  confidence=[0.5]))
    assert_png(predictions_figure(images, ["cat"] * 6, ["cat", "dog"] * 3,
                                  tmp_path / "predictions.png"))


def test_selections_are_seeded_subsets():
    first = seeded_choice(np.arange(100), 8, seed=42)
    assert np.array_equal(first, seeded_choice(np.arange(100), 8, seed=42))
    assert len(set(first)) == 8 and np.all(np.diff(first) > 0)
    assert np.array_equal(seeded_choice([3, 5], 8, seed=0), [3, 5])
    labels = np.repeat([0, 1, 2], [10, 1, 4])
    chosen = round_robin_by_class(labels, 7, seed=0)
    assert len(set(chosen)) == 7
    assert list(labels[chosen[:3]]) == [0, 1, 2]


def test_read_predictions_rejects_unknown_classes(tmp_path):
    path = tmp_path / "predictions.csv"
    pd.DataFrame({"path": ["a.jpg"], "actual": ["roses"], "predicted": ["lilies"]}).to_csv(path)
    with pytest.raises(DataError, match="lilies"):
        read_predictions(path, ["roses", "tulips"])


# ---------------------------------------------------------------- the stage

CLASSES = ["class_000", "class_001", "class_002"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """raw images, manifests, a tiny real model, predictions and dvclive curves."""
    import keras

    from retrain.base import build_base
    from retrain.finetune import assemble_model
    from retrain.head import build_head
    from retrain.manifests import build_manifests, write_manifests
    from retrain.synthetic import draw_image

    root = tmp_path_factory.mktemp("render")
    rng = np.random.default_rng(0)
    for index, name in enumerate(CLASSES):
        folder = root / "raw" / "shapes" / name
        folder.mkdir(parents=True)
        for i in range(8):
            draw_image(index, 64, rng).save(folder / f"{i}.jpg", quality=90)
    manifests = build_manifests(root / "raw", val_fraction=0.25, test_fraction=0.4, seed=0)
    write_manifests(manifests, root / "data" / "manifests")

    model_params = {"backbone": "mobilenet_v2", "weights": "none", "image_size": 64,
                    "alpha": 0.35}
    base = build_base(model_params)
    model = assemble_model(base, build_head(base.output.shape[-1], len(CLASSES), 0.3, seed=0))
    (root / "models").mkdir()
    model.save(root / "models" / "model.keras")

    test = manifests.splits["test"]
    probabilities = rng.dirichlet(np.ones(len(CLASSES)), len(test))
    table = pd.DataFrame({"path": test["path"], "actual": test["label"],
                          "predicted": np.asarray(CLASSES)[probabilities.argmax(axis=1)]})
    for i, name in enumerate(CLASSES):
        table[f"prob_{name}"] = probabilities[:, i]
    (root / "reports").mkdir()
    table.to_csv(root / "reports" / "predictions.csv", index=False)
    _write_live(root / "dvclive" / "head", 0, 3)
    _write_live(root / "dvclive" / "finetune", 3, 2)

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(model_params)
    params["render"]["cam_samples"] = 4
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    del keras
    return root


def _run_stage(root: Path, monkeypatch, *extra: str, curves=("dvclive/head",
                                                              "dvclive/finetune")) -> None:
    argv = ["render.py", "--raw", "raw", "--manifests", "data/manifests",
            "--model", "models/model.keras", "--predictions", "reports/predictions.csv",
            "--curves", *curves, "--out", "reports/figures", *extra]
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "stages" / "render.py"), run_name="__main__")


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_render_stage_writes_every_figure(workspace, monkeypatch, method):
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["render"]["cam_method"] = method
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    _run_stage(workspace, monkeypatch)
    out = workspace / "reports" / "figures"
    assert sorted(p.name for p in out.iterdir()) == sorted(FIGURES)
    for name in FIGURES:
        assert_png(out / name)
    assert not list((workspace / "reports").glob(".tmp-*"))


def test_render_stage_fails_whole(workspace, monkeypatch, capsys):
    out = workspace / "reports" / "figures"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    with pytest.raises(SystemExit) as exit_info:
        _run_stage(workspace, monkeypatch, curves=("dvclive/head", "dvclive/nowhere"))
    assert exit_info.value.code != 0
    assert "dvclive/nowhere" in capsys.readouterr().err
    assert not out.exists()
    assert not list((workspace / "reports").glob(".tmp-*"))


def test_confusion_matrix_title_shows_the_accuracy_interval(tmp_path, monkeypatch):
    import retrain.figures as figures

    titles = []
    save = figures._save

    def save_and_keep_the_title(fig, dest):
        titles.append(fig._suptitle.get_text())
        return save(fig, dest)

    monkeypatch.setattr(figures, "_save", save_and_keep_the_title)
    assert_png(confusion_matrix_figure(["a", "a", "b"], ["a", "b", "b"], ["a", "b"],
                                       tmp_path / "cm.png", accuracy_interval=[0.3333, 1.0]))
    assert titles == ["Confusion matrix: 3 images, accuracy 66.7%\n"
                      "95% bootstrap interval over the test images: 33.3% to 100.0%"]
