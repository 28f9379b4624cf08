"""The one backbone registry: which Keras application, its preprocessing and sizes.

Importing this module does not import Keras (a 5 s import), so the params loader checks
`model.*` against the registry before any stage downloads or builds anything. The networks
themselves are built in `retrain.base`.

`preprocess_input` is built into every model graph (`retrain.base.build_base`), so saved and
exported models take raw pixels in [0, 255]. EfficientNet rescales inside the network, so
its entry has no preprocessing: scaling twice would silently ruin its features.

A weights file stands in for the ImageNet weights (machines without a download), so it
must get the network `weights="imagenet"` gets. Keras builds EfficientNet differently for
the two: only for "imagenet" does it divide by the ImageNet standard deviation after its
Normalization layer. `as_imagenet_graph` adds that layer back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrain.errors import ParamsError


@dataclass(frozen=True)
class Backbone:
    name: str
    constructor: Callable[..., Any]  # a keras.applications constructor
    preprocess: Callable | None
    default_size: int
    imagenet_sizes: tuple[int, ...] | None  # sizes the ImageNet weights exist for; None: any
    takes_alpha: bool = False
    min_size: int = 32  # smallest input the architecture accepts
    # Turns the network Keras builds for weights=None into the one it builds for "imagenet",
    # where the two differ; applied before a weights file is loaded.
    as_imagenet_graph: Callable[[Any], Any] | None = None


def _apps():
    import keras

    return keras.applications


# keras/src/applications/efficientnet.py, IMAGENET_STDDEV_RGB
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)


def efficientnet_imagenet_graph(network):
    """EfficientNet with the std rescaling Keras adds after Normalization for "imagenet".

    Keras's Normalization divides by sqrt(variance) = std, the original EfficientNet by the
    variance (std^2), so Keras follows it with a Rescaling by 1 / sqrt(std): without it a
    weights file gives inputs about 2x too large per channel, and no error.
    """
    import keras

    def call(layer, *args, **kwargs):
        outputs = layer(*args, **kwargs)
        if isinstance(layer, keras.layers.Normalization):
            outputs = keras.layers.Rescaling([1 / std ** 0.5 for std in IMAGENET_STDDEV_RGB],
                                             name="imagenet_std_rescaling")(outputs)
        return outputs

    # The layers themselves are reused: only the graph between them changes.
    return keras.models.clone_model(network, clone_function=lambda layer: layer,
                                    call_function=call)


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
        lambda x: _apps().xception.preprocess_input(x), 299, None, min_size=71),
    "vgg16": Backbone(
        "vgg16", lambda **kw: _apps().VGG16(**kw),
        lambda x: _apps().vgg16.preprocess_input(x), 224, None),
    "efficientnet_b0": Backbone(
        "efficientnet_b0", lambda **kw: _apps().EfficientNetB0(**kw), None, 224, None,
        as_imagenet_graph=efficientnet_imagenet_graph),
}


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
    if size < backbone.min_size:
        raise ParamsError(f"model.image_size: {backbone.name} needs at least "
                          f"{backbone.min_size} px, got {size}")
    if weights == "imagenet" and backbone.imagenet_sizes and size not in backbone.imagenet_sizes:
        raise ParamsError(f"model.image_size: ImageNet weights for {backbone.name} exist for "
                          f"{', '.join(map(str, backbone.imagenet_sizes))} px, got {size}")
    if not backbone.takes_alpha and model["alpha"] != 1.0:
        raise ParamsError(f"model.alpha: only mobilenet_v2 has a width multiplier; "
                          f"use 1.0 with {backbone.name}")
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise ParamsError(f"model.weights: {weights}: file not found "
                          "(expected imagenet, none or a path to a weights file)")
