"""Profiles and scratch workspaces: run the pipeline on generated data without touching yours.

    python -m retrain profile small   # generate the profile's data, merge its params
    python -m retrain demo            # every stage on the small profile in .demo/
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from retrain.atomic import write_text
from retrain.errors import UserError
from retrain.params import load_params, parse_yaml, read_yaml, validate
from retrain.synthetic import write_dataset

# What a workspace needs: the pipeline, its params and the code its stages depend on.
PIPELINE_FILES = ("dvc.yaml", "params.yaml", ".dvcignore", "stages", "profiles", "src",
                  "data/exclude.txt", "data/relabel.csv")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = deep_merge(base[key], value)
        else:
            merged[key] = value
    return merged


def apply_profile(workspace: str | Path, name: str) -> dict:
    """Generate the profile's dataset in `workspace` and merge its params into params.yaml,
    keeping the file's comments and key order."""
    workspace = Path(workspace)
    profile_path = workspace / "profiles" / f"{name}.yaml"
    if not profile_path.exists():
        known = sorted(p.stem for p in (workspace / "profiles").glob("*.yaml"))
        raise UserError(f"profile {name!r} not found (known: {', '.join(known) or 'none'})")
    profile = read_yaml(profile_path)
    params_path = workspace / "params.yaml"
    params = deep_merge(load_params(params_path, check_model=False), profile.get("params", {}))
    generate = dict(profile["generate"])
    tarball = workspace / generate.pop("dest")
    write_dataset(tarball, **generate)
    params["data"]["url"] = tarball.relative_to(workspace).as_posix()
    params["data"]["sha256"] = sha256_of(tarball)
    validate(params)
    text = _with_values(params_path.read_text(encoding="utf-8"), params)
    if parse_yaml(text, params_path) != params:  # never write what reads back otherwise
        raise UserError(f"{params_path}: cannot merge profile {name!r} without changing what "
                        "other values mean; merge it by hand")
    write_text(params_path, text)
    return params


def _with_values(text: str, params: dict) -> str:
    """The YAML `text` with `params`' values set, its comments kept (ruamel round trip, as
    `dvc exp run -S` does)."""
    from ruamel.yaml import YAML

    round_trip = YAML()
    round_trip.indent(mapping=2, sequence=4, offset=2)  # params.yaml's own layout
    round_trip.preserve_quotes = True  # "yes" must stay a string for PyYAML
    round_trip.width = 4096  # never fold a long path onto the next line
    document = round_trip.load(text)

    def assign(node, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(node.get(key), dict):
                assign(node[key], value)
            elif node.get(key) != value:  # untouched values keep their layout
                node[key] = value

    assign(document, params)
    out = io.StringIO()
    round_trip.dump(document, out)
    return out.getvalue()


# Marks a folder made by create_workspace, the only kind it deletes to start again.
SCRATCH_MARKER = ".retrain-scratch"


def run(cmd: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, check=True, env=pipeline_env(cwd), **kwargs)


def pipeline_env(workspace: str | Path) -> dict:
    """Environment in which `python` in dvc.yaml is this interpreter and `retrain` is the
    workspace's own copy of the package (the one its dvc.lock hashes)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(Path(workspace).resolve() / "src")
    return env


def create_workspace(dest: str | Path, source: str | Path = ".", profile: str | None = None
                     ) -> Path:
    """Copy the pipeline definition into a fresh git + DVC repository at `dest`."""
    source, dest = Path(source).resolve(), Path(dest)
    if not (source / "dvc.yaml").exists():
        raise UserError(f"{source}: no dvc.yaml here (run from the project's folder)")
    if dest.exists() and any(dest.iterdir()):
        # Only a workspace made here before is replaced: never a folder the user filled.
        if not (dest / SCRATCH_MARKER).exists():
            raise UserError(f"{dest}: folder exists and is not a scratch workspace; "
                            "choose another --dest or remove it")
        shutil.rmtree(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / SCRATCH_MARKER).write_text("made by `python -m retrain`; replaced on the next run\n")
    for name in PIPELINE_FILES:
        src = source / name
        if src.is_dir():
            shutil.copytree(src, dest / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / ".gitignore").write_text(
        "/data/*\n!/data/exclude.txt\n!/data/relabel.csv\n"  # the user's edits stay in git
        f"/models/\n/dvclive/\n/reports/figures/\n/{SCRATCH_MARKER}\n")
    git = ["git", "-c", "user.name=retrain", "-c", "user.email=retrain@localhost"]
    run(["git", "init", "-q", "-b", "main"], dest)
    run([sys.executable, "-m", "dvc", "init", "-q"], dest)
    run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], dest)
    run([sys.executable, "-m", "dvc", "config", "core.autostage", "true"], dest)
    if profile:
        apply_profile(dest, profile)
    run(["git", "add", "-A"], dest)
    run([*git, "commit", "-q", "-m", "pipeline"], dest)
    return dest


def demo(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retrain demo",
                                     description="All stages on the small profile, in a "
                                     "scratch copy of this pipeline.")
    parser.add_argument("--dest", default=".demo")
    parser.add_argument("--profile", default="small")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    workspace = create_workspace(args.dest, profile=args.profile)
    run([sys.executable, "-m", "dvc", "repro"], workspace)
    figures = (workspace / "reports" / "figures").resolve()
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s")
    print(f"metrics: {(workspace / 'metrics').resolve()} (`dvc metrics show` there)")
    print(f"model card: {(workspace / 'models' / 'model_card.md').resolve()}")
    print(f"figures: {figures}")
    for png in sorted(figures.glob("*.png")):
        print(f"  {png.name}")
    return 0


def profile(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retrain profile",
                                     description="Generate a profile's data and merge its "
                                     "params into ./params.yaml.")
    parser.add_argument("name")
    args = parser.parse_args(argv)
    params = apply_profile(".", args.name)
    print(f"profile {args.name}: params.yaml now uses {params['data']['url']} "
          f"({params['model']['backbone']}, weights {params['model']['weights']}, "
          f"{params['model']['image_size']} px)")
    return 0
