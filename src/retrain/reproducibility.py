"""Same params and data, same numbers: seed every generator and make TF ops deterministic."""

import keras
import tensorflow as tf


def make_deterministic(seed: int) -> None:
    keras.utils.set_random_seed(seed)  # Python, NumPy and TensorFlow generators
    tf.config.experimental.enable_op_determinism()
