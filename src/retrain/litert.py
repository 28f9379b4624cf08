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
The probe batch is two noise images plus, where the caller has them, a few real ones
(`probe_images`: extract passes manifest images, export its calibration images): a graph
that is only wrong on natural images' statistics is caught too.

The `export` stage converts the fine-tuned classifier through the same recipes, also with
float16 weights or int8 quantisation (every layer int8, or the first layers from the input
kept in float32), and runs the result with `LiteRTClassifier`.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import keras
import numpy as np

from retrain.atomic import atomic_path
from retrain.cache import user_cache_dir
from retrain.errors import first_line, stop_if_interrupted
from retrain.quiet import native_chatter_hidden

# Bump when the conversion recipe changes, so old cache entries are not reused.
FORMAT_VERSION = "1"
# Converted features must match Keras on a probe batch within this fraction of the largest
# feature before the flatbuffer is cached (measured: ~2e-6 for MobileNetV2).
PROBE_TOLERANCE = 1e-4
# Images per interpreter call. Small sub-batches keep the activations in cache: on a 2-core
# EPYC, MobileNetV2/224 extraction costs ~10 CPU-ms per image in sub-batches of 1 to 8,
# ~13 ms in one call of 32.
CHUNK_SIZE = 8
# What `convert` can make: float32 as is, float16 weights, or int8 ops (uint8 pixels in,
# float32 probabilities out) calibrated on representative images.
QUANTIZATIONS = ("float32", "float16", "int8")


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
                 num_threads: int | None = None, chunk_size: int = CHUNK_SIZE,
                 probe_images: np.ndarray | None = None):
        from ai_edge_litert.interpreter import Interpreter

        self.feature_size = int(extractor.output.shape[-1])
        self.input_shape = tuple(int(d) for d in extractor.input.shape[1:])
        self.model_path = converted_model(extractor, model_params, probe_images)
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
            with native_chatter_hidden():  # LiteRT's INFO line on applying XNNPACK
                self._interpreter.allocate_tensors()
            self._batch_size = len(batch)
        self._interpreter.set_tensor(self._input, batch)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output)  # a copy, safe to keep


def converted_model(extractor: keras.Model, model_params: dict,
                    probe_images: np.ndarray | None = None) -> Path:
    """Path of the cached .tflite conversion of `extractor`, converting it on a cache miss
    (checked on `probe_images`, real pixels, besides the noise probe)."""
    key = model_fingerprint(extractor)
    size = int(extractor.input.shape[1])
    name = f"{model_params.get('backbone', extractor.name)}-{size}px-{key[:32]}.tflite"
    dest = user_cache_dir("litert") / name
    if not dest.is_file():
        try:
            flatbuffer = convert(extractor, probe_images=probe_images)
        except ConversionError as exc:
            raise ConversionError(f"{exc}; set extract.engine: keras") from None
        with atomic_path(dest) as tmp:
            tmp.write_bytes(flatbuffer)
    return dest


def model_fingerprint(model: keras.Model) -> str:
    """sha256 of everything the converted graph depends on: weights, architecture, and the
    versions of the converter (TensorFlow) and of the runtime that will run it (LiteRT: a new
    runtime may read an old flatbuffer differently, or run it with other kernels).

    Layer names are replaced by their order of appearance, because Keras numbers unnamed
    layers per process (`input_layer`, then `input_layer_1`): the same model built twice
    must give the same key.
    """
    import tensorflow as tf

    digest = hashlib.sha256(f"retrain-litert:{FORMAT_VERSION}:tf{tf.__version__}:"
                            f"litert{litert_version()}:".encode())
    config = json.dumps(model.get_config(), sort_keys=True, default=str)
    for index, name in enumerate(_layer_names(model)):
        config = config.replace(json.dumps(name), f'"<layer {index}>"')
    digest.update(config.encode())
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(f"{value.dtype}{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def litert_version() -> str:
    """Version of the installed LiteRT runtime (`ai-edge-litert`), "none" without one."""
    try:
        return importlib.metadata.version("ai-edge-litert")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _layer_names(model: keras.Model) -> list[str]:
    names = [model.name]
    for layer in model.layers:
        names.extend(_layer_names(layer) if isinstance(layer, keras.Model) else [layer.name])
    return list(dict.fromkeys(names))  # unique, in order of appearance


def convert(model: keras.Model, quantization: str = "float32",
            representative: np.ndarray | None = None, float_layers: int = 0,
            probe_images: np.ndarray | None = None, size_budget: float | None = None) -> bytes:
    """TFLite flatbuffer of `model` (raw pixels in), checked against Keras on a probe batch:
    two noise images, and `probe_images` (real pixels, (N, S, S, 3)) when the caller has some.

    float32 must match Keras within PROBE_TOLERANCE; quantised models only need finite
    outputs of the right shape here (their parity is measured on real images by `export`).
    `representative`: uint8 pixel batch (N, S, S, 3) that calibrates int8 ranges.
    `float_layers` (int8 only): how many layers, counted from the input, keep computing in
    float32 (see `_quantize_int8`); `size_budget` (int8 only): fewer of them where more
    would make the file larger than this fraction of the float32 model's.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization: expected one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization == "int8" and (representative is None or not len(representative)):
        raise ValueError("int8 quantisation needs representative images")
    options = {} if quantization == "float32" else {"quantization": quantization,
                                                     "representative": representative}
    if quantization == "int8":
        options.update(float_layers=float_layers, size_budget=size_budget)
    failures = []
    for recipe in (_convert_concrete_function, _convert_saved_model):
        try:
            with native_chatter_hidden():  # the quantizer prints its options
                flatbuffer = recipe(model, **options)
                _check_against_keras(flatbuffer, model,
                                     PROBE_TOLERANCE if quantization == "float32" else None,
                                     probe_images)
            return flatbuffer
        except Exception as exc:  # noqa: BLE001 - try the next recipe, report all
            # A Ctrl-C TensorFlow turned into another error is not a failed recipe.
            stop_if_interrupted()
            failures.append(f"{recipe.__name__}: {first_line(exc, 300)}")
    raise ConversionError(f"cannot convert {model.name} to LiteRT {quantization} ("
                          + "; ".join(failures) + ")")


def _signature(extractor: keras.Model):
    import tensorflow as tf

    shape = (None, *(int(d) for d in extractor.input.shape[1:]))
    return [tf.TensorSpec(shape, tf.float32, name="pixels")]


def _finish(converter, quantization: str = "float32",
            representative: np.ndarray | None = None, float_layers: int = 0,
            size_budget: float | None = None) -> bytes:
    import tensorflow as tf

    # Builtin ops only: the flatbuffer must run on the plain LiteRT interpreter (no Flex).
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.optimizations = []  # float32, no quantisation
    if quantization == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantization == "int8":
        return _quantize_int8(converter, representative, float_layers, size_budget)
    return converter.convert()


def _quantize_int8(converter, representative: np.ndarray, float_layers: int,
                   size_budget: float | None = None) -> bytes:
    """Full-integer int8 (uint8 pixels in, float32 probabilities out), except the first
    `float_layers` layers from the input, which compute in float32: as many of them as keep
    the file within `size_budget` times the float32 model's size (None: no limit; the same
    graph with every layer in float is the float32 model within a few bytes).

    Why the first layers: on MobileNetV2 fine-tuned on flower photos, TFLite's quantization
    debugger finds the error spread over every layer (no few layers dominate: keeping any
    single one in float removes at most 15% of the output error), but a float run from the
    input removes half of it for almost no bytes. The early layers hold few weights and run
    at the highest resolution, and the error made there is carried through the whole network.
    Quantizing one layer at a time (every other one float, alpha 0.5), the layers that move
    the probabilities most are early ones too (the first block's depthwise and projection,
    blocks 1 and 2), and float layers chosen by that per-layer error under the same size
    budget leave the same error as the run from the input (mean L1 on the held-out photos
    0.031 with 55 such layers at 0.44x, against 0.032 with the first 40 at 0.41x).
    Most of the error is the int8 weights themselves: rounding only the weights (per channel,
    BatchNorm folded in as the converter does; activations float) moves the probabilities by
    0.095 of full int8's 0.119, 0.071 of it from the first five convolutions. What no budget
    of 0.45x reaches is the weights from block 10 on (0.026 alone), the wide 1x1
    convolutions: `out_relu` alone in float adds ~0.2x to the file.

    The converter only calibrates (min/max of every tensor on the representative images);
    `mlir_quantize` then quantizes with those ranges, leaving the named layers (their output
    tensors) in float. This is what `tf.lite.experimental.QuantizationDebugger` does for
    selective quantization; the ranges, hence the int8 layers, are the same either way.
    """
    import tensorflow as tf
    from tensorflow.lite.python.convert import mlir_quantize

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    # Float builtins are allowed only so that the denylisted layers can stay float; the
    # check below refuses any other float layer.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                           tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.representative_dataset = lambda: (
        [image[None]] for image in _calibration_images(representative))
    converter._experimental_calibrate_only = True  # noqa: SLF001 - the debugger's route
    with warnings.catch_warnings():
        # The converter asks for input statistics (mean, std) it never uses on this route:
        # the calibrated input range is exactly [0, 255] (_calibration_images).
        warnings.filterwarnings("ignore", category=UserWarning,
                                message="Statistics for quantized inputs were expected")
        calibrated = converter.convert()

    @functools.cache
    def quantize(denylisted: tuple[str, ...]) -> bytes:
        """The file with the `denylisted` layers in float; each set is quantized once (~1.5 s
        for ResNet50V2), however often the search asks for it."""
        # Pixels are uint8 anyway; probabilities stay float32 for every caller.
        return mlir_quantize(calibrated, disable_per_channel=False, fully_quantize=False,
                             input_data_type=tf.uint8, output_data_type=tf.float32,
                             denylisted_nodes=list(denylisted) or None)

    layers = tuple(quantized_layers(quantize(())))
    count = min(float_layers, len(layers))
    if size_budget is not None and count:
        max_bytes = size_budget * len(quantize(layers))
        count = longest_prefix_within(lambda n: len(quantize(layers[:n])), count, max_bytes)
    kept_float = layers[:count]
    flatbuffer = quantize(kept_float)
    computed_in_float = float_layer_names(flatbuffer)
    if set(computed_in_float) != set(kept_float):
        raise ConversionError(f"int8 conversion computes {len(computed_in_float)} layers in "
                              f"float, {len(kept_float)} asked for")
    return flatbuffer


def longest_prefix_within(size_of, longest: int, max_bytes: float) -> int:
    """A count in 0..`longest` as large as a bisection finds with `size_of(count)` at most
    `max_bytes` (0 when none is). A float layer's weights take 4 bytes instead of 1, so the
    size grows with the count and a few quantizations (each ~0.1 s) find it; a tiny layer
    can save a few hundred bytes of quantization parameters instead, where the bisection may
    stop one layer short. The count returned always fits (but 0, which may not). The count
    asked is tried first: it fits more often than not (40 layers of MobileNetV2 at 0.45x)."""
    if size_of(longest) <= max_bytes:
        return longest
    return max(bisect.bisect_right(range(longest + 1), max_bytes, key=size_of) - 1, 0)


def _layers(model: str | Path | bytes) -> list[tuple[str, str, np.dtype]]:
    """(op name, output tensor name, output dtype) of every op of a .tflite, in the order
    the interpreter runs them; the tensor name is what `denylisted_nodes` takes."""
    from ai_edge_litert.interpreter import Interpreter

    source = {"model_content": model} if isinstance(model, bytes) \
        else {"model_path": str(model)}
    interpreter = Interpreter(**source)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    return [(op["op_name"], tensors[op["outputs"][0]]["name"],
             np.dtype(tensors[op["outputs"][0]]["dtype"]))
            for op in interpreter._get_ops_details()]  # noqa: SLF001 - no public op list


# Ops that only move values between float and integer: not layers.
_CASTS = ("QUANTIZE", "DEQUANTIZE")


def quantized_layers(model: str | Path | bytes) -> list[str]:
    """Output tensor names of the layers that compute in int8, from the input on."""
    return [name for op, name, dtype in _layers(model)
            if op not in _CASTS and dtype == np.int8]


def float_layer_names(model: str | Path | bytes) -> list[str]:
    """Output tensor names of the layers that compute in float32, from the input on."""
    return [name for op, name, dtype in _layers(model)
            if op not in _CASTS and dtype == np.float32]


def _calibration_images(representative: np.ndarray) -> np.ndarray:
    """The representative images as float32, the first with one black and one white pixel.

    The calibrated input range becomes exactly [0, 255], so the uint8 input has scale 1 and
    zero point 0: a caller hands over the image's own bytes. (Calibrated on photos that
    happen to span 3..250, every pixel would need rescaling first.) Two pixels move the
    ranges of later layers by nothing measurable.
    """
    images = np.array(representative, dtype=np.float32)
    images[0].reshape(-1, images.shape[-1])[:2] = [[0.0], [255.0]]
    return images


def _convert_concrete_function(extractor: keras.Model, **quantization) -> bytes:
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
    return _finish(converter, **quantization)


def _convert_saved_model(extractor: keras.Model, **quantization) -> bytes:
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="retrain-litert-") as saved_model:
        archive = keras.export.ExportArchive()
        archive.track(extractor)
        archive.add_endpoint("serve", lambda pixels: extractor(pixels, training=False),
                             input_signature=_signature(extractor))
        archive.write_out(saved_model, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
        return _finish(converter, **quantization)


def _check_against_keras(flatbuffer: bytes, extractor: keras.Model,
                         tolerance: float | None = PROBE_TOLERANCE,
                         images: np.ndarray | None = None) -> None:
    """Raise ConversionError unless the flatbuffer reproduces Keras on a probe batch: two
    noise images and the real `images` if any (within `tolerance` of the largest output;
    None: shape and finiteness only)."""
    probe = probe_batch(tuple(int(d) for d in extractor.input.shape[1:]), images)
    expected = keras.ops.convert_to_numpy(extractor(probe.copy(), training=False))
    actual = LiteRTClassifier(flatbuffer, num_threads=1)(probe)
    if actual.shape != expected.shape:
        raise ConversionError(f"output shape {actual.shape}, Keras gives {expected.shape}")
    if not np.all(np.isfinite(actual)):
        raise ConversionError("non-finite outputs on a probe batch")
    if tolerance is None:
        return
    error = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    # Relative to the largest feature: randomly initialised networks give features ~1e-10,
    # where any absolute tolerance would accept a wrong graph.
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    if error > tolerance * (scale or 1.0):
        raise ConversionError(f"features differ from Keras by {error:.3g} on a probe batch "
                              f"({len(probe) - NOISE_PROBES} real image(s), "
                              f"{NOISE_PROBES} noise)")


# Noise images in every probe batch: they need no data, and exercise the full pixel range.
NOISE_PROBES = 2
# Real images a caller adds to the probe batch where it has some (extract: training images;
# export: calibration images).
PROBE_IMAGES = 4


def probe_batch(shape: tuple[int, ...], images: np.ndarray | None = None) -> np.ndarray:
    """Float32 pixels the conversion is checked on: NOISE_PROBES noise images of `shape`,
    then the real `images` (any number, the same shape)."""
    noise = np.random.default_rng(0).integers(0, 256, size=(NOISE_PROBES, *shape))
    if images is None or not len(images):
        return noise.astype(np.float32)
    images = np.asarray(images)
    if images.shape[1:] != shape:
        raise ValueError(f"probe images of shape {images.shape[1:]}, the model takes {shape}")
    return np.concatenate([noise, images]).astype(np.float32)


class LiteRTClassifier:
    """A .tflite model (a path or the flatbuffer's bytes) called on raw [0, 255] pixels.

    Quantised inputs and outputs are converted with the scale and zero point the
    flatbuffer records, so float32, float16 and int8 exports are called the same way:
    (N, S, S, 3) pixels in, float32 (N, outputs) out.
    """

    def __init__(self, model: str | Path | bytes, num_threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        source = {"model_content": model} if isinstance(model, bytes) \
            else {"model_path": str(model)}
        self._interpreter = Interpreter(**source, num_threads=num_threads or os.cpu_count())
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        self.input_shape = tuple(int(d) for d in self._input["shape"][1:])
        self.input_dtype = np.dtype(self._input["dtype"])
        self.input_quantization = tuple(self._input["quantization"])  # (scale, zero point)
        self.outputs = int(self._output["shape"][-1])
        self._batch_size = None

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if tuple(pixels.shape[1:]) != self.input_shape:
            shape = ", ".join(map(str, self.input_shape))
            raise ValueError(f"expects batches of shape (N, {shape}), got {pixels.shape}")
        self._set_input(pixels)
        self._interpreter.invoke()
        return self._read_output()

    def latency_ms(self, pixels: np.ndarray, runs: int) -> float:
        """Median wall time of `runs` calls on one image (its input set once, after a warm-up
        call), in milliseconds."""
        self._set_input(pixels[:1])
        self._interpreter.invoke()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            self._interpreter.invoke()
            times.append(time.perf_counter() - start)
        return float(np.median(times) * 1000)

    def _set_input(self, pixels: np.ndarray) -> None:
        if len(pixels) != self._batch_size:
            self._interpreter.resize_tensor_input(self._input["index"], pixels.shape,
                                                  strict=True)
            with native_chatter_hidden():  # LiteRT's INFO line on applying XNNPACK
                self._interpreter.allocate_tensors()
            self._batch_size = len(pixels)
        self._interpreter.set_tensor(self._input["index"], self._quantized(pixels))

    def _quantized(self, pixels: np.ndarray) -> np.ndarray:
        if not np.issubdtype(self.input_dtype, np.integer):
            return np.ascontiguousarray(pixels, dtype=self.input_dtype)
        scale, zero_point = self.input_quantization
        info = np.iinfo(self.input_dtype)
        values = np.round(np.asarray(pixels, np.float32) / (scale or 1.0) + zero_point)
        return np.clip(values, info.min, info.max).astype(self.input_dtype)

    def _read_output(self) -> np.ndarray:
        output = self._interpreter.get_tensor(self._output["index"])
        if np.issubdtype(output.dtype, np.integer):
            scale, zero_point = self._output["quantization"]
            return ((output.astype(np.float32) - zero_point) * scale).astype(np.float32)
        return output.astype(np.float32, copy=False)
