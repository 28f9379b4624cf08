"""Quiet stages: TensorFlow's and LiteRT's start-up chatter hidden, real messages kept.

TensorFlow 2.21 logs through absl before absl is initialised, so `TF_CPP_MIN_LOG_LEVEL` does
not reach its import-time lines (oneDNN, cudart), and on a machine without a GPU its CUDA
probe prints `E0000 ... failed call to cuInit: ... CUDA error`, which a user reads as a
failure. LiteRT prints `INFO: Created TensorFlow Lite XNNPACK delegate for CPU.` and the
int8 quantizer its options; under op determinism, the first `fit` on a tf.data pipeline
prints an `E0000 ... NodeDef mentions attribute use_unbounded_threadpool` line that changes
nothing. None of it can be turned off from Python, so the native output (file descriptor 2)
of those calls is captured, the known chatter dropped, and every other line written back
when the call ends: a real warning or error still reaches the terminal.

`install()` runs when the `retrain` package is imported, before any stage imports
TensorFlow: it sets `TF_CPP_MIN_LOG_LEVEL=2` (TensorFlow's C++ INFO and WARNING lines after
start-up; a value the user set is kept) and makes the first `import tensorflow` run under
the filter, together with the GPU probe, so the probe's output is filtered too. GPUs stay
visible: nothing is hidden from TensorFlow, and the cuInit error is dropped only when the
machine has no NVIDIA device (where a device exists, a failing cuInit is a broken driver,
and the error says so).

`RETRAIN_VERBOSE=1` turns all of it off: TensorFlow's, absl's and LiteRT's output reaches
the terminal unfiltered, as without this module.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Iterator

VERBOSE = "RETRAIN_VERBOSE"

# Lines that tell a user nothing they can act on.
CHATTER = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|I\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] "  # absl INFO lines (oneDNN, cudart, ...)
    r"|To enable the following instructions: "  # the second line of cpu_feature_guard's
    r"|INFO: Created TensorFlow Lite XNNPACK delegate for CPU\."
    r"|fully_quantize: \d+, inference_type: "  # the int8 quantizer's options
    # Under op determinism tf.data runs a parallel map sequentially, and the rewrite copies an
    # attribute the sequential op lacks: an `E` line at the first fit that changes nothing.
    r"|E\d{4} [\d:.]+ +\d+ node_def_util\.cc:\d+\] NodeDef mentions attribute "
    r"use_unbounded_threadpool which is not in the op definition: Op<name=MapDataset;"
)
# On a machine without an NVIDIA device, TensorFlow's CUDA probe fails as expected.
CUDA_PROBE = re.compile(r"E\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] failed call to cuInit")


def verbose() -> bool:
    return os.environ.get(VERBOSE, "").strip() not in ("", "0")


def nvidia_device_present() -> bool:
    """An NVIDIA device node (Linux), or WSL's GPU bridge: where CUDA is expected to work."""
    return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/dxg"))


def is_chatter(line: str, gpu_expected: bool | None = None) -> bool:
    if CHATTER.match(line):
        return True
    if gpu_expected is None:
        gpu_expected = nvidia_device_present()
    return not gpu_expected and bool(CUDA_PROBE.match(line))


@contextlib.contextmanager
def native_chatter_hidden() -> Iterator[None]:
    """Run the block with file descriptor 2 captured; afterwards write back every line that
    is not chatter (Python's own warnings and errors included, in their order)."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", errors="replace")
            gpu_expected = nvidia_device_present()
            kept = [line for line in text.splitlines(keepends=True)
                    if not is_chatter(line, gpu_expected)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class _QuietLoader(importlib.abc.Loader):
    """TensorFlow's own loader, run under the filter, followed by the GPU probe."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # as if never wrapped
        with native_chatter_hidden():
            self.loader.exec_module(module)
            # The probe logs the cuInit error; run it here, under the filter, rather than
            # at the first op. It only lists devices: GPUs found stay usable.
            module.config.list_physical_devices("GPU")


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Wraps the loader of the first `import tensorflow` (by a stage, Keras or anything)."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # one import only; find the real spec without this
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def install() -> None:
    """Quiet TensorFlow for this process (nothing with RETRAIN_VERBOSE=1)."""
    if verbose():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" not in sys.modules and not any(
            isinstance(finder, _QuietTensorFlowImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())
