"""Reproducible transfer learning on images: a DVC pipeline around pretrained Keras CNNs."""

from retrain import quiet

# Before any stage imports TensorFlow: its start-up chatter (oneDNN and cudart notes, a
# failed CUDA probe on a machine without a GPU) buries real messages. RETRAIN_VERBOSE=1
# keeps it.
quiet.install()
