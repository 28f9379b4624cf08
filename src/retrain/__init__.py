"""Reproducible transfer learning on images: a DVC pipeline around pretrained Keras CNNs."""

import os

# TensorFlow's C++ start-up chatter (CPU feature notes, missing CUDA) buries real messages.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
