"""Shared fixtures. Everything runs offline; real photos and weights from ../shared are used
where present and skipped cleanly where not."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SMALL_FLOWERS = SHARED / "data" / "flower_photos_small.tgz"
REAL_WEIGHTS_035 = (SHARED / "weights"
                    / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5")

# A tiny real network: MobileNetV2 at alpha 0.35 and 32 px builds in a second on a CPU.
TINY_MODEL = {"backbone": "mobilenet_v2", "weights": "none", "image_size": 32, "alpha": 0.35}


@pytest.fixture(autouse=True, scope="session")
def isolated_cache(tmp_path_factory):
    """Downloads, decoded images and converted models go to a cache of the test session's
    own, one for all xdist workers, as a user's runs share ~/.cache/retrain: a workspace one
    worker fetched (`pipeline_run`) finds its archive there when another worker's queued
    experiment needs it."""
    cache = session_root(tmp_path_factory) / "retrain-cache"
    cache.mkdir(exist_ok=True)
    os.environ["RETRAIN_CACHE"] = str(cache)
    yield


def session_root(tmp_path_factory) -> Path:
    """The test session's temporary folder, above every xdist worker's own."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@pytest.fixture
def tiny_model_params() -> dict:
    return dict(TINY_MODEL)


@pytest.fixture
def class_tree(tmp_path):
    """An extracted dataset: raw/<dataset>/<class>/*.jpg, 3 classes x 12 generated images."""
    import tarfile

    from retrain.synthetic import write_dataset

    tarball = write_dataset(tmp_path / "set.tgz", classes=3, per_class=12, size=32, seed=1)
    raw = tmp_path / "raw"
    with tarfile.open(tarball) as tar:
        tar.extractall(raw, filter="data")
    return raw


# `.ci/run` sets this: CI always has ../shared, so a test that needs it must run there.
REQUIRE_SHARED = "RETRAIN_REQUIRE_SHARED"


def shared_file_or_skip(path: Path, what: str) -> Path:
    """`path` under ../shared; absent, the test skips (a plain clone has no ../shared) or,
    under `.ci/run`, fails: a CI run must not pass by skipping the real-data checks."""
    if path.is_file():
        return path
    message = f"{path} ({what}) not present"
    if os.environ.get(REQUIRE_SHARED) == "1":
        pytest.fail(f"{message}; {REQUIRE_SHARED}=1 (set by .ci/run) requires it: put the "
                    "shared data next to the checkout", pytrace=False)
    pytest.skip(message)


def real_flowers_or_skip() -> Path:
    return shared_file_or_skip(SMALL_FLOWERS, "200 real flower photos")


def real_weights_or_skip() -> Path:
    return shared_file_or_skip(REAL_WEIGHTS_035, "real MobileNetV2 alpha 0.35 weights")


def dvc(workspace: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `dvc ARGS` in a workspace the way a user would, capturing its output."""
    from retrain.workspace import pipeline_env

    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=workspace,
                            env=pipeline_env(workspace), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def set_param(workspace: Path, dotted: str, value) -> None:
    """Edit one param of a workspace's params.yaml by hand, as a user would."""
    path = workspace / "params.yaml"
    params = yaml.safe_load(path.read_text())
    *sections, key = dotted.split(".")
    node = params
    for section in sections:
        node = node[section]
    node[key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def stages_run(output: str) -> list[str]:
    """Stage names a `dvc repro`/`dvc exp run` log says it ran (not skipped or restored)."""
    return re.findall(r"Running stage '([\w-]+)'", output)


# The small profile's stages in the order `dvc repro` runs them: those before the head, and
# those a head param change re-runs (the audit reads only the data and crossval's folds).
UPSTREAM = ["fetch", "split", "extract"]
FROM_TRAIN_HEAD = ["train_head", "crossval", "finetune", "evaluate", "export", "card",
                   "render"]


def locked_outs(workspace: Path) -> dict[str, dict[str, str]]:
    """{stage: {output path: md5}} as recorded in dvc.lock."""
    lock = yaml.safe_load((workspace / "dvc.lock").read_text())
    return {name: {out["path"]: out["md5"] for out in stage.get("outs", [])}
            for name, stage in lock["stages"].items()}


def read_metrics(workspace: Path) -> dict[str, dict]:
    """Every figure: the metrics files DVC shows and the stages' details files, by path."""
    return {path.relative_to(workspace).as_posix(): json.loads(path.read_text())
            for folder in ("metrics", "reports/details")
            for path in sorted((workspace / folder).rglob("*.json"))}


STAGE_SECONDS = "stage-seconds.json"  # beside the session's pipeline run, not in it


def timed_repro(workspace: Path) -> dict[str, float]:
    """`dvc repro` in `workspace`: {stage: seconds from its "Running stage" line to the next
    stage's, or to the end}. DVC flushes each log line as it is written."""
    from retrain.workspace import pipeline_env

    process = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=workspace,
                               env=pipeline_env(workspace), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    started: dict[str, float] = {}
    lines = []
    for line in process.stdout:
        lines.append(line)
        if found := re.match(r"Running stage '([\w-]+)'", line):
            started[found[1]] = time.monotonic()
    process.wait()
    if process.returncode != 0:
        raise AssertionError("dvc repro failed:\n" + "".join(lines))
    ends = [*list(started.values())[1:], time.monotonic()]
    return {stage: end - start for (stage, start), end in zip(started.items(), ends)}


def build_pipeline_run(dest: Path) -> None:
    """A git + DVC workspace on the small profile at `dest`, the whole pipeline run and
    committed; how long each stage took goes to `STAGE_SECONDS` beside it."""
    from retrain.workspace import create_workspace

    workspace = create_workspace(dest, source=REPO, profile="small")
    (dest.parent / STAGE_SECONDS).write_text(json.dumps(timed_repro(workspace)))
    subprocess.run(["git", "add", "-A"], cwd=workspace, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm",
                    "first run"], cwd=workspace, check=True)


def run_once_per_session(tmp_path_factory, name: str, build) -> Path:
    """`build(folder)` run once for the whole test session, even under xdist, whose workers
    share the session's temporary root: the first worker to get here builds while the others
    wait on a file lock. A failed build is recorded, so the others fail at once instead of
    building it again."""
    from filelock import FileLock

    root = session_root(tmp_path_factory)
    built, failed = root / name / "ws", root / name / "failed.txt"
    with FileLock(root / f"{name}.lock"):
        if failed.exists():
            pytest.fail(f"{name} failed in another worker:\n{failed.read_text()}",
                        pytrace=False)
        if not built.exists():
            built.parent.mkdir(exist_ok=True)
            try:
                build(built)
            except BaseException as error:
                failed.write_text(str(error))
                raise
    return built


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory) -> Path:
    """A git + DVC workspace on the small profile where the whole pipeline has run once.

    Built once per session (a full run costs a minute or two), and copied for each xdist
    worker: dvc commands of two workers in one workspace would contend for its lock. Tests
    that change it copy it first (`workspace`).
    """
    built = run_once_per_session(tmp_path_factory, "pipeline-run", build_pipeline_run)
    own = tmp_path_factory.mktemp("pipeline") / "ws"
    shutil.copytree(built, own, symlinks=True)
    return own


@pytest.hookimpl(tryfirst=True)  # before xdist turns xdist_group marks into scopes
def pytest_collection_modifyitems(items):
    """Under `--dist loadgroup`, the tests that read `pipeline_run` in place form one xdist
    group. xdist hands out the largest groups first, so one worker starts building the run
    at once while the other runs tests that need no pipeline, and finds it built (or nearly)
    when it reaches a test that copies it (`workspace`)."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if ("pipeline_run" in names and "workspace" not in names
                and not item.get_closest_marker("xdist_group")):
            item.add_marker(pytest.mark.xdist_group("pipeline_run"))


@pytest.fixture(scope="session")
def pipeline_stage_seconds(tmp_path_factory, pipeline_run) -> dict[str, float]:
    """{stage: seconds} of the session's pipeline run, under the load the tests put on it."""
    return json.loads((session_root(tmp_path_factory) / "pipeline-run" / STAGE_SECONDS)
                      .read_text())


@pytest.fixture
def workspace(pipeline_run, tmp_path) -> Path:
    """A private copy of `pipeline_run` (git history, DVC cache and outputs included)."""
    dest = tmp_path / "ws"
    shutil.copytree(pipeline_run, dest, symlinks=True)
    return dest


@pytest.fixture(scope="session")
def real_flowers_run(tmp_path_factory) -> Path:
    """The pipeline through `evaluate` on the 200 real flower photos with the real
    MobileNetV2 alpha 0.35 ImageNet weights (given as a weights file): a small real run.

    Half the images go to test (80), so accuracies there are worth comparing; the head
    trains longer than the default 5 epochs because 80 training images make few steps.
    The audit, which no test of this run reads, is off.
    """
    import hashlib

    from retrain.workspace import create_workspace

    tarball, weights = real_flowers_or_skip(), real_weights_or_skip()
    workspace = create_workspace(tmp_path_factory.mktemp("real-flowers") / "ws", source=REPO)
    for key, value in {"data.url": str(tarball),
                       "data.sha256": hashlib.sha256(tarball.read_bytes()).hexdigest(),
                       "model.weights": str(weights), "model.alpha": 0.35,
                       "split.test_fraction": 0.5, "head.epochs": 20,
                       "finetune.epochs": 3, "audit.enabled": False}.items():
        set_param(workspace, key, value)
    dvc(workspace, "repro", "evaluate")
    return workspace


@pytest.fixture
def place(tmp_path):
    """Write archive bytes to tmp_path and extract them to tmp_path/raw, beside a sentinel
    folder that a path-traversal attack would write into."""
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "secret.txt").write_text("untouched")

    from retrain.archive import extract_dataset

    def extract(data: bytes, name: str = "pack.tgz", **limits) -> Path:
        archive = tmp_path / name
        archive.write_bytes(data)
        return extract_dataset(archive, tmp_path / "raw", **limits)[0]

    extract.sentinel = sentinel
    return extract
