"""Invariants of the training stages on a tiny real network (MobileNetV2, alpha 0.35, 32 px)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from retrain.augment import Augmentation
from retrain.base import build_base
from retrain.features import KerasEngine, build_extractor, extract_to_file
from retrain.finetune import Recipe, Split, assemble_model, fine_tune, unfreeze_from
from retrain.head import build_head, compile_classifier, train_head
from retrain.reproducibility import make_deterministic
from retrain.training import balanced_class_weights

pytestmark = pytest.mark.slow
CLASSES = 3


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(24, 32, 32, 3), dtype=np.uint8)


@pytest.fixture
def labels():
    return np.arange(24) % CLASSES


@pytest.fixture
def trained(tiny_model_params, images, labels):
    """Base, features of `images` and a head trained on them."""
    make_deterministic(0)
    base, extractor = build_extractor(tiny_model_params)
    features = KerasEngine(extractor)(images)
    head = build_head(features.shape[1], CLASSES, dropout=0.3, seed=0)
    train_head(head, (features, labels), (features, labels), learning_rate=0.01, epochs=3,
               batch_size=8)
    return base, features, head


def test_head_on_cached_features_equals_full_model_on_images(trained, images):
    base, features, head = trained
    model = assemble_model(base, head)
    from_features = head.predict(features, verbose=0)
    from_images = model.predict(images.astype(np.float32), verbose=0)
    assert from_features.shape == (len(images), CLASSES)
    np.testing.assert_allclose(from_images, from_features, atol=1e-4)


@pytest.mark.parametrize("path", ["full", "auto"])
def test_finetuning_touches_only_layers_from_from_layer_up(trained, images, labels, path):
    base, _, head = trained
    model = assemble_model(base, head)
    backbone = model.get_layer("backbone")
    from_layer = 140
    unfreeze_from(model, from_layer)
    before = {w.path: np.array(w) for w in model.weights}
    batchnorm = [layer for layer in backbone.layers
                 if isinstance(layer, keras.layers.BatchNormalization)]
    assert batchnorm and not any(layer.trainable for layer in batchnorm)

    data = Split(images, labels.astype("int64"))
    recipe = Recipe(learning_rate=0.01, epochs=2, batch_size=8, seed=0,
                    augmentation=Augmentation(flip=True, brightness=0.1, contrast=0.1))
    outcome = fine_tune(model, data, data, recipe, path=path, make_engine=KerasEngine)
    assert outcome.path == {"full": "full", "auto": "cached"}[path]

    after = {w.path: np.array(w) for w in model.weights}
    changed = {path for path in before if not np.array_equal(before[path], after[path])}
    for index, layer in enumerate(backbone.layers):
        for weight in layer.weights:
            if index < from_layer or isinstance(layer, keras.layers.BatchNormalization):
                assert weight.path not in changed, f"{weight.path} (layer {index}) changed"
    moving = [w.path for layer in batchnorm for w in layer.non_trainable_weights]
    assert moving and not changed.intersection(moving)
    assert any(w.path in changed for layer in backbone.layers[from_layer:]
               for w in layer.weights), "no layer above from_layer learned anything"
    assert any("classifier" in path for path in changed)


def test_from_layer_beyond_depth_is_refused(trained):
    from retrain.errors import ParamsError

    base, _, head = trained
    with pytest.raises(ParamsError, match="finetune.from_layer: 500 is beyond"):
        unfreeze_from(assemble_model(base, head), 500)


def test_saved_keras_and_savedmodel_match_the_model(trained, images, tmp_path):
    base, _, head = trained
    model = assemble_model(base, head)
    pixels = images.astype(np.float32)
    expected = model.predict(pixels, verbose=0)
    model.save(tmp_path / "model.keras")
    model.export(str(tmp_path / "serving"), format="tf_saved_model", verbose=False)
    reloaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(reloaded.predict(pixels, verbose=0), expected, atol=1e-5)
    serving = tf.saved_model.load(str(tmp_path / "serving"))
    np.testing.assert_allclose(serving.serve(tf.constant(pixels)).numpy(), expected, atol=1e-5)


def test_extraction_twice_gives_identical_arrays(tiny_model_params, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    paths = []
    for i in range(10):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(paths[-1])
    arrays = []
    for run in range(2):
        make_deterministic(0)  # as the stage does: random init is seeded too
        _, extractor = build_extractor(tiny_model_params)
        extract_to_file(KerasEngine(extractor), paths, 32, 4, tmp_path / f"f{run}.npy")
        arrays.append(np.load(tmp_path / f"f{run}.npy"))
    assert arrays[0].shape == (10, 1280) and arrays[0].dtype == np.float32
    assert np.array_equal(arrays[0], arrays[1])


def test_balanced_class_weights_change_the_loss():
    features = np.random.default_rng(0).normal(size=(24, 16)).astype("float32")
    imbalanced = np.array([0] * 18 + [1] * 4 + [2] * 2)
    weights = balanced_class_weights(imbalanced, CLASSES)
    assert weights[2] > weights[1] > weights[0]
    assert weights[0] == pytest.approx(24 / (3 * 18))
    head = build_head(features.shape[1], CLASSES, dropout=0.0, seed=0)
    kernel, bias = head.get_layer("classifier").get_weights()
    rng = np.random.default_rng(0)  # a head whose probabilities differ between samples
    head.get_layer("classifier").set_weights([rng.normal(0, 5, kernel.shape).astype("float32"),
                                              bias])
    compile_classifier(head, 0.01)
    plain = head.evaluate(features, imbalanced, verbose=0)[0]
    sample_weight = np.array([weights[c] for c in imbalanced])
    weighted = head.evaluate(features, imbalanced, sample_weight=sample_weight, verbose=0)[0]
    probabilities = head.predict(features, verbose=0)
    per_sample = -np.log(probabilities[np.arange(24), imbalanced])
    assert plain == pytest.approx(per_sample.mean(), rel=1e-4)
    assert weighted == pytest.approx((per_sample * sample_weight).sum() / sample_weight.sum(),
                                     rel=1e-4)
    assert weighted != pytest.approx(plain, rel=1e-3)


def test_base_build_is_deterministic(tiny_model_params):
    make_deterministic(3)
    a = build_base(tiny_model_params).get_weights()
    make_deterministic(3)
    b = build_base(tiny_model_params).get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_a_fit_builds_its_training_graph_once():
    """compile_classifier creates the optimizer's and the metrics' variables up front: left
    to the first trace (Keras's TensorFlow trainer without a distribution strategy), they
    make `tf.function` trace the train step a second time, the whole graph built twice."""
    traced = []

    class CountTraces(keras.layers.Layer):
        def call(self, x, training=None):
            if training:
                traced.append(tuple(x.shape))  # runs only while a graph is being traced
            return x

    features = keras.Input((4,))
    model = keras.Model(features, keras.layers.Dense(3, activation="softmax")(
        CountTraces()(features)))
    compile_classifier(model, 0.01)
    rng = np.random.default_rng(0)
    history = model.fit(rng.random((20, 4), dtype=np.float32), np.arange(20) % 3,
                        batch_size=8, epochs=2, verbose=0)
    assert len(history.history["accuracy"]) == 2  # the metrics are there all the same
    assert traced == [(None, 4)]
