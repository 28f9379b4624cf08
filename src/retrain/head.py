"""The dense head: Dropout -> Dense(softmax), trained on cached backbone features."""

from __future__ import annotations

import keras
import numpy as np

from retrain.errors import stop_if_interrupted
from retrain.quiet import native_chatter_hidden

CLASSIFIER = "classifier"


class StopOnInterrupt(keras.callbacks.Callback):
    """Stop `fit` at the next step after Ctrl-C, even one whose KeyboardInterrupt TensorFlow
    swallowed (`retrain.errors.stop_if_interrupted`). Every fit of the project runs with it."""

    def on_train_batch_end(self, batch, logs=None):
        stop_if_interrupted()

    def on_test_batch_end(self, batch, logs=None):
        stop_if_interrupted()


def build_head(feature_size: int, classes: int, dropout: float, seed: int) -> keras.Model:
    features = keras.Input((feature_size,), name="features")
    x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(features)
    # float32 whatever the dtype policy: a float16 softmax rounds small probabilities to 0.
    probabilities = keras.layers.Dense(classes, activation="softmax", dtype="float32",
                                       name=CLASSIFIER)(x)
    return keras.Model(features, probabilities, name="head")


def compile_classifier(model: keras.Model, learning_rate: float,
                       steps_per_execution: int = 1) -> None:
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                  steps_per_execution=steps_per_execution)
    build_training_state(model)


def build_training_state(model: keras.Model) -> None:
    """Create the optimizer's, the loss's and the metrics' variables before `fit` traces its
    train step. Keras's TensorFlow trainer (without a distribution strategy) leaves them to
    the first trace, and a `tf.function` that creates variables is traced a second time:
    every fit built its training graph twice (7 of 41 s fine-tuning ResNet50V2 whole at
    32 px). Keras makes this same call before tracing on its other backends, and on this
    one under a strategy."""
    inputs = [keras.KerasTensor(tensor.shape, tensor.dtype) for tensor in model.inputs]
    labels = keras.KerasTensor((None,), "int32")
    with model.distribute_strategy.scope():
        model._symbolic_build(data_batch=(inputs[0] if len(inputs) == 1 else inputs, labels))  # noqa: SLF001


def train_head(head: keras.Model, train: tuple[np.ndarray, np.ndarray],
               val: tuple[np.ndarray, np.ndarray] | None, *, learning_rate: float, epochs: int,
               batch_size: int, class_weight: dict | None = None,
               patience: int = 0, callbacks: list | None = None,
               verbose: int = 2, compile: bool = True) -> keras.callbacks.History:
    """Fit the head; `val` (needed for early stopping) is scored after every epoch.

    compile=False trains a head already compiled by `compile_classifier` (whose optimizer
    the caller has reset): its traced train step is reused instead of traced again.
    """
    if compile:
        compile_classifier(head, learning_rate)
    callbacks = [*(callbacks or []), StopOnInterrupt()]
    if patience:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=patience, restore_best_weights=True))
    # fit shuffles each epoch from the global seed set by make_deterministic.
    with native_chatter_hidden():  # tf.data's determinism rewrite prints an `E` line
        return head.fit(*train, validation_data=val, epochs=epochs, batch_size=batch_size,
                        class_weight=class_weight, callbacks=callbacks, shuffle=True,
                        verbose=verbose)
