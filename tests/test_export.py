"""LiteRT exports, the image-bytes serving signature, the model card and predict on every format.

A tiny convolutional classifier trained for a few seconds on generated images stands in for
the fine-tuned model: the conversion, the serving graph and the card do not depend on the
backbone, and unlike a randomly initialised MobileNetV2 it gives distinct, confident
probabilities whose top-1 can disagree after quantisation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from retrain import litert

pytestmark = pytest.mark.skipif(not litert.litert_available(),
                                reason="ai-edge-litert is not installed")

SIZE = 32
CLASSES = ["class_000", "class_001", "class_002"]


def image_files(class_tree: Path) -> tuple[list[Path], np.ndarray]:
    files = sorted(class_tree.rglob("*.jpg"))
    labels = np.array([CLASSES.index(path.parent.name) for path in files])
    return files, labels


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model, image files, labels): a small CNN fitted to 3 x 12 generated 32 px JPEGs."""
    import tarfile

    import keras

    from retrain.base import Preprocess
    from retrain.images import load_image
    from retrain.synthetic import write_dataset

    root = tmp_path_factory.mktemp("export")
    tarball = write_dataset(root / "set.tgz", classes=3, per_class=12, size=40, seed=1)
    with tarfile.open(tarball) as tar:
        tar.extractall(root / "raw", filter="data")
    files, labels = image_files(root / "raw")
    pixels = np.stack([load_image(path, SIZE) for path in files]).astype(np.float32)

    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3), name="pixels")
    x = Preprocess("mobilenet_v2", name="preprocess")(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="classifier")(x)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    model.fit(pixels, labels, epochs=30, batch_size=12, verbose=0)
    return model, files, labels


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """Every format of the trained model, and the Keras probabilities on its images."""
    from retrain.evaluate import predict_images
    from retrain.export import FILES, export_formats
    from retrain.images import load_image

    model, files, labels = trained
    images = np.stack([load_image(path, SIZE) for path in files])
    out_dir = tmp_path_factory.mktemp("tflite")
    paths = export_formats(model, list(FILES), images[::3], out_dir)
    return paths, images, predict_images(model, images)


@pytest.mark.slow
def test_each_format_converts_loads_and_agrees_with_keras(trained, exported):
    from retrain.export import FILES, latency_rounds_ms, measure

    _, _, labels = trained
    paths, images, keras_probabilities = exported
    assert {name: path.name for name, path in paths.items()} == FILES
    assert keras_probabilities.max(axis=1).mean() > 0.8  # confident: top-1 can be tested
    results = {name: measure(path, images, labels, CLASSES, keras_probabilities)
               for name, path in paths.items()}
    latencies = latency_rounds_ms(paths, images[:1], rounds=2, runs=3)
    assert {name: len(rounds) for name, rounds in latencies.items()} == dict.fromkeys(FILES, 2)
    assert all(ms > 0 for rounds in latencies.values() for ms in rounds)
    for name, entry in results.items():
        assert set(entry) - {"float_layers", "float_layers_through"} == {
            "accuracy", "macro_f1", "agreement", "agreement_ci95", "max_prob_diff",
            "size_bytes", "images", "test_images"}, name
        assert entry["images"] == entry["test_images"] == len(images)  # all test rows here
        low, high = entry["agreement_ci95"]
        assert low <= entry["agreement"] <= high
        assert entry["size_bytes"] == paths[name].stat().st_size
    assert results["float32"]["agreement"] == 1.0
    assert results["float32"]["max_prob_diff"] < 1e-5
    assert results["float16"]["agreement"] == 1.0
    assert results["float16"]["max_prob_diff"] < 0.01
    assert results["int8"]["agreement"] >= 0.9
    assert results["int8"]["max_prob_diff"] < 0.2
    keras_accuracy = float(np.mean(keras_probabilities.argmax(axis=1) == labels))
    assert results["float32"]["accuracy"] == pytest.approx(keras_accuracy)
    sizes = [results[name]["size_bytes"] for name in ("float32", "float16", "int8")]
    assert sizes == sorted(sizes, reverse=True)
    # int8 takes the uint8 pixels as they are: calibrated on [0, 255], scale 1, zero point 0
    assert results["int8"]["float_layers"] == 0  # the fixture's default: all int8
    int8 = litert.LiteRTClassifier(paths["int8"])
    assert int8.input_dtype == np.uint8 and int8.input_quantization == pytest.approx((1.0, 0))


@pytest.mark.slow
@pytest.mark.parametrize("float_layers", [0, 2])
def test_int8_keeps_the_first_layers_in_float_and_no_others(trained, exported, tmp_path,
                                                             float_layers):
    """What the interpreter says: the first `float_layers` layers' outputs are float32
    tensors, every other layer computes in int8, and the pixels still go in as uint8."""
    from ai_edge_litert.interpreter import Interpreter

    from retrain.export import export_formats, measure, short_layer_name

    model, _, labels = trained
    paths, images, keras_probabilities = exported
    path = export_formats(model, ["int8"], images[::3], tmp_path, float_layers)["int8"]
    all_int8 = litert.quantized_layers(paths["int8"])  # the default export: float_layers 0
    assert len(all_int8) >= 5  # preprocessing, 2 convolutions, pooling, dense, softmax
    interpreter = Interpreter(model_path=str(path))
    dtypes = {t["name"]: np.dtype(t["dtype"]) for t in interpreter.get_tensor_details()}
    kept = all_int8[:float_layers]
    assert all(dtypes[name] == np.float32 for name in kept)
    assert all(dtypes[name] == np.int8 for name in all_int8[float_layers:])
    assert litert.float_layer_names(path) == kept
    entry = measure(path, images, labels, CLASSES, keras_probabilities)
    assert entry["float_layers"] == float_layers
    assert entry.get("float_layers_through") == (short_layer_name(kept[-1]) if kept else None)
    assert interpreter.get_input_details()[0]["dtype"] == np.uint8
    assert interpreter.get_output_details()[0]["dtype"] == np.float32


@pytest.mark.slow
def test_int8_keeps_as_many_float_layers_as_its_size_budget_allows(trained, exported,
                                                                   tmp_path):
    """With a size budget, the int8 file keeps the longest run of float layers from the
    input that fits: within the budget, and one layer more would not be."""
    from retrain.export import export_formats

    model, _, _ = trained
    paths, images, _ = exported
    float32_size = paths["float32"].stat().st_size
    all_int8 = litert.quantized_layers(paths["int8"])

    def int8_size(float_layers, budget=None, name="int8"):
        path = export_formats(model, ["int8"], images[::3], tmp_path / name,
                              float_layers, budget)["int8"]
        return path, path.stat().st_size

    _, two_float_size = int8_size(2, name="two")
    budget = two_float_size / float32_size
    path, size = int8_size(len(all_int8), budget, name="budgeted")
    kept = litert.float_layer_names(path)
    assert size <= budget * float32_size
    assert 2 <= len(kept) < len(all_int8) and kept == all_int8[:len(kept)]
    _, one_more_size = int8_size(len(kept) + 1, name="one-more")
    assert one_more_size > budget * float32_size
    # The count asked stays the most: the budget only lowers it.
    path, _ = int8_size(2, budget, name="capped")
    assert litert.float_layer_names(path) == all_int8[:2]


def test_longest_prefix_within_a_size_budget():
    sizes = [100, 103, 110, 108, 130, 160]  # grows with the count, but for one tiny layer
    assert litert.longest_prefix_within(sizes.__getitem__, 5, 115) == 3
    assert litert.longest_prefix_within(sizes.__getitem__, 5, 109) == 3
    assert litert.longest_prefix_within(sizes.__getitem__, 5, 105) == 1
    assert litert.longest_prefix_within(sizes.__getitem__, 2, 1000) == 2  # the count asked
    # The count asked is kept whenever it fits, even where bisection would stop short of it
    # at a smaller size one layer earlier (108 after 110).
    assert litert.longest_prefix_within(sizes.__getitem__, 3, 109) == 3
    assert litert.longest_prefix_within(sizes.__getitem__, 5, 99) == 0  # nothing fits


def test_agreement_interval_is_the_exact_binomial_interval():
    from retrain.export import agreement_interval

    low, high = agreement_interval(55, 56)
    assert 0.90 < low < 0.91 and high == pytest.approx(0.99955, abs=1e-4)
    assert agreement_interval(56, 56)[1] == 1.0
    assert agreement_interval(0, 10)[0] == 0.0


def test_representative_rows_are_seeded_training_rows():
    from retrain.export import representative_rows

    train = pd.DataFrame({"path": [f"c/{i}.jpg" for i in range(50)]})
    first = representative_rows(train, 10, seed=1)
    assert first["path"].tolist() == representative_rows(train, 10, seed=1)["path"].tolist()
    assert first["path"].tolist() != representative_rows(train, 10, seed=2)["path"].tolist()
    assert first.index.is_monotonic_increasing and len(set(first["path"])) == 10
    assert len(representative_rows(train, 500, seed=1)) == 50


def held_out_frames(count: int, start: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    import hashlib

    rows = pd.DataFrame({"path": [f"c/{i}.jpg" for i in range(start, start + count)]})
    rows["sha256"] = [hashlib.sha256(p.encode()).hexdigest() for p in rows["path"]]
    return rows.iloc[: count // 3].copy(), rows.iloc[count // 3:].copy()


def test_formats_are_measured_on_a_sample_drawn_by_content_beyond_the_limit():
    from retrain.export import measured_rows

    val, test = held_out_frames(300)
    everything = measured_rows(val, test, 0)
    assert everything["path"].tolist() == val["path"].tolist() + test["path"].tolist()
    assert everything["split"].tolist() == ["val"] * len(val) + ["test"] * len(test)
    assert measured_rows(val, test, 300)["path"].tolist() == everything["path"].tolist()

    sample = measured_rows(val, test, 60)  # 100 val and 200 test rows: 20 and 40 of them
    assert len(sample) == 60 and set(sample["path"]) <= set(everything["path"])
    for split, rows, share in (("val", val, 20), ("test", test, 40)):
        drawn = sample[sample["split"] == split]
        assert sorted(drawn["sha256"]) == sorted(rows["sha256"])[:share], split
    # manifest order kept: validation rows first, then test, each as in its manifest
    order = {path: i for i, path in enumerate(everything["path"])}
    assert sample["path"].map(order).is_monotonic_increasing
    # more images only displace those whose digests sort after theirs
    more_val, more_test = held_out_frames(300, start=1000)
    grown = measured_rows(pd.concat([val, more_val]), pd.concat([test, more_test]), 60)
    assert set(grown["path"]) & set(everything["path"]) <= set(sample["path"])
    # a test split far smaller than its share still gives the test metrics a row
    few = measured_rows(pd.concat([val, test]), test.iloc[:1], 100)
    assert (few["split"] == "test").sum() == 1 and len(few) == 100


# --- the image-bytes signature ---------------------------------------------------------------


def test_decoded_bytes_give_the_training_pixels(tmp_path):
    """JPEG (shrunk and enlarged), grayscale and transparent PNG: within one pixel level of
    `load_image`, the loader training used."""
    import tensorflow as tf
    from PIL import Image

    from retrain.images import load_image
    from retrain.serving import decode_image_bytes

    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (12, 16, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    rgba = np.dstack([smooth, rng.integers(0, 256, smooth.shape[:2])]).astype(np.uint8)
    samples = {"photo.jpg": Image.fromarray(smooth), "small.jpg": Image.fromarray(smooth[:20, :24]),
               "gray.png": Image.fromarray(smooth[..., 0]), "alpha.png": Image.fromarray(rgba)}
    for name, image in samples.items():
        image.save(tmp_path / name, quality=90) if name.endswith(".jpg") \
            else image.save(tmp_path / name)
        decoded = decode_image_bytes(tf.constant((tmp_path / name).read_bytes()), 48).numpy()
        expected = load_image(tmp_path / name, 48)
        difference = np.abs(decoded.astype(int) - expected.astype(int))
        assert decoded.dtype == np.uint8 and decoded.shape == (48, 48, 3), name
        assert difference.max() <= 1 and difference.mean() < 0.5, (name, difference.max())


@pytest.mark.slow
def test_bytes_signature_gives_the_same_top1_as_evaluate(trained, tmp_path):
    import tensorflow as tf

    from retrain.evaluate import predict_images
    from retrain.images import load_image
    from retrain.serving import BYTES_SIGNATURE, export_serving

    model, files, _ = trained
    export_serving(model, tmp_path / "serving")
    loaded = tf.saved_model.load(str(tmp_path / "serving"))
    assert {"serving_default", "serve", BYTES_SIGNATURE} <= set(loaded.signatures)
    served = loaded.signatures[BYTES_SIGNATURE](
        image_bytes=tf.constant([path.read_bytes() for path in files]))
    served = next(iter(served.values())).numpy()
    images = np.stack([load_image(path, SIZE) for path in files])  # 40 px files, resized
    expected = predict_images(model, images)  # what `evaluate` computes
    np.testing.assert_array_equal(served.argmax(axis=1), expected.argmax(axis=1))
    assert np.abs(served - expected).max() < 0.05
    pixels = loaded.signatures["serving_default"](pixels=tf.constant(images, tf.float32))
    np.testing.assert_allclose(next(iter(pixels.values())).numpy(), expected, atol=1e-5)
    # Every weight is stored once (a tracked model stores each twice: keras-team/keras#23553).
    stored = tf.train.load_checkpoint(str(tmp_path / "serving" / "variables" / "variables"))
    shapes = stored.get_variable_to_shape_map()
    assert sum(int(np.prod(shape)) for name, shape in shapes.items()
               if name != "_CHECKPOINTABLE_OBJECT_GRAPH") == model.count_params()


# --- model card and predict ------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped(trained, exported, tmp_path_factory):
    """models/: model.keras, tflite/*.tflite and the card, as the pipeline lays them out."""
    from retrain.atomic import write_json
    from retrain.card import build_card, card_markdown

    model, _, _ = trained
    paths, _, _ = exported
    models = tmp_path_factory.mktemp("models")
    model.save(models / "model.keras")
    (models / "tflite").mkdir()
    for path in paths.values():
        (models / "tflite" / path.name).write_bytes(path.read_bytes())
    files = {"model.keras": models / "model.keras",
             **{f"tflite/{p.name}": models / "tflite" / p.name for p in paths.values()}}
    card = build_card(
        classes=CLASSES,
        model_params={"backbone": "mobilenet_v2", "weights": "/somewhere/w.h5", "alpha": 0.35,
                      "image_size": SIZE},
        data_sha256="ab" * 32, split_sizes={"train": 20, "val": 8, "test": 8},
        evaluate={"finetuned": {"test_accuracy": 0.9, "macro_f1": 0.88, "per_class": {},
                                "test_accuracy_ci95": [0.8, 0.97],
                                "leak_free_test_accuracy_ci95": [0.8, 0.97]}},
        export={"int8": {"accuracy": 0.9, "agreement": 1.0, "size_bytes": 1000,
                         "latency_ms": 0.1, "macro_f1": 0.8, "max_prob_diff": 0.01}},
        files=files)
    write_json(models / "model_card.json", card)
    (models / "model_card.md").write_text(card_markdown(card))
    return models


def test_card_holds_the_contract_metrics_and_digests(shipped):
    from retrain.card import file_sha256

    card = json.loads((shipped / "model_card.json").read_text())
    assert card["classes"] == CLASSES
    assert card["input"]["shape"] == [SIZE, SIZE, 3] and card["input"]["value_range"] == [0, 255]
    assert "bilinear with antialiasing" in card["input"]["resize"]
    assert card["model"]["weights"] == "w.h5"  # the file's name, not the machine's path
    assert card["test_metrics"] == {"test_accuracy": 0.9, "macro_f1": 0.88,
                                    "test_accuracy_ci95": [0.8, 0.97]}
    assert card["files"]["tflite/model_int8.tflite"] == file_sha256(
        shipped / "tflite" / "model_int8.tflite")
    markdown = (shipped / "model_card.md").read_text()
    assert "0. class_000" in markdown and "| int8 | 0.9 |" in markdown
    assert "test_accuracy_ci95: [0.8, 0.97]" in markdown
    assert "95% bootstrap interval over the test images" in markdown
    assert "model.keras needs the retrain package" in card["loading"]
    assert "`import retrain.base` before keras.models.load_model" in markdown


def predict_json(args: list[str], capsys) -> list[dict]:
    from retrain.predict import main

    assert main([*args, "--json", "--top-k", "3"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("tflite", ["model.tflite", "model_fp16.tflite", "model_int8.tflite"])
def test_predict_on_tflite_prints_the_keras_top1(trained, shipped, tflite, capsys):
    _, files, _ = trained
    images = [str(path) for path in files[::4]]
    # No --classes and no classes.txt here: the names come from the card.
    keras_lines = predict_json([*images, "--model", str(shipped / "model.keras")], capsys)
    lite_lines = predict_json([*images, "--model", str(shipped / "tflite" / tflite)], capsys)
    assert [line["path"] for line in lite_lines] == images
    for keras_line, lite_line in zip(keras_lines, lite_lines):
        assert lite_line["top"][0]["class"] == keras_line["top"][0]["class"]
        if tflite == "model.tflite":
            for ours, theirs in zip(lite_line["top"], keras_line["top"]):
                assert ours["class"] == theirs["class"]
                assert ours["probability"] == pytest.approx(theirs["probability"], abs=1e-5)


@pytest.mark.slow
def test_predict_refuses_a_class_list_that_does_not_match_the_card(trained, shipped, tmp_path):
    from retrain.errors import UserError
    from retrain.predict import main

    _, files, _ = trained
    renamed = tmp_path / "classes.txt"
    renamed.write_text("class_000\nclass_002\nclass_001\n")  # same count, other order
    with pytest.raises(UserError, match=r"class names do not match .*model_card.json, which "
                                        r"ships with model_int8.tflite: output 1 is "
                                        r"'class_001' in the card, 'class_002' here"):
        main([str(files[0]), "--model", str(shipped / "tflite" / "model_int8.tflite"),
              "--classes", str(renamed)])
    renamed.write_text("\n".join(CLASSES) + "\n")
    assert main([str(files[0]), "--model", str(shipped / "tflite" / "model_int8.tflite"),
                 "--classes", str(renamed)]) == 0


def test_a_card_that_describes_other_files_is_not_used(shipped, tmp_path):
    from retrain.card import card_for

    assert card_for(shipped / "tflite" / "model.tflite")[1] == shipped / "model_card.json"
    other = tmp_path / "model.tflite"
    other.write_bytes(b"not the exported file")
    (tmp_path / "model_card.json").write_text((shipped / "model_card.json").read_text())
    assert card_for(other) is None


def test_predict_on_a_file_that_is_no_tflite_model_is_one_clear_error(tmp_path):
    from retrain.errors import UserError
    from retrain.predict import main

    fake = tmp_path / "model.tflite"
    fake.write_bytes(b"not a flatbuffer at all")
    with pytest.raises(UserError, match=r"model.tflite: not a LiteRT model \(") as info:
        main([str(tmp_path / "photo.jpg"), "--model", str(fake)])
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_a_card_whose_class_count_differs_from_the_model_is_named_in_the_error(tmp_path):
    import keras

    from retrain.card import file_sha256
    from retrain.errors import UserError
    from retrain.predict import main

    inputs = keras.Input((SIZE, SIZE, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(pooled))
    model.save(tmp_path / "model.keras")
    card = tmp_path / "model_card.json"
    card.write_text(json.dumps({"classes": ["a", "b"],
                                "files": {"model.keras": file_sha256(tmp_path / "model.keras")}}))
    with pytest.raises(UserError, match=r"model_card.json: 2 classes but the model has 3 "
                                        r"outputs"):
        main([str(tmp_path / "photo.jpg"), "--model", str(tmp_path / "model.keras")])


# --- which format the card recommends ---------------------------------------------------------


def made_up_export(int8_agreement: float, int8_accuracy: float = 0.861,
                   int8_latency: float = 0.97) -> dict:
    """reports/details/export.json as `export` writes it, with chosen int8 figures."""
    def entry(accuracy, agreement, size, latency):
        return {"accuracy": accuracy, "macro_f1": accuracy, "agreement": agreement,
                "agreement_ci95": [agreement - 0.05, min(agreement + 0.02, 1.0)],
                "max_prob_diff": 0.1, "size_bytes": size, "latency_ms": latency}
    return {"float32": entry(0.861, 1.0, 1_636_132, 0.90),
            "float16": entry(0.861, 1.0, 875_940, 0.93),  # as fast: XNNPACK runs it in float32
            "int8": {**entry(int8_accuracy, int8_agreement, 646_816, int8_latency),
                     "float_layers": 12}}


def card_of(export: dict, evaluate: dict | None = None) -> dict:
    from retrain.card import build_card

    return build_card(classes=CLASSES, model_params={
        "backbone": "mobilenet_v2", "weights": "imagenet", "alpha": 0.35, "image_size": SIZE},
        data_sha256="ab" * 32, split_sizes={"train": 144, "val": 40, "test": 16},
        evaluate=evaluate or {}, export=export, files={})


def test_card_names_the_served_replicate_and_the_replicates_spread():
    from retrain.card import card_markdown
    from retrain.evaluate import replicate_figures

    rng = np.random.default_rng(0)
    labels = np.arange(40) % len(CLASSES)
    runs = [rng.dirichlet(np.ones(len(CLASSES)), size=40) for _ in range(3)]
    spread = replicate_figures(runs, labels, [42, 1042, 2042])
    markdown = card_markdown(card_of(made_up_export(0.99), {"finetuned": {"replicates": spread}}))
    assert "replicate 0's (seed 42)" in markdown
    assert "seeds 42, 1042, 2042" in markdown
    assert f"sd {spread['test_accuracy_sd']:.4g}" in markdown
    one = replicate_figures(runs[:1], labels, [42])
    assert "replicate" not in card_markdown(card_of(made_up_export(0.99),
                                                    {"finetuned": {"replicates": one}}))


def test_card_states_the_training_recipe_from_the_params():
    from retrain.card import card_markdown, training_recipe
    from retrain.params import load_params

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml",
                         check_model=False)
    params["head"]["learning_rate"] = 0.002
    params["finetune"].update(lr_factor=0.5, replicates=3)
    params["finetune"]["augment"].update(views=2, contrast=0)
    card = card_of(made_up_export(0.99))
    card["training"] = training_recipe(params)
    markdown = card_markdown(card)
    tune = params["finetune"]
    assert f"backbone layers from {tune['from_layer']} up trainable (BatchNorm frozen)" \
        in markdown
    assert "learning rate 0.001," in markdown  # 0.002 x 0.5: the rate fine-tuning used
    assert "horizontal flip, brightness +/-0.1; 2 views per image, drawn once" in markdown
    assert "contrast" not in markdown.split("augmentation while fine-tuning")[1].splitlines()[0]
    assert f"seed {params['seed']}; 3 fine-tuning replicates" in markdown
    assert markdown.index("## Training") < markdown.index("## Test metrics")


def test_card_says_which_held_out_images_the_formats_were_measured_on():
    from retrain.card import card_markdown

    export = made_up_export(0.99)
    for entry in export.values():
        entry.update(images=5000, held_out_images=28000)
    export["int8"]["agreement_ci95"] = [0.97, 1.0]  # too wide to show 98%
    text = card_markdown(card_of(export))
    assert "5,000 of the 28,000 held-out images" in text and "sha256 sorts first" in text
    assert "`export.held_out_images: 0` measures all of them" in text
    for entry in export.values():
        entry.update(images=56, held_out_images=56)
    text = card_markdown(card_of(export))
    assert "Measured on the 56 held-out images (validation and test)" in text
    assert "check it on more images" in text  # the interval is still too wide
    assert "sorts first" not in text and "held_out_images" not in text


def test_card_recommends_float16_when_int8_does_not_hold():
    """The table measured before int8 kept layers in float (alpha 0.35): int8 agrees on 0.946
    of the held-out images, float16 is float32's size halved at the same speed."""
    from retrain.card import card_markdown

    card = card_of(made_up_export(int8_agreement=0.946, int8_accuracy=0.844))
    advice = card["recommendation"]
    assert advice["ship"] == "float16"
    assert advice["dominated_by"] == {"float32": "float16"}
    assert advice["below_agreement"] == ["int8"]
    markdown = card_markdown(card)
    assert "Ship **float16**" in markdown
    assert "float32 is not better than float16 on any axis" in markdown
    assert "int8 does not hold: it agrees with the Keras model on 0.946" in markdown
    assert "XNNPACK converts its weights to float32" in markdown


def test_card_recommends_int8_when_it_holds_and_nothing_beats_it():
    card = card_of(made_up_export(int8_agreement=0.982))
    advice = card["recommendation"]
    assert advice["ship"] == "int8" and advice["below_agreement"] == []
    # As accurate, smaller and no slower than both float files.
    assert set(advice["dominated_by"]) == {"float32", "float16"}
    assert advice["dominated_by"]["float16"] == "int8"


def test_card_says_when_the_shipped_formats_interval_does_not_clear_the_bar():
    """55 of 56 held-out images agree: 0.982 ships, but [0.904, 1] cannot show 98%."""
    from retrain.card import card_markdown

    export = made_up_export(int8_agreement=0.982)
    export["int8"]["agreement_ci95"] = [0.904, 1.0]
    markdown = card_markdown(card_of(export))
    assert "Ship **int8**" in markdown
    assert "interval reaches down to 0.904" in markdown
    export["int8"]["agreement_ci95"] = [0.985, 1.0]  # thousands of images agreeing
    assert "reaches down to" not in card_markdown(card_of(export))


def test_a_slower_or_less_accurate_int8_does_not_dominate_but_may_still_ship():
    from retrain.card import LATENCY_TIE

    slower = card_of(made_up_export(int8_agreement=0.99, int8_latency=0.93 * (1 + 2 * LATENCY_TIE)))
    assert "float16" not in slower["recommendation"]["dominated_by"]
    assert slower["recommendation"]["ship"] == "int8"  # holds, and the smallest on the front
    worse = card_of(made_up_export(int8_agreement=0.99, int8_accuracy=0.80))
    assert worse["recommendation"]["dominated_by"] == {"float32": "float16"}
    assert worse["recommendation"]["ship"] == "int8"


def test_card_says_how_far_the_labels_agree_or_that_nothing_checked_them():
    """The Data section carries the audit: a model trained on wrong labels scores as well
    as one trained on right ones, so the card says how many labels look wrong."""
    from retrain.card import build_card, card_markdown

    def card_with(audit):
        return card_markdown(build_card(
            classes=CLASSES, model_params={"backbone": "mobilenet_v2", "weights": "imagenet",
                                           "alpha": 0.35, "image_size": SIZE},
            data_sha256="ab" * 32, split_sizes={"train": 144, "val": 40, "test": 16},
            evaluate={}, export=made_up_export(0.99), files={}, audit=audit))

    figures = {"enabled": True, "images": 200, "label_issues": 14, "label_agreement": 0.8,
               "near_duplicate_groups": 1, "cross_split_groups": 1, "leaked_test_images": 1,
               "outliers": 2, "test_accuracy": 0.8}
    assert ("- data audit (`reports/audit/`): labels agree on 80.0% of the 200 images with a "
            "classifier that never saw them; 14 flagged as likely mislabelled; 2 as out of "
            "scope; 1 near-duplicate groups (1 across splits, 1 test images with a near-copy "
            "in train or val)") in card_with(figures)
    assert "data audit: off (`audit.enabled: false`)" in card_with({"enabled": False})
    assert "data audit" not in card_with(None)
