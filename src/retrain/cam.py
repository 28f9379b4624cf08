"""Class activation maps: where in the photo the classifier found its class.

CAM (Zhou et al., 2016) applies to the model `assemble_model` builds, a Dense layer on the
global average of the last feature map A: the class score is sum_k w[k, c] * mean(A_k) + b_c,
so the map sum_k w[k, c] * A_k shows where that score comes from. Grad-CAM (Selvaraju et
al., 2017) weighs each channel by the mean gradient of the class score instead, which works
for any differentiable head (hidden layers, other pooling). For a GAP + Dense head the two
agree up to a ReLU and a constant factor.

Maps have the feature map's resolution (7x7 for a 224 px MobileNetV2) and are upsampled
bilinearly with half-pixel centres, so each cell lands on the image block it was computed
from.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from retrain.base import BACKBONE
from retrain.errors import ParamsError

METHODS = ("cam", "gradcam")


@dataclass(frozen=True)
class CamResult:
    classes: np.ndarray        # (n,) predicted class index
    probabilities: np.ndarray  # (n, classes)
    maps: np.ndarray           # (n, h, w) at the feature map's resolution, in [0, 1]
    heatmaps: np.ndarray       # (n, height, width) upsampled to the images, in [0, 1]

    @property
    def confidence(self) -> np.ndarray:
        """Probability of the predicted class, per image."""
        return self.probabilities[np.arange(len(self.classes)), self.classes]


def class_activation_map(feature_map: np.ndarray, kernel: np.ndarray,
                         class_index: int) -> np.ndarray:
    """CAM of one image: feature map (h, w, k) weighed by kernel column (k,) -> (h, w).

    Min-max normalised to [0, 1]; a flat map (no evidence anywhere) becomes all zeros.
    """
    weights = np.asarray(kernel, np.float64)[:, class_index]
    raw = np.einsum("hwk,k->hw", np.asarray(feature_map, np.float64), weights)
    return _min_max(raw).astype(np.float32)


def _min_max(raw: np.ndarray) -> np.ndarray:
    low, high = raw.min(), raw.max()
    if not high - low > 1e-12 * max(1.0, abs(high)):
        return np.zeros_like(raw)
    return (raw - low) / (high - low)


def upsample(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of (n, h, w) maps to (n, height, width), half-pixel centres."""
    if len(maps) == 0:
        return np.zeros((0, height, width), np.float32)
    resized = tf.image.resize(np.asarray(maps, np.float32)[..., None], (height, width),
                              method="bilinear")
    return np.clip(resized.numpy()[..., 0], 0.0, 1.0)


def _split_layers(model: keras.Model) -> tuple[list, list]:
    """The model's layers up to the last feature map (the backbone) and the head after it."""
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    names = [layer.name for layer in layers]
    if BACKBONE in names:
        cut = names.index(BACKBONE) + 1
    else:
        spatial = [i for i, layer in enumerate(layers) if len(layer.output.shape) == 4]
        if not spatial:
            raise ParamsError(f"{model.name}: no layer named {BACKBONE!r} and no layer with a "
                              "spatial (4-D) output, so there is no feature map to explain")
        cut = spatial[-1] + 1
    if cut == len(layers):
        raise ParamsError(f"{model.name}: nothing follows the feature map, so there is no "
                          "classifier to explain")
    return layers[:cut], layers[cut:]


def _apply(layers: list, x):
    for layer in layers:
        x = layer(x, training=False)
    return x


def _features_model(model: keras.Model, front: list) -> keras.Model:
    pixels = keras.Input(model.input_shape[1:], name="pixels")
    return keras.Model(pixels, _apply(front, pixels), name="feature_map")


def feature_map_model(model: keras.Model) -> keras.Model:
    """pixels -> (last feature map before pooling, probabilities), sharing `model`'s layers."""
    front, head = _split_layers(model)
    pixels = keras.Input(model.input_shape[1:], name="pixels")
    feature_map = _apply(front, pixels)
    probabilities = _apply(head, feature_map)
    return keras.Model(pixels, [feature_map, probabilities], name="feature_map_model")


def cam_kernel(model: keras.Model) -> np.ndarray:
    """The Dense kernel (k, classes) CAM weighs the feature map with.

    Raises ParamsError when the head is not global average pooling (+ dropout) + one Dense.
    """
    _, head = _split_layers(model)
    return _cam_kernel(head)


def _cam_kernel(head: list) -> np.ndarray:
    *between, last = head
    fits = (isinstance(last, keras.layers.Dense) and between
            and isinstance(between[0], keras.layers.GlobalAveragePooling2D)
            and all(isinstance(layer, keras.layers.Dropout) for layer in between[1:]))
    if not fits:
        found = " -> ".join(type(layer).__name__ for layer in head)
        raise ParamsError("render.cam_method: plain CAM needs global average pooling and "
                          f"one Dense layer after the feature map, this head is {found}; "
                          "use gradcam")
    return keras.ops.convert_to_numpy(last.kernel)


def _scores(head: list, feature_map):
    """(class scores, probabilities): pre-softmax logits where the last layer is a softmax
    Dense, since softmax gradients of a confident prediction vanish (Grad-CAM uses logits)."""
    x = _apply(head[:-1], feature_map)
    last = head[-1]
    activation = getattr(getattr(last, "activation", None), "__name__", "")
    if isinstance(last, keras.layers.Dense) and activation == "softmax":
        logits = keras.ops.matmul(x, last.kernel)
        if last.use_bias:
            logits = logits + last.bias
        return logits, keras.ops.softmax(logits)
    output = last(x, training=False)
    return output, output


def _gradcam_batch(head: list, feature_map: tf.Tensor) -> tuple[np.ndarray, np.ndarray]:
    with tf.GradientTape() as tape:
        tape.watch(feature_map)
        scores, probabilities = _scores(head, feature_map)
        predicted = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        # Each image's score depends on its own feature map only (inference mode), so one
        # gradient of the sum gives every image's gradient at once.
        picked = tf.reduce_sum(tf.gather(scores, predicted, axis=1, batch_dims=1))
    gradients = tape.gradient(picked, feature_map)
    channel_weights = tf.reduce_mean(gradients, axis=(1, 2))
    raw = tf.nn.relu(tf.einsum("nhwk,nk->nhw", feature_map, channel_weights)).numpy()
    peak = raw.max(axis=(1, 2), keepdims=True)
    maps = np.divide(raw, peak, out=np.zeros_like(raw), where=peak > 1e-12)
    return maps, np.asarray(probabilities)


def cam_for_images(model: keras.Model, images: np.ndarray, method: str = "cam",
                   batch_size: int = 16) -> CamResult:
    """Predicted class, probabilities and its heat map for each raw-pixel image (n, H, W, 3)."""
    if method not in METHODS:
        raise ParamsError(f"render.cam_method: expected one of {', '.join(METHODS)}, "
                          f"got {method!r}")
    front, head = _split_layers(model)
    kernel = _cam_kernel(head) if method == "cam" else None
    features = _features_model(model, front)
    classes_out = model.output_shape[-1]
    maps, probabilities = [], []
    for start in range(0, len(images), batch_size):
        batch = tf.constant(np.asarray(images[start : start + batch_size], np.float32))
        feature_map = features(batch, training=False)
        if method == "cam":
            batch_probabilities = keras.ops.convert_to_numpy(_apply(head, feature_map))
            feature_map = keras.ops.convert_to_numpy(feature_map)
            maps += [class_activation_map(f, kernel, int(p.argmax()))
                     for f, p in zip(feature_map, batch_probabilities, strict=True)]
        else:
            batch_maps, batch_probabilities = _gradcam_batch(head, feature_map)
            maps += list(batch_maps)
        probabilities.append(batch_probabilities)
    if not maps:
        return CamResult(np.zeros(0, np.int64), np.zeros((0, classes_out), np.float32),
                         np.zeros((0, *features.output.shape[1:3]), np.float32),
                         np.zeros((0, *images.shape[1:3]), np.float32))
    probabilities = np.concatenate(probabilities).astype(np.float32)
    maps = np.stack(maps).astype(np.float32)
    return CamResult(probabilities.argmax(axis=1), probabilities, maps,
                     upsample(maps, images.shape[1], images.shape[2]))
