"""The one backbone registry: which Keras application, its preprocessing and default size.

`preprocess_input` is built into every model graph (`build_base` below), so saved and
exported models take raw pixels in [0, 255]. EfficientNet rescales inside the network, so
its entry has no preprocessing: scaling twice would silently ruin its features.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras

from retrain.errors import DownloadError, ParamsError


@dataclass(frozen=True)
class Backbone:
    name: str
    constructor: Callable[..., keras.Model]
    preprocess: Callable | None
    default_size: int
    imagenet_sizes: tuple[int, ...] | None  # sizes the ImageNet weights exist for; None: any
    takes_alpha: bool = False


def _apps():
    return keras.applications


REGISTRY: dict[str, Backbone] = {
    "mobilenet_v2": Backbone(
        "mobilenet_v2", lambda **kw: _apps().MobileNetV2(**kw),
        lambda x: _apps().mobilenet_v2.preprocess_input(x), 224,
        (96, 128, 160, 192, 224), takes_alpha=True),
    "resnet50_v2": Backbone(
        "resnet50_v2", lambda **kw: _apps().ResNet50V2(**kw),
        lambda x: _apps().resnet_v2.preprocess_input(x), 224, None),
    "xception": Backbone(
        "xception", lambda **kw: _apps().Xception(**kw),
        lambda x: _apps().xception.preprocess_input(x), 299, None),
    "vgg16": Backbone(
        "vgg16", lambda **kw: _apps().VGG16(**kw),
        lambda x: _apps().vgg16.preprocess_input(x), 224, None),
    "efficientnet_b0": Backbone(
        "efficientnet_b0", lambda **kw: _apps().EfficientNetB0(**kw), None, 224, None),
}

# Smallest input each backbone's architecture accepts.
MIN_SIZE = {"mobilenet_v2": 32, "resnet50_v2": 32, "xception": 71, "vgg16": 32,
            "efficientnet_b0": 32}


def get_backbone(name: str) -> Backbone:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ParamsError(f"model.backbone: unknown backbone {name!r} "
                          f"(expected one of {', '.join(REGISTRY)})") from None


def check_model_params(model: dict) -> None:
    """Fail early on combinations the weights or architecture cannot serve."""
    backbone = get_backbone(model["backbone"])
    size, weights = model["image_size"], model["weights"]
    if size < MIN_SIZE[backbone.name]:
        raise ParamsError(f"model.image_size: {backbone.name} needs at least "
                          f"{MIN_SIZE[backbone.name]} px, got {size}")
    if weights == "imagenet" and backbone.imagenet_sizes and size not in backbone.imagenet_sizes:
        raise ParamsError(f"model.image_size: ImageNet weights for {backbone.name} exist for "
                          f"{', '.join(map(str, backbone.imagenet_sizes))} px, got {size}")
    if not backbone.takes_alpha and model["alpha"] != 1.0:
        raise ParamsError(f"model.alpha: only mobilenet_v2 has a width multiplier; "
                          f"use 1.0 with {backbone.name}")
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise ParamsError(f"model.weights: {weights}: file not found "
                          "(expected imagenet, none or a path to a weights file)")


def build_base(model: dict) -> keras.Model:
    """The convolutional base without its top, taking raw [0, 255] pixels, frozen.

    Its output is the last feature map before pooling (what CAM weighs).
    """
    check_model_params(model)
    backbone = get_backbone(model["backbone"])
    size = model["image_size"]
    kwargs = {"include_top": False, "input_shape": (size, size, 3)}
    if backbone.takes_alpha:
        kwargs["alpha"] = model["alpha"]
    weights = model["weights"]
    try:
        network = backbone.constructor(weights="imagenet" if weights == "imagenet" else None,
                                       name="backbone", **kwargs)
    except Exception as exc:  # Keras raises a bare Exception when the download fails
        if weights != "imagenet":
            raise
        reason = str(exc).splitlines()[0][:300]
        raise DownloadError(f"model.weights: imagenet: cannot get the {backbone.name} ImageNet "
                            f"weights ({reason}); put the no-top .h5 file in ~/.keras/models "
                            "or set model.weights to its path") from None
    if weights not in ("imagenet", "none"):
        _load_weights_file(network, weights, backbone.name)

    pixels = keras.Input((size, size, 3), name="pixels")
    x = Preprocess(backbone.name, name="preprocess")(pixels)
    features = network(x, training=False)
    base = keras.Model(pixels, features, name=f"{backbone.name}_base")
    base.trainable = False
    return base


def _load_weights_file(network: keras.Model, path: str, name: str) -> None:
    try:
        network.load_weights(path)
    except (ValueError, OSError, KeyError) as exc:
        reason = str(exc).splitlines()[0][:200]
        raise ParamsError(f"model.weights: {path} does not fit {name} with these "
                          f"model.* params ({reason})") from None


@keras.saving.register_keras_serializable(package="retrain")
class Preprocess(keras.layers.Layer):
    """The backbone's own `preprocess_input`, as a layer so it travels inside saved models."""

    def __init__(self, backbone: str, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone

    def call(self, pixels):
        preprocess = get_backbone(self.backbone).preprocess
        pixels = keras.ops.cast(pixels, "float32")
        return preprocess(pixels) if preprocess else pixels

    def get_config(self):
        return {**super().get_config(), "backbone": self.backbone}
