"""Class activation maps against NumPy references on tiny models with known weights."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from retrain.base import build_base
from retrain.cam import (
    cam_for_images,
    cam_kernel,
    class_activation_map,
    feature_map_model,
    upsample,
)
from retrain.errors import ParamsError
from retrain.finetune import assemble_model
from retrain.head import build_head

SIZE, STRIDE, CHANNELS, CLASSES = 16, 4, 6, 3


def _min_max(raw: np.ndarray) -> np.ndarray:
    low = raw.min(axis=(-2, -1), keepdims=True)
    high = raw.max(axis=(-2, -1), keepdims=True)
    return (raw - low) / (high - low)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _tiny_model(weights: dict, hidden: int = 0) -> keras.Model:
    """pixels -> preprocess -> backbone (1x1 conv, stride 4, ReLU) -> pool -> dropout ->
    [hidden Dense] -> classifier: the layout `assemble_model` builds, small enough to
    compute by hand."""
    inner = keras.Input((SIZE, SIZE, 3))
    conv = keras.layers.Conv2D(CHANNELS, 1, strides=STRIDE, activation="relu", name="conv")
    backbone = keras.Model(inner, conv(inner), name="backbone")
    pixels = keras.Input((SIZE, SIZE, 3), name="pixels")
    x = keras.layers.Rescaling(1 / 255, name="preprocess")(pixels)
    x = backbone(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(0.5, name="dropout")(x)
    if hidden:
        x = keras.layers.Dense(hidden, activation="relu", name="hidden")(x)
    classifier = keras.layers.Dense(CLASSES, activation="softmax", name="classifier")
    model = keras.Model(pixels, classifier(x))
    conv.set_weights([weights["conv"][None, None], weights["conv_bias"]])
    if not hidden:
        classifier.set_weights([weights["dense"], weights["dense_bias"]])
    return model


@pytest.fixture(scope="module")
def known():
    rng = np.random.default_rng(0)
    weights = {"conv": rng.normal(size=(3, CHANNELS)).astype(np.float32),
               "conv_bias": rng.normal(0.1, 0.1, size=CHANNELS).astype(np.float32),
               "dense": rng.normal(size=(CHANNELS, CLASSES)).astype(np.float32),
               "dense_bias": rng.normal(size=CLASSES).astype(np.float32)}
    images = rng.integers(0, 256, size=(5, SIZE, SIZE, 3), dtype=np.uint8)
    # The NumPy reference: the strided 1x1 conv reads every STRIDE-th pixel.
    sampled = images[:, ::STRIDE, ::STRIDE].astype(np.float64) / 255
    feature_map = np.maximum(
        np.einsum("nhwc,ck->nhwk", sampled, weights["conv"]) + weights["conv_bias"], 0)
    probabilities = _softmax(feature_map.mean(axis=(1, 2)) @ weights["dense"]
                             + weights["dense_bias"])
    classes = probabilities.argmax(axis=1)
    raw = np.einsum("nhwk,kn->nhw", feature_map, weights["dense"][:, classes])
    return {"model": _tiny_model(weights), "weights": weights, "images": images,
            "feature_map": feature_map, "probabilities": probabilities, "classes": classes,
            "raw": raw}


def test_class_activation_map_matches_numpy_reference():
    rng = np.random.default_rng(1)
    feature_map = rng.normal(size=(5, 4, 8))
    kernel = rng.normal(size=(8, 3))
    for class_index in range(3):
        expected = _min_max(np.einsum("hwk,k->hw", feature_map, kernel[:, class_index]))
        cam = class_activation_map(feature_map, kernel, class_index)
        assert cam.shape == (5, 4)
        np.testing.assert_allclose(cam, expected, atol=1e-5)
        assert cam.min() == 0 and cam.max() == pytest.approx(1)


def test_flat_map_is_zero_not_nan():
    cam = class_activation_map(np.ones((3, 3, 2)), np.ones((2, 1)), 0)
    np.testing.assert_array_equal(cam, np.zeros((3, 3)))


def test_cam_for_images_matches_numpy_reference_on_known_model(known):
    result = cam_for_images(known["model"], known["images"], "cam", batch_size=2)
    np.testing.assert_array_equal(result.classes, known["classes"])
    np.testing.assert_allclose(result.probabilities, known["probabilities"], atol=1e-5)
    np.testing.assert_allclose(result.maps, _min_max(known["raw"]), atol=1e-5)
    np.testing.assert_allclose(
        result.confidence, known["probabilities"].max(axis=1), atol=1e-5)
    np.testing.assert_allclose(cam_kernel(known["model"]), known["weights"]["dense"])
    assert result.heatmaps.shape == (5, SIZE, SIZE)
    assert 0 <= result.heatmaps.min() and result.heatmaps.max() <= 1


def test_gradcam_of_a_gap_dense_head_is_the_rectified_cam(known):
    # d logit_c / d A_ijk = w[k, c] / (h * w): Grad-CAM's channel weights are CAM's, scaled.
    result = cam_for_images(known["model"], known["images"], "gradcam")
    rectified = np.maximum(known["raw"], 0)
    peak = rectified.max(axis=(1, 2), keepdims=True)
    expected = np.divide(rectified, peak, out=np.zeros_like(rectified), where=peak > 0)
    np.testing.assert_array_equal(result.classes, known["classes"])
    np.testing.assert_allclose(result.probabilities, known["probabilities"], atol=1e-5)
    np.testing.assert_allclose(result.maps, expected, atol=1e-5)


def test_plain_cam_refuses_a_hidden_layer_head_and_gradcam_explains_it(known):
    model = _tiny_model(known["weights"], hidden=4)
    with pytest.raises(ParamsError, match="render.cam_method.*gradcam"):
        cam_for_images(model, known["images"], "cam")
    result = cam_for_images(model, known["images"], "gradcam")
    np.testing.assert_allclose(result.probabilities, model.predict(known["images"], verbose=0),
                               atol=1e-5)
    assert result.heatmaps.shape == (5, SIZE, SIZE)
    assert np.isfinite(result.maps).all()
    assert 0 <= result.maps.min() and result.maps.max() <= 1


def test_unknown_method_is_a_params_error(known):
    with pytest.raises(ParamsError, match="render.cam_method"):
        cam_for_images(known["model"], known["images"], "saliency")


def test_no_images_give_empty_results(known):
    result = cam_for_images(known["model"], known["images"][:0])
    assert result.classes.shape == (0,)
    assert result.probabilities.shape == (0, CLASSES)
    assert result.heatmaps.shape == (0, SIZE, SIZE)


def test_upsampling_puts_each_cell_on_its_image_block():
    maps = np.zeros((1, 4, 4), np.float32)
    maps[0, 0, 3] = 1.0  # top-right cell covers rows 0-3, columns 12-15 of a 16 px image
    heat = upsample(maps, 16, 16)[0]
    row, col = np.unravel_index(heat.argmax(), heat.shape)
    assert row <= 3 and col >= 12
    assert heat[:4, 12:].mean() > 4 * heat[4:, :12].mean()
    # Half-pixel centres: a symmetric map stays symmetric (no shift of half a cell).
    symmetric = np.zeros((1, 4, 4), np.float32)
    symmetric[0, 1:3, 1:3] = 1.0
    heat = upsample(symmetric, 16, 16)[0]
    np.testing.assert_allclose(heat, heat[::-1, ::-1], atol=1e-6)


@pytest.fixture(scope="module")
def registry_model():
    base = build_base({"backbone": "mobilenet_v2", "weights": "none", "image_size": 64,
                       "alpha": 0.35})
    head = build_head(base.output.shape[-1], 4, dropout=0.3, seed=0)
    rng = np.random.default_rng(2)
    head.get_layer("classifier").set_weights(
        [rng.normal(0, 0.5, size=(base.output.shape[-1], 4)).astype(np.float32),
         np.zeros(4, np.float32)])
    return base, assemble_model(base, head)


def test_feature_map_model_shares_the_full_models_layers(registry_model):
    base, model = registry_model
    images = np.random.default_rng(3).integers(0, 256, (3, 64, 64, 3)).astype(np.float32)
    feature_map, probabilities = feature_map_model(model)(images, training=False)
    assert tuple(feature_map.shape) == (3, 2, 2, base.output.shape[-1])
    np.testing.assert_allclose(np.asarray(probabilities), np.asarray(model(images)),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(feature_map), np.asarray(base(images)), atol=1e-4)
    kernel = cam_kernel(model)
    result = cam_for_images(model, images.astype(np.uint8), "cam")
    reference = [class_activation_map(f, kernel, c)
                 for f, c in zip(np.asarray(feature_map), result.classes, strict=True)]
    np.testing.assert_allclose(result.maps, reference, atol=1e-5)
    assert result.heatmaps.shape == (3, 64, 64)
