"""The two fine-tuning paths: the upper part on the frozen part's outputs is the full model,
for every registry backbone, and both paths train on the same views in the same batches."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from retrain.augment import Augmentation
from retrain.backbones import REGISTRY
from retrain.base import build_base
from retrain.features import KerasEngine
from retrain.finetune import (
    Recipe,
    Split,
    assemble_model,
    fine_tune,
    fine_tune_replicates,
    replicate_seeds,
    unfreeze_from,
)
from retrain.frozen_part import cut_frozen_part
from retrain.head import build_head
from retrain.reproducibility import make_deterministic

pytestmark = pytest.mark.slow
CLASSES = 3
AUGMENT = Augmentation(flip=True, brightness=0.1, contrast=0.1)

# Per backbone: smallest input, and a from_layer whose cut crosses a residual connection
# (two or more tensors) where the architecture has them.
CASES = {
    "mobilenet_v2": (32, 135, ["block_15_expand_relu", "block_14_add"]),
    "resnet50_v2": (32, 154, None),
    "xception": (71, 116, None),
    "vgg16": (32, 15, ["block4_pool"]),
    "efficientnet_b0": (32, 200, None),
}


def build_model(backbone: str, size: int, from_layer: int, seed: int = 0,
                dropout: float = 0.3, train_batchnorm: bool = False) -> keras.Model:
    make_deterministic(seed)
    params = {"backbone": backbone, "weights": "none", "image_size": size,
              "alpha": 0.35 if backbone == "mobilenet_v2" else 1.0}
    base = build_base(params)
    model = assemble_model(base, build_head(base.output.shape[-1], CLASSES, dropout, seed))
    unfreeze_from(model, from_layer, train_batchnorm)
    return model


def make_head_sensitive(model: keras.Model, images: np.ndarray) -> None:
    """Scale the classifier to the features' size: random-weight features can be ~1e-12,
    where every image would get the same probabilities and no comparison could fail."""
    features = keras.Model(model.input, model.get_layer("pool").output)(images).numpy()
    spread = features.std(axis=0).max() or 1.0
    shape = model.get_layer("classifier").get_weights()[0].shape
    kernel = np.random.default_rng(0).normal(size=shape) * 3 / (spread * np.sqrt(shape[0]))
    bias = -features.mean(axis=0) @ kernel  # logits centred on zero
    model.get_layer("classifier").set_weights([kernel.astype("f4"), bias.astype("f4")])


def loss_and_gradients(model, inputs, labels):
    """Probabilities, and the loss gradient per trainable variable (by the variable's id)."""
    with tf.GradientTape() as tape:
        probabilities = model(inputs, training=False)
        loss = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
    gradients = tape.gradient(loss, model.trainable_variables)
    return probabilities.numpy(), dict(zip(map(id, model.trainable_variables), gradients))


def assert_close_relative(actual, expected, tolerance, label):
    scale = float(np.max(np.abs(expected)))
    assert scale > 0, f"{label}: all zero, the comparison means nothing"
    error = float(np.max(np.abs(np.asarray(actual) - np.asarray(expected))))
    assert error <= tolerance * scale, f"{label}: differs by {error:.3g} (scale {scale:.3g})"


def test_every_registry_backbone_is_covered():
    assert set(CASES) == set(REGISTRY)


@pytest.mark.parametrize("backbone", CASES)
def test_upper_part_on_frozen_outputs_is_the_full_model(backbone):
    size, from_layer, expected_cut = CASES[backbone]
    model = build_model(backbone, size, from_layer)
    images = np.random.default_rng(1).integers(0, 256, (6, size, size, 3)).astype("float32")
    make_head_sensitive(model, images)
    labels = np.arange(6) % CLASSES

    cut = cut_frozen_part(model)
    if expected_cut:
        assert cut.names == expected_cut
    assert not cut.lower.trainable_weights
    # The same variables, nothing else.
    assert {id(v) for v in cut.upper.trainable_variables} == \
        {id(v) for v in model.trainable_variables}

    full, full_gradients = loss_and_gradients(model, images, labels)
    assert np.ptp(full, axis=0).max() > 0.01, "every image gets the same probabilities"
    outputs = cut.split(KerasEngine(cut.lower)(images.copy()))
    upper, upper_gradients = loss_and_gradients(cut.upper, list(outputs), labels)
    np.testing.assert_allclose(upper, full, atol=1e-4)
    for variable in model.trainable_variables:
        assert_close_relative(upper_gradients[id(variable)], full_gradients[id(variable)],
                              1e-4, variable.path)


@pytest.mark.parametrize("backbone", CASES)
def test_the_base_runs_in_inference_mode_while_the_model_trains(backbone):
    """`fit` calls the model with training=True; the base inside it (and the upper part's
    share of it) must still run as in inference: BatchNorm on its moving statistics,
    EfficientNet's stochastic-depth Dropout off. The head's own dropout is 0 here, so the
    same input must give the same output, and the output `predict` gives."""
    size, from_layer, _ = CASES[backbone]
    model = build_model(backbone, size, from_layer, dropout=0.0)
    images = np.random.default_rng(1).integers(0, 256, (4, size, size, 3)).astype("float32")
    make_head_sensitive(model, images)
    inference = model(images, training=False).numpy()
    for _ in range(2):
        np.testing.assert_array_equal(model(images, training=True).numpy(), inference)
    cut = cut_frozen_part(model)
    outputs = list(cut.split(KerasEngine(cut.lower)(images.copy())))
    upper = cut.upper(outputs, training=False).numpy()
    for _ in range(2):
        np.testing.assert_array_equal(cut.upper(outputs, training=True).numpy(), upper)


def test_training_batchnorm_from_scratch_runs_the_base_in_training_mode():
    """The from-scratch baseline (`finetune.train_batchnorm`) does want batch statistics."""
    model = build_model("mobilenet_v2", 32, 0, dropout=0.0, train_batchnorm=True)
    images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3)).astype("float32")
    make_head_sensitive(model, images)
    assert not np.allclose(model(images, training=True).numpy(),
                           model(images, training=False).numpy(), atol=1e-4)


def assert_litert_cut_reproduces(model, images: np.ndarray, params: dict) -> np.ndarray:
    """The frozen part under LiteRT, then the upper part in Keras: the full model's outputs
    (1e-4) and gradients (1e-4 relative) for every trainable variable. Returns the outputs."""
    from retrain.litert import LiteRTEngine

    labels = np.arange(len(images)) % CLASSES
    cut = cut_frozen_part(model)
    full, full_gradients = loss_and_gradients(model, images, labels)
    engine = LiteRTEngine(cut.lower, params)
    upper, upper_gradients = loss_and_gradients(cut.upper, list(cut.split(engine(images))),
                                                labels)
    np.testing.assert_allclose(upper, full, atol=1e-4)
    for variable in model.trainable_variables:
        assert_close_relative(upper_gradients[id(variable)], full_gradients[id(variable)],
                              1e-4, variable.path)
    return full


def test_litert_outputs_of_the_frozen_part_reproduce_the_full_model(tiny_model_params):
    from retrain.litert import litert_available

    if not litert_available():
        pytest.skip("ai-edge-litert is not installed")
    model = build_model("resnet50_v2", 32, 154)
    images = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3)).astype("float32")
    make_head_sensitive(model, images)
    assert_litert_cut_reproduces(model, images, {"backbone": "resnet50_v2"})


def test_with_imagenet_weights_litert_outputs_reproduce_the_full_model():
    """The default recipe (MobileNetV2 from layer 135) with real weights, where features and
    probabilities have their real sizes: LiteRT's lower part, then the upper part."""
    from conftest import real_weights_or_skip

    from retrain.litert import litert_available

    weights = real_weights_or_skip()
    if not litert_available():
        pytest.skip("ai-edge-litert is not installed")
    make_deterministic(0)
    params = {"backbone": "mobilenet_v2", "weights": str(weights), "image_size": 224,
              "alpha": 0.35}
    base = build_base(params)
    model = assemble_model(base, build_head(base.output.shape[-1], CLASSES, 0.3, 0))
    unfreeze_from(model, 135)
    images = np.random.default_rng(4).integers(0, 256, (8, 224, 224, 3)).astype("float32")
    make_head_sensitive(model, images)
    full = assert_litert_cut_reproduces(model, images, params)
    assert np.ptp(full, axis=0).max() > 0.01  # real probabilities, not a flat guess


def test_a_frozen_backbone_leaves_only_the_head_to_train():
    model = build_model("mobilenet_v2", 32, 153)  # out_relu: no weights above it
    cut = cut_frozen_part(model)
    assert cut.names == ["out_relu"]
    assert {w.path for w in cut.upper.trainable_weights} == \
        {w.path for w in model.get_layer("classifier").weights}


def test_from_layer_zero_leaves_nothing_to_cut():
    assert cut_frozen_part(build_model("mobilenet_v2", 32, 0)) is None


@pytest.fixture
def data():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    labels = (np.arange(40) % CLASSES).astype("int64")
    return Split(images[:30], labels[:30]), Split(images[30:], labels[30:])


def train(path: str, data, from_layer: int = 135, epochs: int = 2,
          backbone: str = "mobilenet_v2", **kwargs):
    model = build_model(backbone, 32, from_layer, seed=3)
    make_head_sensitive(model, data[0].images[:8].astype("float32"))
    recipe = Recipe(learning_rate=1e-3, epochs=epochs, batch_size=8, seed=5,
                    augmentation=kwargs.pop("augmentation", AUGMENT))
    kwargs.setdefault("make_engine", KerasEngine)
    outcome = fine_tune(model, *data, recipe, path=path, **kwargs)
    return model, outcome


def test_both_paths_train_on_the_same_views_in_the_same_batches(data):
    full_model, full = train("full", data)
    cached_model, cached = train("auto", data)
    assert (full.path, cached.path) == ("full", "cached")
    assert cached.details["cut"] and cached.details["kept_mb"] > 0
    for name in ("loss", "val_loss", "accuracy"):
        np.testing.assert_allclose(cached.history.history[name], full.history.history[name],
                                   rtol=1e-4, err_msg=name)
    for a, b in zip(full_model.weights, cached_model.weights):
        assert a.path == b.path
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-3, atol=1e-6, err_msg=a.path)
    start = build_model("mobilenet_v2", 32, 135, seed=3)
    changed = sum(not np.array_equal(a.numpy(), b.numpy())
                  for a, b in zip(start.weights, cached_model.weights))
    assert changed, "training changed nothing"


def test_efficientnet_trains_the_same_weights_on_both_paths(data):
    """EfficientNet's stochastic-depth Dropout layers sit below and above the cut: on both
    paths the base runs in inference mode, so one epoch gives the same weights."""
    from_layer = CASES["efficientnet_b0"][1]
    full_model, full = train("full", data, from_layer, epochs=1, backbone="efficientnet_b0")
    cached_model, cached = train("auto", data, from_layer, epochs=1,
                                 backbone="efficientnet_b0")
    assert (full.path, cached.path) == ("full", "cached")
    backbone = full_model.get_layer("backbone")
    below_the_cut = backbone.layers[:backbone.layers.index(
        backbone.get_layer(cached.details["cut"][0]))]
    assert any(isinstance(layer, keras.layers.Dropout) for layer in below_the_cut)
    start = build_model("efficientnet_b0", 32, from_layer, seed=3)
    moved = max(np.abs(a.numpy() - b.numpy()).max()
                for a, b in zip(start.trainable_weights, full_model.trainable_weights))
    assert moved > 1e-3, "one epoch moved no weight: the comparison means nothing"
    # Auto-named layers (EfficientNet's Normalization) differ in suffix between two builds.
    for a, b in zip(full_model.weights, cached_model.weights, strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=0, atol=1e-4, err_msg=a.path)


def test_views_kept_or_recomputed_give_the_same_training(data):
    flips_only = Augmentation(flip=True)
    _, kept = train("auto", data, augmentation=flips_only)
    _, recomputed = train("auto", data, augmentation=flips_only, cache_bytes=0)
    assert kept.details["kept_mb"] > 0 and recomputed.details["kept_mb"] == 0
    for name in ("loss", "val_loss"):
        np.testing.assert_allclose(kept.history.history[name],
                                   recomputed.history.history[name], rtol=1e-6)


class CountingEngine(KerasEngine):
    """Keras, counting the images that pass the frozen part."""

    images = 0

    def __call__(self, batch):
        CountingEngine.images += len(batch)
        return super().__call__(batch)


def test_bounded_views_pass_the_frozen_part_once_each_and_train_as_the_full_path(data):
    """With `views: 2` over 4 epochs the frozen part computes each training image's two
    views once (and the validation images once): half the work of new views every epoch,
    and the same training as the full path on the same views."""
    bounded = Augmentation(flip=True, brightness=0.1, contrast=0.1, views=2)
    counts = {}
    for views in (bounded, AUGMENT):
        CountingEngine.images = 0
        _, outcome = train("auto", data, epochs=4, augmentation=views,
                           make_engine=CountingEngine)
        counts[views.views] = CountingEngine.images
    train_rows, val_rows = len(data[0].labels), len(data[1].labels)
    assert counts == {2: 2 * train_rows + val_rows, 0: 4 * train_rows + val_rows}
    full_model, full = train("full", data, epochs=4, augmentation=bounded)
    cached_model, cached = train("auto", data, epochs=4, augmentation=bounded)
    assert cached.details["kept_mb"] > 0
    for name in ("loss", "val_loss"):
        np.testing.assert_allclose(cached.history.history[name], full.history.history[name],
                                   rtol=1e-4, err_msg=name)


def test_replicate_seeds_start_with_the_run_seed_differ_and_reproduce():
    seeds = replicate_seeds(42, 5)
    assert seeds[0] == 42 and len(set(seeds)) == 5 and 43 not in seeds
    assert replicate_seeds(42, 5) == seeds and replicate_seeds(42, 2) == seeds[:2]
    assert replicate_seeds(7, 3)[1:] != seeds[1:3]
    assert all(0 <= seed < 2**31 for seed in seeds)


def test_replicates_share_the_frozen_outputs_and_each_trains_as_it_would_alone(data):
    """Two replicates on the cached path read one set of frozen-part outputs of the shared
    views; each trains exactly as it does alone, and their own orders make them differ."""
    seeds = replicate_seeds(5, 2)
    recipes = [Recipe(learning_rate=1e-3, epochs=2, batch_size=8, seed=seed,
                      augmentation=AUGMENT, view_seed=5) for seed in seeds]

    def model():
        built = build_model("mobilenet_v2", 32, 135, seed=3)
        make_head_sensitive(built, data[0].images[:8].astype("float32"))
        return built

    models = [model(), model()]
    shared = list(fine_tune_replicates(iter(models), *data, recipes, make_engine=KerasEngine))
    assert all(o.path == "cached" and o.details["replicates_share_frozen_outputs"]
               for o in shared)
    alone_model = model()
    alone = fine_tune(alone_model, *data, recipes[1], make_engine=KerasEngine)
    for name in ("loss", "val_loss"):
        np.testing.assert_allclose(shared[1].history.history[name], alone.history.history[name],
                                   rtol=1e-5, err_msg=name)
    assert not np.allclose(shared[0].history.history["loss"], shared[1].history.history["loss"])
    moved = [np.abs(a.numpy() - b.numpy()).max()
             for a, b in zip(models[0].trainable_weights, models[1].trainable_weights)]
    assert max(moved) > 0, "two training orders gave the same weights"


@pytest.mark.parametrize("kwargs, reason", [
    ({"path": "full"}, "finetune.path: full"),
    ({"path": "auto", "train_batchnorm": True}, "finetune.train_batchnorm"),
    ({"path": "auto", "from_layer": 0}, "nothing but preprocessing is frozen"),
])
def test_full_path_where_the_cached_one_does_not_apply(data, kwargs, reason):
    _, outcome = train(kwargs.pop("path"), data, epochs=1, **kwargs)
    assert outcome.path == "full"
    assert reason in outcome.details["reason"]


def test_read_ahead_keeps_order_and_reraises_the_producers_error():
    import threading

    from retrain.finetune import read_ahead

    assert list(read_ahead(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("engine failed")

    with pytest.raises(ValueError, match="engine failed"):
        list(read_ahead(failing()))

    produced = []

    def endless():
        for i in range(10**6):
            produced.append(i)
            yield i

    reader = read_ahead(endless(), depth=2)
    assert [next(reader) for _ in range(3)] == [0, 1, 2]
    reader.close()  # what tf.data does with an iterator it no longer needs
    for thread in threading.enumerate():
        if thread.name == "retrain-read-ahead":
            thread.join(timeout=5)
    assert len(produced) < 10  # the producer stopped, bounded by the queue
