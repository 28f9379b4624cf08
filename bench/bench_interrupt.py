"""Ctrl-C during each long stage: how often the stage stops, how fast, and what it leaves.

    python bench/bench_interrupt.py              # 20 tries per stage on the small profile
    python bench/bench_interrupt.py --tries 5 --stages extract

A terminal's Ctrl-C sends SIGINT to the whole foreground process group. Each try runs a
stage's command from dvc.yaml in a process group of its own (as `dvc repro` runs it, in the
shell), sends the group SIGINT at a moment drawn uniformly over the stage's uninterrupted
run time (imports, model building and conversion included: that is where TensorFlow
swallows KeyboardInterrupts), and records the exit status, the seconds from the signal to
the exit, and whether any of the stage's outputs exists afterwards (they are moved aside
first, as DVC removes them before a run). A try whose stage had already written all its
outputs when the signal came (it was exiting) does not count. Prints one line per stage:
stopped (non-zero exit, no output), lost (exit 0), and the slowest stop.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from common import REPO, bench_env, machine, parse_args

LONG_STAGES = ("extract", "crossval", "finetune", "export")


@dataclass
class Try:
    delay: float  # seconds from the start to the signal
    returncode: int | None  # None: the stage had written its outputs before the signal
    stop_seconds: float = 0.0  # from the signal to the exit
    outputs_left: tuple[str, ...] = ()
    finished_seconds: float | None = None  # not counted: when the run ended by itself

    @property
    def counted(self) -> bool:
        return self.returncode is not None

    @property
    def stopped(self) -> bool:
        return self.counted and self.returncode != 0 and not self.outputs_left


def stage_definition(workspace: Path, stage: str) -> tuple[str, list[str]]:
    """The stage's command and every path it writes (outs and metrics), from dvc.yaml."""
    definition = yaml.safe_load((workspace / "dvc.yaml").read_text())["stages"][stage]
    written = []
    for entry in definition.get("outs", []) + definition.get("metrics", []):
        written.append(next(iter(entry)) if isinstance(entry, dict) else entry)
    return definition["cmd"], written


def run_stage(workspace: Path, stage: str, env: dict, delay: float | None = None) -> Try:
    """Run the stage's command; with `delay`, SIGINT its process group after that many
    seconds. Its outputs are moved aside first and put back afterwards."""
    cmd, written = stage_definition(workspace, stage)
    aside = workspace / ".interrupt-aside"
    shutil.rmtree(aside, ignore_errors=True)
    for index, path in enumerate(written):
        if (workspace / path).exists():
            (aside / str(index)).parent.mkdir(parents=True, exist_ok=True)
            os.replace(workspace / path, aside / str(index))
    try:
        return _signalled_run(workspace, cmd, written, env, delay)
    finally:
        for index, path in enumerate(written):
            if (aside / str(index)).exists():
                target = workspace / path
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
                os.replace(aside / str(index), target)
        shutil.rmtree(aside, ignore_errors=True)


def _signalled_run(workspace: Path, cmd: str, written: list[str], env: dict,
                   delay: float | None) -> Try:
    start = time.monotonic()
    process = subprocess.Popen(["bash", "-c", cmd], cwd=workspace, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    if delay is None:
        process.wait()
        if process.returncode != 0:
            raise RuntimeError(f"{cmd}: exit {process.returncode}")
        return Try(time.monotonic() - start, 0)
    try:
        process.wait(timeout=delay)
        # finished before the signal: not a try
        return Try(delay, None, finished_seconds=time.monotonic() - start)
    except subprocess.TimeoutExpired:
        pass
    if all((workspace / path).exists() for path in written):
        process.wait()
        return Try(delay, None, finished_seconds=delay)  # its work was done: not a try
    os.killpg(process.pid, signal.SIGINT)
    signalled = time.monotonic()
    process.wait()
    left = tuple(path for path in written if (workspace / path).exists())
    return Try(delay, process.returncode, time.monotonic() - signalled, left)


def interrupt_stage(workspace: Path, stage: str, tries: int, env: dict,
                    rng: random.Random, reference: float | None = None
                    ) -> tuple[float, list[Try]]:
    """`tries` counted tries, each signalled at a moment drawn over `reference` seconds, the
    stage's run time: an uninterrupted run's when not given. The draws are stratified: the
    k-th counted try falls uniformly in the k-th of `tries` equal slices of the run, so even
    two tries reach both its first half (imports, building) and its second (the heavy loop,
    writing). A given reference may be too long (measured under more load): a run that ends
    before its signal shortens it to that run's time, so the next draws fall within the
    stage."""
    if reference is None:
        reference = run_stage(workspace, stage, env).delay
    span = reference
    results: list[Try] = []
    while (counted := sum(t.counted for t in results)) < tries:
        low, high = (0.05 + 0.9 * k / tries for k in (counted, counted + 1))
        done = run_stage(workspace, stage, env, rng.uniform(low, high) * span)
        if done.finished_seconds is not None:
            span = min(span, done.finished_seconds)
        results.append(done)
    return reference, results


def prepared_workspace(workdir: Path, env: dict) -> Path:
    """A scratch workspace on the small profile where every long stage has run once; `env`
    gets its PYTHONPATH (the stages run the workspace's copy of the package)."""
    from retrain.workspace import create_workspace

    workspace = create_workspace(workdir / "interrupt-ws", source=REPO, profile="small")
    env["PYTHONPATH"] = str(workspace.resolve() / "src")
    subprocess.run(["python", "-m", "dvc", "repro", *LONG_STAGES], cwd=workspace, env=env,
                   check=True, stdout=subprocess.DEVNULL)
    return workspace


def main() -> None:
    def extra(parser):
        parser.add_argument("--tries", type=int, default=20, help="counted tries per stage")
        parser.add_argument("--stages", nargs="+", default=list(LONG_STAGES))
        parser.add_argument("--seed", type=int, default=0)

    args = parse_args(__doc__, extra=extra)
    env = bench_env(args.workdir)
    workspace = prepared_workspace(args.workdir, env)
    rng = random.Random(args.seed)
    report = {"machine": machine(), "stages": {}}
    for stage in args.stages:
        reference, results = interrupt_stage(workspace, stage, args.tries, env, rng)
        counted = [t for t in results if t.counted]
        stopped = [t for t in counted if t.stopped]
        lost = [t for t in counted if t.returncode == 0]
        slowest = max((t.stop_seconds for t in counted), default=0.0)
        codes = sorted({t.returncode for t in counted})
        print(f"{stage}: stopped {len(stopped)}/{len(counted)}, lost {len(lost)}, exit codes "
              f"{codes}, slowest stop {slowest:.1f} s after the signal (run {reference:.1f} s "
              f"uninterrupted; {len(results) - len(counted)} signal(s) came once its outputs "
              "were written)",
              flush=True)
        report["stages"][stage] = {"reference_seconds": reference,
                                   "tries": [t.__dict__ for t in results]}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
