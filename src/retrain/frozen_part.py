"""Split a model being fine-tuned into its frozen lower part and the part that learns.

With the layers below `finetune.from_layer` frozen (and BatchNorm frozen), everything up to
some set of tensors inside the backbone is a fixed function of the pixels: the *cut*, the
frozen tensors that layers with trainable weights (or layers downstream of them) read.
Residual connections make it a set: in MobileNetV2 from layer 135 it is
`block_15_expand_relu` (7x7x960) and `block_14_add` (7x7x160), which `block_15_add` reads.

    lower: raw pixels -> the cut tensors, flattened and concatenated: one (N, width) array,
           which the fast inference engine (LiteRT) computes and a file can hold
    upper: the cut tensors -> class probabilities, the same layer objects as the full model

Training `upper` on `lower`'s outputs trains the full model's own variables, with the same
outputs and the same gradients as training the full model on the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from retrain.base import BACKBONE, in_inference_mode, set_inference_mode


@dataclass
class FrozenCut:
    lower: keras.Model  # raw pixels -> (N, width) float32
    upper: keras.Model  # [cut tensors] -> probabilities
    names: list[str]  # the layers whose outputs are cut
    shapes: list[tuple[int, ...]]  # each cut tensor's shape without the batch axis

    @property
    def width(self) -> int:
        return int(sum(np.prod(shape) for shape in self.shapes))

    def split(self, flat: np.ndarray) -> tuple[np.ndarray, ...]:
        """The upper part's inputs from a (N, width) batch of the lower part's outputs."""
        sizes = np.cumsum([int(np.prod(shape)) for shape in self.shapes])[:-1]
        return tuple(part.reshape(len(flat), *shape)
                     for part, shape in zip(np.split(flat, sizes, axis=1), self.shapes))


def frozen_frontier(network: keras.Model) -> list:
    """The frozen tensors of a functional `network` that a learning computation reads.

    A node is frozen when its layer has no trainable weights and all its inputs are frozen;
    the network's input is. The output counts as read when it is itself frozen.
    """
    frozen = {id(tensor) for tensor in network.inputs}
    frontier: dict[int, object] = {}
    # Keras 3 keeps the graph's nodes by depth (the inputs deepest): walking the depths
    # downwards visits every node after the nodes that produce its inputs.
    nodes_by_depth = network._nodes_by_depth
    for depth in sorted(nodes_by_depth, reverse=True):
        for node in nodes_by_depth[depth]:
            if node.is_input:
                continue
            inputs = node.input_tensors
            if not node.operation.trainable_weights and all(id(t) in frozen for t in inputs):
                frozen.update(id(t) for t in node.output_tensors)
            else:
                frontier.update((id(t), t) for t in inputs if id(t) in frozen)
    for output in network.outputs:
        if id(output) in frozen:
            frontier[id(output)] = output
    return list(frontier.values())


def _computes(layer) -> bool:
    """A layer with weights of its own beyond normalisation statistics (a convolution)."""
    normalisation = (keras.layers.BatchNormalization, keras.layers.Normalization)
    return bool(layer.weights) and not isinstance(layer, normalisation)


def cut_frozen_part(model: keras.Model) -> FrozenCut | None:
    """The lower and upper parts of `model` (from `retrain.finetune.assemble_model`, after
    `unfreeze_from`), or None when nothing but preprocessing (no convolution) lies below
    the first layer that learns (`from_layer: 0`)."""
    backbone = model.get_layer(BACKBONE)
    cut = frozen_frontier(backbone)
    if any(id(tensor) in {id(t) for t in backbone.inputs} for tensor in cut):
        return None
    frozen_network = keras.Model(backbone.inputs[0], cut, name="frozen_part")
    if not any(_computes(layer) for layer in frozen_network.layers):
        return None  # padding or rescaling only: nothing worth computing once
    position = model.layers.index(backbone)
    # assemble_model builds a chain: pixels -> preprocessing -> backbone -> head layers.
    before, after = model.layers[1:position], model.layers[position + 1:]

    pixels = keras.Input(model.input.shape[1:], name="pixels")
    x = pixels
    for layer in before:
        x = layer(x)
    parts = frozen_network(x, training=False)
    parts = parts if isinstance(parts, (list, tuple)) else [parts]
    flat = [keras.layers.Reshape((-1,))(part) for part in parts]
    lower = keras.Model(pixels, flat[0] if len(flat) == 1 else
                        keras.layers.Concatenate(axis=-1)(flat), name="lower_part")

    inputs = [keras.Input(t.shape[1:], name=f"cut_{i}") for i, t in enumerate(cut)]
    if len(cut) == 1 and cut[0] is backbone.outputs[0]:
        x = inputs[0]  # the whole backbone is frozen: only the head learns
    else:
        # A functional model from intermediate tensors reuses the layers (and weights).
        learning = keras.Model(cut, backbone.outputs[0], name="learning_part")
        x = learning(inputs, training=False)
        set_inference_mode(learning, in_inference_mode(backbone))  # as in the full model
    for layer in after:
        x = layer(x)
    upper = keras.Model(inputs, x, name="upper_part")
    names = [t._keras_history.operation.name for t in cut]
    return FrozenCut(lower, upper, names, [tuple(int(d) for d in t.shape[1:]) for t in cut])
