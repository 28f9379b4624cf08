"""Where fine-tuning runs: numeric precision and how many GPUs, chosen once per stage.

    accelerator.precision  auto | float32 | mixed
    accelerator.gpus       0 (every visible GPU) | N (at most N)

`auto` precision is `mixed_float16` only on GPUs with float16 tensor cores (compute
capability 7.0 and up); a CPU, or an older GPU, gains nothing from it and loses accuracy.
Several replicas train with `tf.distribute.MirroredStrategy`: every replica holds a copy of
the variables, takes its share of each global batch and the gradients are summed, so one
step over `finetune.batch_size` images is the same step on one device or on eight.

The model saved after mixed-precision training is rebuilt in float32 (`float32_copy`): its
master weights were float32 all along, and a CPU running float16 kernels for evaluation,
export or `predict` would be slow and gain nothing.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

FLOAT32 = "float32"
MIXED = "mixed_float16"
# Volta (7.0) and later run float16 matrix products on tensor cores; older GPUs emulate them.
MIN_MIXED_CAPABILITY = (7, 0)


@dataclass(frozen=True)
class Accelerator:
    """The devices one training run is replicated over and the dtype policy it computes in."""

    devices: tuple[str, ...]  # logical device names, e.g. ("/gpu:0", "/gpu:1"); () = default
    precision: str  # a Keras dtype policy: float32 or mixed_float16
    description: str  # what a person reads in the metrics: "2 x NVIDIA H100 (7.0+)" or "CPU"

    @property
    def replicas(self) -> int:
        return max(1, len(self.devices))

    @property
    def mixed(self) -> bool:
        return self.precision == MIXED

    def strategy(self) -> tf.distribute.Strategy:
        """MirroredStrategy over several devices; TF's default (one device) otherwise."""
        if self.replicas > 1:
            return tf.distribute.MirroredStrategy(list(self.devices))
        return tf.distribute.get_strategy()

    @contextlib.contextmanager
    def scope(self) -> Iterator[tf.distribute.Strategy]:
        """Build, compile and fit the model inside this: variables are created per replica,
        layers take the dtype policy. The global policy is restored on the way out."""
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(self.precision)
        try:
            strategy = self.strategy()
            with strategy.scope():
                yield strategy
        finally:
            keras.config.set_dtype_policy(previous)

    def summary(self) -> dict[str, Any]:
        """The keys every training stage writes to its metrics file."""
        return {"device": self.description, "precision": self.precision,
                "replicas": self.replicas}


def gpu_capability(gpu: tf.config.PhysicalDevice) -> tuple[str, tuple[int, int] | None]:
    """A GPU's name and CUDA compute capability (None where TF does not report one)."""
    details = tf.config.experimental.get_device_details(gpu)
    return details.get("device_name", gpu.name), details.get("compute_capability")


def choose_precision(setting: str, capabilities: Sequence[tuple[int, int] | None]) -> str:
    """The Keras dtype policy for `accelerator.precision` on these GPUs (none: a CPU)."""
    if setting == "float32":
        return FLOAT32
    if setting == "mixed":
        return MIXED
    tensor_cores = bool(capabilities) and all(
        capability is not None and tuple(capability) >= MIN_MIXED_CAPABILITY
        for capability in capabilities)
    return MIXED if tensor_cores else FLOAT32


def select_accelerator(params: dict) -> Accelerator:
    """Resolve the `accelerator` params section against the GPUs TF sees on this machine."""
    gpus = tf.config.list_physical_devices("GPU")
    limit = params["gpus"]
    if limit and limit < len(gpus):
        gpus = gpus[:limit]
    elif limit > len(gpus):
        print(f"accelerator.gpus: {limit} asked, {len(gpus)} visible; using "
              f"{len(gpus) or 'the CPU'}", file=sys.stderr)
    described = [gpu_capability(gpu) for gpu in gpus]
    precision = choose_precision(params["precision"], [cap for _, cap in described])
    if precision == MIXED and not gpus:
        print("accelerator.precision: mixed on a CPU computes float16 without any gain in "
              "speed", file=sys.stderr)
    devices = tuple(f"/gpu:{index}" for index in range(len(gpus)))
    return Accelerator(devices if len(devices) > 1 else (), precision, describe(described))


def describe(gpus: Sequence[tuple[str, tuple[int, int] | None]]) -> str:
    if not gpus:
        return "CPU"
    names = sorted({f"{name} ({'.'.join(map(str, cap)) if cap else 'capability ?'})"
                    for name, cap in gpus})
    return f"{len(gpus)} x {', '.join(names)}"


def float32_copy(model: keras.Model) -> keras.Model:
    """The same model and weights with every layer computing in float32.

    Keras stores each layer's dtype policy in its config, so a model saved straight from
    mixed-precision training would run float16 kernels wherever it is loaded.
    """
    config = _float32_policies(model.get_config())
    copy = model.__class__.from_config(config)
    copy.set_weights(model.get_weights())
    return copy


def _float32_policies(node: Any) -> Any:
    if isinstance(node, dict):
        if node.get("class_name") in ("DTypePolicy", "FloatDTypePolicy"):
            return {**node, "config": {**node["config"], "name": FLOAT32}}
        return {key: _float32_policies(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_float32_policies(value) for value in node]
    return node
