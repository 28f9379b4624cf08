import copy
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

from retrain.errors import ParamsError
from retrain.params import load_params, validate

DEFAULTS = yaml.safe_load((REPO / "params.yaml").read_text())


def with_value(dotted: str, value):
    params = copy.deepcopy(DEFAULTS)
    *parents, last = dotted.split(".")
    node = params
    for key in parents:
        node = node[key]
    node[last] = value
    return params


def test_defaults_follow_the_classic_recipe():
    params = load_params(REPO / "params.yaml")
    assert params["model"] == {"backbone": "mobilenet_v2", "weights": "imagenet",
                               "image_size": 224, "alpha": 1.0}
    assert params["split"]["val_fraction"] == 0.2 and params["split"]["test_fraction"] == 0.1
    assert params["head"]["dropout"] == 0.3 and params["head"]["epochs"] == 5
    assert params["head"]["batch_size"] == 32
    assert params["finetune"]["from_layer"] == 135 and params["finetune"]["lr_factor"] == 0.1
    assert params["data"]["sha256"].startswith("4c54ace7911a")


# Each row: dotted key, bad value, text the error must contain. A new case is one line.
BAD_VALUES = [
    ("seed", "forty-two", "seed: expected"),
    ("seed", -1, "seed: expected"),
    ("seed", 1.5, "seed: expected"),
    ("data.url", "", "data.url"),
    ("data.sha256", "abc", "data.sha256: expected 64 hexadecimal digits"),
    ("data.timeout_s", 0, "data.timeout_s"),
    ("split.val_fraction", 1.0, "split.val_fraction: expected a number in (0, 1)"),
    ("split.val_fraction", 0, "split.val_fraction"),
    ("split.test_fraction", "0.1", "split.test_fraction"),
    ("split.top_classes", -3, "split.top_classes"),
    ("split.seed", -1, "split.seed: expected"),
    ("split.method", "random", "split.method: expected one of stratified, hash"),
    ("crossval.folds", 1, "crossval.folds: expected 0 (off) or an integer in .2, 100.,"),
    ("crossval.repeats", -1, "crossval.repeats"),
    ("model.backbone", "resnet51", "model.backbone: expected one of"),
    ("model.image_size", 16, "model.image_size"),
    ("model.image_size", True, "model.image_size"),
    ("model.alpha", 0.6, "model.alpha"),
    ("extract.engine", "onnx", "extract.engine"),
    ("head.dropout", 1.0, "head.dropout"),
    ("head.learning_rate", 0, "head.learning_rate"),
    ("head.learning_rate", float("nan"), "head.learning_rate"),
    ("head.epochs", 0, "head.epochs"),
    ("head.epochs", 2.0, "head.epochs"),
    ("head.class_weights", "yes", "head.class_weights: expected true or false"),
    ("finetune.from_layer", -1, "finetune.from_layer"),
    ("finetune.augment.brightness", 2, "finetune.augment.brightness"),
    ("finetune.replicates", 0, "finetune.replicates: expected a number in .1, 100."),
    ("finetune.replicates", 1.5, "finetune.replicates"),
    ("accelerator.precision", "float16", "accelerator.precision: expected one of auto"),
    ("accelerator.gpus", -1, "accelerator.gpus"),
    ("accelerator.gpus", 1.5, "accelerator.gpus"),
    ("render.cam_method", "saliency", "render.cam_method"),
    ("export.formats", [], "export.formats: expected a non-empty list of distinct formats"),
    ("export.formats", ["int4"], "export.formats: expected a non-empty list"),
    ("export.formats", ["int8", "int8"], "export.formats: expected a non-empty list"),
    ("export.representative_images", 0, "export.representative_images"),
    ("export.int8_float_layers", -1, "export.int8_float_layers"),
    ("export.int8_float_layers", 2.5, "export.int8_float_layers"),
    ("export.int8_size_budget", 0, "export.int8_size_budget: expected a number in (0, 1]"),
    ("export.int8_size_budget", 1.5, "export.int8_size_budget"),
    ("export.held_out_images", 50, "export.held_out_images: expected 0 (all held-out images) or "
                                   "an integer >= 100"),
    ("export.held_out_images", -1, "export.held_out_images"),
    ("export.held_out_images", True, "export.held_out_images"),
    ("prefilter.imagenet_classes", [1000], "prefilter.imagenet_classes"),
    ("report.gates", [{"metric": "x", "direction": "up", "tolerance": 0}], "report.gates"),
    ("report.gates", [{"metric": "x", "direction": "higher", "tolerance": 0,
                       "significance": 1.0}], "optional significance in"),
    ("report.gates", [{"metric": "x", "direction": "higher", "tolerance": 0,
                       "significance": "5%"}], "report.gates"),
    ("report.gates", [{"metric": "x", "direction": "higher", "tolerance": 0,
                       "alpha": 0.05}], "report.gates"),
]


@pytest.mark.parametrize("key, value, message", BAD_VALUES)
def test_bad_value_is_named(key, value, message):
    with pytest.raises(ParamsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(with_value(key, value))


@pytest.mark.parametrize("key", ["head.learnig_rate", "modle", "finetune.augment.hue"])
def test_unknown_key_is_refused(key):
    params = with_value(key, 1)
    with pytest.raises(ParamsError, match=f"{key}: unknown key"):
        validate(params)


def test_missing_key_is_named():
    params = copy.deepcopy(DEFAULTS)
    del params["head"]["epochs"]
    with pytest.raises(ParamsError, match="head.epochs: missing"):
        validate(params)


def test_not_yaml(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: [1,\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")


def test_stage_exits_2_with_one_line_before_any_work(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(with_value("split.val_fraction", 2)))
    result = subprocess.run(
        [sys.executable, REPO / "stages" / "split.py", "--raw", "missing", "--out", "out",
         "--metrics", "m.json", "--details", "d.json"], cwd=tmp_path, capture_output=True,
        text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: split.val_fraction: expected a number in (0, 1), got 2"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()


def test_model_combination_stops_fetch_before_the_download(tmp_path):
    # Xception's architecture needs 71 px; fetch must say so before it reads the URL.
    params = with_value("model.backbone", "xception")
    params["model"]["image_size"] = 64
    params["data"]["url"] = str(tmp_path / "flowers.tgz")  # would fail as "not found"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, REPO / "stages" / "fetch.py", "--out", "raw",
                             "--layout", "layout.json"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: model.image_size: xception needs at least 71 px, got 64"]
    assert not (tmp_path / "raw").exists()


def test_params_loader_does_not_import_keras():
    # Every stage loads params first; fetch and split never need Keras's 5 s import.
    code = ("import sys; from retrain.params import load_params; "
            f"load_params({str(REPO / 'params.yaml')!r}); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('keras', 'tensorflow')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("stage", ["fetch", "split", "card"])
def test_stages_without_a_model_do_not_import_tensorflow(stage):
    # Importing TensorFlow costs 4 to 9 s of a stage's start; these stages never run a model.
    code = ("import runpy, sys; sys.argv = ['stage', '--help']\n"
            "try:\n"
            f"    runpy.run_path({str(REPO / 'stages' / f'{stage}.py')!r}, run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n"
            "import retrain.report\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('keras', 'tensorflow')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("written, value", [("1e-3", 0.001), ("2.5e-4", 0.00025),
                                            ("1.E-3", 0.001)])
def test_exponent_floats_are_floats_as_dvc_reads_them(tmp_path, written, value):
    text = (REPO / "params.yaml").read_text().replace("learning_rate: 0.001",
                                                      f"learning_rate: {written}")
    assert written in text
    (tmp_path / "params.yaml").write_text(text)
    assert load_params(tmp_path / "params.yaml")["head"]["learning_rate"] == value


def test_a_digest_that_reads_as_a_number_must_be_quoted(tmp_path):
    # Digits and one `e` are a float to DVC too; the error says to quote it.
    text = (REPO / "params.yaml").read_text()
    digest = yaml.safe_load(text)["data"]["sha256"]
    numeric = "1234567e89" + "0" * 54
    (tmp_path / "params.yaml").write_text(text.replace(digest, numeric))
    with pytest.raises(ParamsError, match="data.sha256: .* quoted if YAML reads them as a number"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text(text.replace(digest, f'"{numeric}"'))
    assert load_params(tmp_path / "params.yaml")["data"]["sha256"] == numeric


def test_merge_keys_are_not_duplicates(tmp_path):
    text = (REPO / "params.yaml").read_text()
    text = text.replace("finetune:\n", "finetune: &tune\n", 1) + "\nx: {<<: *tune}\n"
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError, match="x: unknown key"):  # parsed; only the key is wrong
        load_params(tmp_path / "params.yaml")



def test_yes_is_a_string_as_dvc_reads_it(tmp_path):
    # PyYAML (YAML 1.1) would read `yes` as true; DVC (YAML 1.2) shows the string "yes".
    text = (REPO / "params.yaml").read_text()
    assert "  enabled: false" in text
    (tmp_path / "params.yaml").write_text(text.replace("  enabled: false", "  enabled: yes"))
    with pytest.raises(ParamsError, match="prefilter.enabled: expected true or false, got 'yes'"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize("content, message", [
    (None, r"params.yaml: cannot read \(Is a directory\)"),
    (b"", "params.yaml: expected a mapping of params keys, got an empty file"),
    (b"- 1\n", "params.yaml: expected a mapping of params keys, got list"),
    (b"# caf\xe9\nseed: 1\n", "params.yaml: not UTF-8 text"),
    (b"seed: 1\nseed: 2\n", 'params.yaml: line 2: found duplicate key "seed"'),
    (b"head:\n  epochs: 1\n  epochs: 2\n", 'params.yaml: line 3: found duplicate key "epochs"'),
], ids=["folder", "empty", "list", "latin-1", "duplicate", "nested duplicate"])
def test_unreadable_params_file_is_one_line(tmp_path, content, message):
    path = tmp_path / "params.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ParamsError, match=message):
        load_params(path)
