"""The full model and its fine-tuning.

    raw pixels -> preprocess -> backbone (inference mode) -> pool -> dropout -> dense

The dense layer starts from the trained head, so before fine-tuning the full model gives
the same probabilities on an image as the head on that image's cached features.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from retrain.errors import ParamsError
from retrain.head import CLASSIFIER, compile_classifier

BACKBONE = "backbone"


def assemble_model(base: keras.Model, head: keras.Model) -> keras.Model:
    """Stack the trained head on the base's pooled features, sharing the head's weights."""
    x = keras.layers.GlobalAveragePooling2D(name="pool")(base.output)
    x = keras.layers.Dropout(head.get_layer("dropout").rate, name="dropout")(x)
    # float32 even under a mixed-precision policy: a float16 softmax rounds small
    # probabilities to 0 and the loss to inf (the Keras mixed-precision guide's advice).
    classifier = keras.layers.Dense(head.get_layer(CLASSIFIER).units, activation="softmax",
                                    dtype="float32", name=CLASSIFIER)
    probabilities = classifier(x)
    classifier.set_weights(head.get_layer(CLASSIFIER).get_weights())
    return keras.Model(base.input, probabilities, name="classifier_model")


def unfreeze_from(model: keras.Model, from_layer: int, train_batchnorm: bool = False) -> None:
    """Make backbone layers `from_layer` and up trainable; keep BatchNorm frozen by default.

    Keras 3 runs a trainable BatchNormalization layer in training mode even inside a base
    called with `training=False` (keras-team/keras#20285), which would overwrite the
    ImageNet moving statistics with those of a few small batches. Only training from
    random weights (`train_batchnorm`, the from-scratch baseline) wants exactly that:
    frozen random statistics would make the network meaningless.
    """
    backbone = model.get_layer(BACKBONE)
    depth = len(backbone.layers)
    if from_layer >= depth:
        raise ParamsError(f"finetune.from_layer: {from_layer} is beyond the backbone's "
                          f"{depth} layers (0..{depth - 1})")
    model.trainable = True
    for index, layer in enumerate(backbone.layers):
        layer.trainable = index >= from_layer
        if isinstance(layer, keras.layers.BatchNormalization) and not train_batchnorm:
            layer.trainable = False


def count_params(model: keras.Model) -> dict:
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    frozen = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    return {"total": trainable + frozen, "trainable": trainable, "non_trainable": frozen}


def augmenter(augment: dict, seed: int) -> keras.Sequential:
    """Random flips, brightness and contrast on raw [0, 255] pixels (training batches only)."""
    layers = []
    if augment["flip"]:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if augment["brightness"]:
        layers.append(keras.layers.RandomBrightness(augment["brightness"], value_range=(0, 255),
                                                    seed=seed + 1))
    if augment["contrast"]:
        layers.append(keras.layers.RandomContrast(augment["contrast"], value_range=(0, 255),
                                                  seed=seed + 2))
    return keras.Sequential(layers, name="augment")


def image_dataset(images: np.ndarray, labels: np.ndarray, batch_size: int, *, seed: int,
                  shuffle: bool, augment: keras.Sequential | None = None) -> tf.data.Dataset:
    """Batches from the decoded-image cache (a memmap): no JPEG is decoded again per epoch."""
    indices = tf.data.Dataset.from_tensor_slices(np.arange(len(images)))
    if shuffle:
        indices = indices.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)

    def gather(batch_indices):
        return np.asarray(images[np.sort(batch_indices)]), labels[np.sort(batch_indices)]

    def load(batch_indices):
        pixels, batch_labels = tf.numpy_function(gather, [batch_indices], [tf.uint8, tf.int64])
        pixels.set_shape((None, *images.shape[1:]))
        batch_labels.set_shape((None,))
        pixels = tf.cast(pixels, tf.float32)
        if augment is not None:
            pixels = augment(pixels, training=True)
        return pixels, batch_labels

    return indices.batch(batch_size).map(load).prefetch(2)


def fine_tune(model: keras.Model, train: tf.data.Dataset, val: tf.data.Dataset, *,
              learning_rate: float, epochs: int, class_weight: dict | None = None,
              callbacks: list | None = None) -> keras.callbacks.History:
    compile_classifier(model, learning_rate)
    return model.fit(train, validation_data=val, epochs=epochs, class_weight=class_weight,
                     callbacks=callbacks or [], shuffle=False, verbose=2)  # already shuffled
