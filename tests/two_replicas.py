"""One training step of the fine-tuning model on one device and on two replicas.

Run as a script (`python tests/two_replicas.py`): the CPU is split into two logical devices,
which TensorFlow allows only before it initialises its devices, so never in the process
that runs the other tests. Prints JSON: each run's loss and gradients.
"""

from __future__ import annotations

import json

import numpy as np
import tensorflow as tf

GLOBAL_BATCH = 8
CLASSES = 3
SIZE = 32


def tiny_conv_base(size: int = SIZE):
    """A base shaped like build_base's (pixels -> scaling -> nested `backbone` model) but
    small, with real gradients: randomly initialised MobileNetV2 features are ~1e-12."""
    import keras

    backbone = keras.Sequential([
        keras.Input((size, size, 3)),
        keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv_1"),
        keras.layers.BatchNormalization(name="bn_1"),  # frozen by unfreeze_from
        keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="conv_2"),
    ], name="backbone")
    pixels = keras.Input((size, size, 3), name="pixels")
    scaled = keras.layers.Rescaling(1 / 127.5, offset=-1, name="preprocess")(pixels)
    return keras.Model(pixels, backbone(scaled, training=False), name="tiny_base")


def split_cpu(devices: int) -> None:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(devices)])


def one_step(accelerator, initial_weights, images, labels) -> tuple[dict, list]:
    """Loss and gradients of one SGD step (learning rate 1: the update is minus the
    gradient), through the stage's own model, data pipeline and accelerator scope."""
    import keras

    from retrain.finetune import Recipe, Split, assemble_model, full_path_batches, unfreeze_from
    from retrain.head import build_head

    with accelerator.scope():
        base = tiny_conv_base()
        head = build_head(base.output.shape[-1], CLASSES, dropout=0.0, seed=0)
        model = assemble_model(base, head)
        unfreeze_from(model, 0)
        if initial_weights is not None:
            model.set_weights(initial_weights)
        initial = model.get_weights()
        before = [w.numpy() for w in model.trainable_weights]
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0),
                      loss="sparse_categorical_crossentropy")
        split = Split(images, labels)
        data, _, steps = full_path_batches(split, split, Recipe(learning_rate=1.0, epochs=1,
                                                                batch_size=GLOBAL_BATCH, seed=0))
        history = model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)
    after = [w.numpy() for w in model.trainable_weights]
    return {"replicas": accelerator.replicas,
            "replicas_in_sync": model.distribute_strategy.num_replicas_in_sync,
            "loss": float(history.history["loss"][0]),
            "gradients": [(b - a).ravel().tolist() for b, a in zip(before, after)]}, initial


def main() -> None:
    split_cpu(2)
    from retrain.accelerators import FLOAT32, Accelerator
    from retrain.reproducibility import make_deterministic

    make_deterministic(0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (GLOBAL_BATCH, SIZE, SIZE, 3), dtype=np.uint8)
    labels = np.arange(GLOBAL_BATCH, dtype=np.int64) % CLASSES
    one, initial = one_step(Accelerator((), FLOAT32, "CPU"), None, images, labels)
    two, _ = one_step(Accelerator(("/cpu:0", "/cpu:1"), FLOAT32, "2 x CPU"), initial, images,
                      labels)
    print(json.dumps({"one": one, "two": two}))


if __name__ == "__main__":
    main()
