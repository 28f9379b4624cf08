"""Quiet stages: no TensorFlow/absl/LiteRT start-up chatter and no failed CUDA probe on a
machine without a GPU, real messages kept, everything back with RETRAIN_VERBOSE=1."""

import os
import re
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, TINY_MODEL

from retrain.quiet import is_chatter, nvidia_device_present

# What TensorFlow 2.21 and LiteRT print on this CPU-only machine without the filter.
CHATTER_LINES = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796281171.084789   11997 port.cc:153] oneDNN custom operations are on. "
    "You may see slightly different numerical results due to floating-point round-off errors",
    "I0000 00:00:1796281171.085195   11997 cudart_stub.cc:31] Could not find cuda drivers on "
    "your machine, GPU will not be used.",
    "I0000 00:00:1796281432.210262   13704 cpu_feature_guard.cc:227] This TensorFlow binary "
    "is optimized to use available CPU instructions in performance-critical operations.",
    "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
    "fully_quantize: 0, inference_type: 6, input_inference_type: UINT8, "
    "output_inference_type: FLOAT32",
    "E0000 00:00:1796284744.861970   20593 node_def_util.cc:682] NodeDef mentions attribute "
    "use_unbounded_threadpool which is not in the op definition: Op<name=MapDataset; "
    "signature=input_dataset:variant, other_arguments: -> handle:variant; attr=f:func> This "
    "may be expected if your graph generating binary is newer  than this binary. Unknown "
    "attributes will be ignored. NodeDef: {{node ParallelMapDatasetV2/_15}}",
]
CUINIT = ("E0000 00:00:1796281173.066794   11997 cuda_platform.cc:52] failed call to cuInit: "
          "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)")
# Any of these in a stage's stderr is the noise the filter exists to remove.
NOISE = re.compile(r"^[IE]\d{4} |absl::InitializeLog|oneDNN|cudart|cpu_feature_guard|cuInit"
                   r"|CUDA error|XNNPACK delegate|^INFO: |UserWarning", re.MULTILINE)


@pytest.mark.parametrize("line", CHATTER_LINES)
def test_known_chatter_is_recognised(line):
    assert is_chatter(line + "\n", gpu_expected=False)
    assert is_chatter(line + "\n", gpu_expected=True)


def test_a_failed_cuda_probe_is_chatter_only_without_an_nvidia_device():
    assert is_chatter(CUINIT, gpu_expected=False)
    assert not is_chatter(CUINIT, gpu_expected=True)  # a GPU whose driver fails: say so


@pytest.mark.parametrize("line", [
    "W0000 00:00:1796281171.084789   11997 some_op.cc:12] a real warning",
    "E0000 00:00:1796281171.084789   11997 kernel.cc:40] OOM when allocating tensor",
    "E0000 00:00:1796284744.861970   20593 node_def_util.cc:682] NodeDef mentions attribute "
    "padding_mode which is not in the op definition: Op<name=Conv2D; signature=input:T>",
    "/x/convert.py:846: UserWarning: something the converter means",
    "Traceback (most recent call last):",
])
def test_real_messages_are_not_chatter(line):
    assert not is_chatter(line, gpu_expected=False)


def filtered_stderr(lines: list[str], **env) -> str:
    """What a process whose native code writes `lines` to file descriptor 2 inside the
    filter, then prints one line from Python inside it too, leaves on its stderr."""
    code = ("import os, sys\n"
            "from retrain.quiet import native_chatter_hidden\n"
            "with native_chatter_hidden():\n"
            f"    for line in {lines!r}:\n"
            "        os.write(2, (line + '\\n').encode())\n"
            "    print('from Python', file=sys.stderr)\n")
    environment = {key: value for key, value in os.environ.items() if key != "RETRAIN_VERBOSE"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**environment, "PYTHONPATH": str(REPO / "src"), **env},
                            check=True)
    return result.stderr


def test_the_filter_drops_chatter_and_writes_back_the_rest_in_order():
    real = "W0000 00:00:1796281171.084789   11997 a.cc:1] a real warning"
    stderr = filtered_stderr([CHATTER_LINES[1], real, CHATTER_LINES[4], "a real line"])
    assert stderr.splitlines() == [real, "a real line", "from Python"]


def test_verbose_keeps_everything():
    stderr = filtered_stderr(CHATTER_LINES, RETRAIN_VERBOSE="1")
    assert stderr.splitlines() == [*CHATTER_LINES, "from Python"]


def run_stages(workspace, class_tree, **env):
    """split, then extract (TensorFlow, the CUDA probe, a LiteRT conversion and the XNNPACK
    engine) as subprocesses, the way dvc runs them; extract's stderr."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"] = dict(TINY_MODEL)
    params["extract"]["engine"] = "litert"
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("RETRAIN_VERBOSE", "TF_CPP_MIN_LOG_LEVEL")}
    environment.update(PYTHONPATH=str(REPO / "src"), **env)
    for args in (["split.py", "--raw", str(class_tree), "--out", "manifests",
                  "--metrics", "metrics", "--details", "data-details.json"],
                 ["extract.py", "--raw", str(class_tree), "--manifests", "manifests",
                  "--out", "features", "--details", "extract.json"]):
        result = subprocess.run([sys.executable, REPO / "stages" / args[0], *args[1:]],
                                cwd=workspace, env=environment, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    return result.stderr


@pytest.mark.skipif(nvidia_device_present(), reason="the CUDA probe succeeds on a GPU machine")
def test_a_tensorflow_stage_prints_no_chatter(class_tree, tmp_path):
    stderr = run_stages(tmp_path, class_tree)
    assert not NOISE.findall(stderr), stderr


def test_retrain_verbose_brings_the_chatter_back(class_tree, tmp_path):
    stderr = run_stages(tmp_path, class_tree, RETRAIN_VERBOSE="1")
    # TensorFlow's start-up lines (which of them depends on the CPU: oneDNN's only where
    # its custom operations are on by default) and LiteRT's engine line.
    assert re.search(r"^I\d{4} .*(oneDNN|cudart_stub|cpu_feature_guard)", stderr, re.MULTILINE)
    assert "XNNPACK delegate for CPU" in stderr
    if not nvidia_device_present():
        assert "failed call to cuInit" in stderr
