"""The frozen base under LiteRT (TFLite with XNNPACK): the fast extraction engine on a CPU.

The Keras extractor is converted once per backbone configuration to a float32 .tflite
flatbuffer (no quantisation: features agree with Keras within 1e-4) and cached in
`user_cache_dir("litert")`, named after a hash of the weights and the architecture. The
input is raw [0, 255] float pixels: `preprocess_input` is inside the converted graph, as it
is inside the Keras one.

Conversion: `TFLiteConverter.from_keras_model` does not work with Keras 3 (it needs the
legacy tf_keras hooks: tensorflow/tensorflow#63867). A `tf.function` with a fixed input
signature converted by `from_concrete_functions` freezes the weights into constants and is
fast (~2 s for MobileNetV2); Keras' own route (keras-team/keras#19108, and
`keras.src.export.litert`) writes a SavedModel and converts it with `from_saved_model`
(~9 s). The first is tried first, the second if it fails, and whichever is used is checked
against Keras on a probe batch before it is cached: a wrong conversion (we saw NaNs when
`from_concrete_functions` is given the model as `trackable_obj`) never reaches the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import keras
import numpy as np

from retrain.atomic import atomic_path
from retrain.cache import user_cache_dir
from retrain.errors import first_line

# Bump when the conversion recipe changes, so old cache entries are not reused.
FORMAT_VERSION = "1"
# Converted features must match Keras on a probe batch within this fraction of the largest
# feature before the flatbuffer is cached (measured: ~2e-6 for MobileNetV2).
PROBE_TOLERANCE = 1e-4
# Images per interpreter call. Small sub-batches keep the activations in cache: on a 2-core
# EPYC, MobileNetV2/224 extraction costs ~10 CPU-ms per image in sub-batches of 1 to 8,
# ~13 ms in one call of 32.
CHUNK_SIZE = 8


def litert_available() -> bool:
    """True when the LiteRT interpreter (package `ai-edge-litert`) can be imported."""
    try:
        from ai_edge_litert.interpreter import Interpreter  # noqa: F401
    except ImportError:
        return False
    return True


class ConversionError(RuntimeError):
    """The converted model does not reproduce the Keras features."""


class LiteRTEngine:
    """Callable on a (N, S, S, 3) uint8 or float batch of raw pixels -> float32 (N, features)."""

    name = "litert"

    def __init__(self, extractor: keras.Model, model_params: dict,
                 num_threads: int | None = None, chunk_size: int = CHUNK_SIZE):
        from ai_edge_litert.interpreter import Interpreter

        self.feature_size = int(extractor.output.shape[-1])
        self.input_shape = tuple(int(d) for d in extractor.input.shape[1:])
        self.model_path = converted_model(extractor, model_params)
        self._interpreter = Interpreter(model_path=str(self.model_path),
                                        num_threads=num_threads or os.cpu_count())
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
        self.chunk_size = chunk_size
        self._batch_size = None  # allocated lazily, for the first batch's size

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.shape[1:] != self.input_shape:
            raise ValueError(f"LiteRT engine expects batches of shape (N, "
                             f"{', '.join(map(str, self.input_shape))}), got {batch.shape}")
        if len(batch) == 0:
            return np.zeros((0, self.feature_size), np.float32)
        if len(batch) <= self.chunk_size:
            return self._invoke(batch)
        return np.concatenate([self._invoke(batch[start : start + self.chunk_size])
                               for start in range(0, len(batch), self.chunk_size)])

    def _invoke(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) != self._batch_size:
            # Resizing re-plans the XNNPACK graph: done only when the batch size changes
            # (the first batch, and a smaller last batch of a split).
            self._interpreter.resize_tensor_input(self._input, batch.shape, strict=True)
            self._interpreter.allocate_tensors()
            self._batch_size = len(batch)
        self._interpreter.set_tensor(self._input, batch)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output)  # a copy, safe to keep


def converted_model(extractor: keras.Model, model_params: dict) -> Path:
    """Path of the cached .tflite conversion of `extractor`, converting it on a cache miss."""
    key = model_fingerprint(extractor)
    size = int(extractor.input.shape[1])
    name = f"{model_params.get('backbone', extractor.name)}-{size}px-{key[:32]}.tflite"
    dest = user_cache_dir("litert") / name
    if not dest.is_file():
        flatbuffer = convert(extractor)
        with atomic_path(dest) as tmp:
            tmp.write_bytes(flatbuffer)
    return dest


def model_fingerprint(model: keras.Model) -> str:
    """sha256 of everything the converted graph depends on: weights, architecture, versions.

    Layer names are replaced by their order of appearance, because Keras numbers unnamed
    layers per process (`input_layer`, then `input_layer_1`): the same model built twice
    must give the same key.
    """
    import tensorflow as tf

    digest = hashlib.sha256(f"retrain-litert:{FORMAT_VERSION}:tf{tf.__version__}:".encode())
    config = json.dumps(model.get_config(), sort_keys=True, default=str)
    for index, name in enumerate(_layer_names(model)):
        config = config.replace(json.dumps(name), f'"<layer {index}>"')
    digest.update(config.encode())
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(f"{value.dtype}{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _layer_names(model: keras.Model) -> list[str]:
    names = [model.name]
    for layer in model.layers:
        names.extend(_layer_names(layer) if isinstance(layer, keras.Model) else [layer.name])
    return list(dict.fromkeys(names))  # unique, in order of appearance


def convert(extractor: keras.Model) -> bytes:
    """Float32 TFLite flatbuffer of `extractor`, verified against Keras on a probe batch."""
    failures = []
    for recipe in (_convert_concrete_function, _convert_saved_model):
        try:
            flatbuffer = recipe(extractor)
            _check_against_keras(flatbuffer, extractor)
            return flatbuffer
        except Exception as exc:  # noqa: BLE001 - try the next recipe, report all
            failures.append(f"{recipe.__name__}: {first_line(exc, 300)}")
    raise ConversionError(f"cannot convert {extractor.name} to LiteRT ("
                          + "; ".join(failures) + "); set extract.engine: keras")


def _signature(extractor: keras.Model):
    import tensorflow as tf

    shape = (None, *(int(d) for d in extractor.input.shape[1:]))
    return [tf.TensorSpec(shape, tf.float32, name="pixels")]


def _builtins_only(converter):
    import tensorflow as tf

    # Builtin ops only: the flatbuffer must run on the plain LiteRT interpreter (no Flex).
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.optimizations = []  # float32, no quantisation
    return converter.convert()


def _convert_concrete_function(extractor: keras.Model) -> bytes:
    import tensorflow as tf

    function = tf.function(lambda pixels: extractor(pixels, training=False),
                           input_signature=_signature(extractor))
    # No trackable_obj: the legacy path freezes the variables into constants. With the
    # model passed as trackable_obj, TF 2.21 produced a graph that returned NaNs. (TF logs
    # that this path is deprecated; the probe check and the SavedModel fallback cover it.)
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        converter = tf.lite.TFLiteConverter.from_concrete_functions(
            [function.get_concrete_function()])
    finally:
        absl_logger.setLevel(level)
    return _builtins_only(converter)


def _convert_saved_model(extractor: keras.Model) -> bytes:
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="retrain-litert-") as saved_model:
        archive = keras.export.ExportArchive()
        archive.track(extractor)
        archive.add_endpoint("serve", lambda pixels: extractor(pixels, training=False),
                             input_signature=_signature(extractor))
        archive.write_out(saved_model, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
        return _builtins_only(converter)


def _check_against_keras(flatbuffer: bytes, extractor: keras.Model) -> None:
    from ai_edge_litert.interpreter import Interpreter

    shape = tuple(int(d) for d in extractor.input.shape[1:])
    probe = np.random.default_rng(0).integers(0, 256, size=(2, *shape)).astype(np.float32)
    expected = keras.ops.convert_to_numpy(extractor(probe.copy(), training=False))
    interpreter = Interpreter(model_content=flatbuffer, num_threads=1)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, probe.shape, strict=True)
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, probe)
    interpreter.invoke()
    actual = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    if actual.shape != expected.shape:
        raise ConversionError(f"output shape {actual.shape}, Keras gives {expected.shape}")
    error = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    # Relative to the largest feature: randomly initialised networks give features ~1e-10,
    # where any absolute tolerance would accept a wrong graph.
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    if not np.isfinite(error) or error > PROBE_TOLERANCE * (scale or 1.0):
        raise ConversionError(f"features differ from Keras by {error:.3g} on a probe batch")
