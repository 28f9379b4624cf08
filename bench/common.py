"""What every benchmark shares: arguments, generated data, timing and the machine description.

Benchmarks run on generated data (`retrain.synthetic`) with random weights (`model.weights:
none`): nothing is downloaded. Generated sets are kept in the work folder between runs,
named by their arguments.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PYTHON = sys.executable

# The default pipeline configuration, with random weights: what `extract` runs.
MODEL = {"backbone": "mobilenet_v2", "weights": "none", "image_size": 224, "alpha": 1.0}
# The official flower set's class sizes (3,670 images).
FLOWER_COUNTS = [633, 898, 641, 699, 799]


def flower_class_counts(images: int) -> list[int]:
    """The flower set's class proportions scaled to `images` in all."""
    counts = [round(c * images / sum(FLOWER_COUNTS)) for c in FLOWER_COUNTS]
    counts[-1] += images - sum(counts)
    return counts

# Real data where ../shared has it: 200 flower photos (40 per class) and MobileNetV2
# alpha 0.35 ImageNet weights without the top.
REAL_PHOTOS = SHARED / "data" / "flower_photos_small.tgz"
REAL_WEIGHTS_BY_ALPHA = {
    alpha: SHARED / "weights"
    / f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_224_no_top.h5"
    for alpha in (0.35, 0.5)}
REAL_WEIGHTS = REAL_WEIGHTS_BY_ALPHA[0.35]


def parse_args(description: str, argv=None, extra=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "retrain-bench",
                        help="generated data and scratch workspaces (kept between runs)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    return args


def bench_env(workdir: Path) -> dict:
    """Environment for benchmark subprocesses: this interpreter first on PATH, quiet TF, and a
    cache folder of the benchmark's own (so a cold LiteRT conversion can be measured)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(PYTHON).parent) + os.pathsep + env.get("PATH", "")
    env["RETRAIN_CACHE"] = str(workdir / "cache")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def use_bench_cache(workdir: Path) -> None:
    os.environ["RETRAIN_CACHE"] = str(workdir / "cache")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def generated_tarball(workdir: Path, counts: list[int], size: int, seed: int = 0) -> Path:
    """A class-folder tarball of generated JPEGs, reused when it already exists."""
    from retrain.synthetic import write_dataset

    name = f"synthetic-{len(counts)}x{sum(counts)}-{size}px-seed{seed}.tgz"
    dest = workdir / "data" / name
    if not dest.exists():
        write_dataset(dest, classes=len(counts), per_class=list(counts), size=size, seed=seed)
    return dest


def extracted(tarball: Path) -> Path:
    """The tarball unpacked next to itself (once): the folder that holds its top folder, what
    the fetch stage writes as data/raw."""
    dest = tarball.with_suffix("")
    if not dest.exists():
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=tarball.parent))
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp, filter="data")
        tmp.rename(dest)
    return dest


def image_paths(root: Path) -> list[Path]:
    return sorted(root.rglob("*.jpg"))


def sha256_of(path: Path) -> str:
    from retrain.workspace import sha256_of as digest

    return digest(path)


def set_params(workspace: Path, overrides: dict) -> None:
    """Merge `overrides` into the workspace's params.yaml and write it back as DVC reads it
    (YAML 1.2), checked against the schema first. Keys are sections holding dicts, or
    dotted (`"model.alpha": 0.35`)."""
    from ruamel.yaml import YAML

    from retrain.params import load_params, validate
    from retrain.workspace import deep_merge

    path = Path(workspace) / "params.yaml"
    params = load_params(path, check_model=False)
    for key, value in overrides.items():
        for section in reversed(key.split(".")):
            value = {section: value}
        params = deep_merge(params, value)
    validate(params)
    with open(path, "w", encoding="utf-8") as out:
        YAML(typ="safe", pure=True).dump(params, out)


def real_photo_params(photos: Path = REAL_PHOTOS, weights: Path = REAL_WEIGHTS) -> dict:
    """The `set_params` overrides that run the pipeline on the real photos and weights."""
    return {"data.url": str(photos.resolve()), "data.sha256": sha256_of(photos),
            "model.backbone": "mobilenet_v2", "model.weights": str(weights.resolve()),
            "model.alpha": 0.35, "model.image_size": 224}


def timed_run(cmd: list, cwd: Path, env: dict, check: bool = True) -> tuple[float, str]:
    """Wall seconds of a subprocess, and its combined output."""
    start = time.perf_counter()
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({done.returncode}):\n"
                           + done.stdout[-4000:])
    return seconds, done.stdout


def median(values) -> float:
    return float(statistics.median(values))


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine() -> dict:
    """CPU model, cores, RAM, OS and the versions that matter, for results.md."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = None
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        ram_gib = round(pages / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    versions = {}
    for package in ("tensorflow", "keras", "ai-edge-litert", "dvc", "numpy", "pillow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        line = next(x for x in text.splitlines() if x.startswith("flags"))
        flags = ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni") if f in line.split())
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "ram_gib": ram_gib,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "gpu": _gpu(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _gpu() -> str:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10)
        return done.stdout.strip() or "none"
    except (OSError, subprocess.SubprocessError):
        return "none"


def write_json(path: Path | None, results: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")


def verdict(ok: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "not run"}[ok]
