"""The frozen convolutional base of a registry backbone, and the layer that preprocesses for it.

Every module that loads a saved model imports this one first: it registers `Preprocess`.
"""

from __future__ import annotations

import keras

from retrain.backbones import check_model_params, get_backbone
from retrain.errors import DownloadError, ParamsError, first_line

# The name of the nested keras.applications network inside every base (and full model).
BACKBONE = "backbone"


def build_base(model: dict, seed: int = 0) -> keras.Model:
    """The convolutional base without its top, taking raw [0, 255] pixels, frozen.

    Its output is the last feature map before pooling (what CAM weighs). Its random
    initialisation (what `model.weights: none` keeps) comes from `seed` alone: Keras
    initialisers draw from the global seed stream, which loading any model (the head in
    `finetune`) advances, so the generators are reseeded here. Every stage that builds a
    base from the same params and seed gets the same network as `extract` did.
    """
    check_model_params(model)
    keras.utils.set_random_seed(seed)
    backbone = get_backbone(model["backbone"])
    size = model["image_size"]
    kwargs = {"include_top": False, "input_shape": (size, size, 3)}
    if backbone.takes_alpha:
        kwargs["alpha"] = model["alpha"]
    weights = model["weights"]
    try:
        network = backbone.constructor(weights="imagenet" if weights == "imagenet" else None,
                                       name=BACKBONE, **kwargs)
    except Exception as exc:  # Keras raises a bare Exception when the download fails
        if weights != "imagenet":
            raise
        reason = first_line(exc, 300)
        raise DownloadError(f"model.weights: imagenet: cannot get the {backbone.name} ImageNet "
                            f"weights ({reason}); put the no-top .h5 file in ~/.keras/models "
                            "or set model.weights to its path") from None
    if weights not in ("imagenet", "none"):
        if backbone.as_imagenet_graph:  # a weights file stands in for the ImageNet weights
            network = backbone.as_imagenet_graph(network)
        _load_weights_file(network, weights, backbone.name)

    pixels = keras.Input((size, size, 3), name="pixels")
    x = Preprocess(backbone.name, name="preprocess")(pixels)
    features = network(x, training=False)
    set_inference_mode(network, True)
    base = keras.Model(pixels, features, name=f"{backbone.name}_base")
    base.trainable = False
    return base


def set_inference_mode(network: keras.Model, inference: bool) -> None:
    """Whether `network` keeps running in inference mode inside a model that trains.

    A Keras 3 functional model hands its own `training` flag to every layer it calls, over
    the `training=False` the layer was called with (keras-team/keras#20285): under `fit`, a
    nested backbone would run its Dropout layers (EfficientNet's stochastic depth) in
    training mode, and any trainable BatchNormalization layer on batch statistics. Taking
    `training` off the arguments the network and each of its layers take from their caller
    leaves every layer at its inference default, however the flag travels (injected by the
    functional model, as in Keras 3.15, or inherited through the call context). Only the
    from-scratch baseline (`finetune.train_batchnorm`) wants the caller's flag. Not saved
    with a model: a loaded model takes the flag again.
    """
    for layer in _layers_within(network):
        inherited = set(layer._call_context_args)
        layer._call_context_args = inherited - {"training"} if inference else \
            inherited | {"training"}


def in_inference_mode(network: keras.Model) -> bool:
    return "training" not in network._call_context_args


def _layers_within(layer):
    yield layer
    for inner in getattr(layer, "layers", ()):
        yield from _layers_within(inner)


def _load_weights_file(network: keras.Model, path: str, name: str) -> None:
    try:
        network.load_weights(path)
    except (ValueError, OSError, KeyError) as exc:
        reason = first_line(exc)
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
