"""A seed-only pull request judged by `report`, the way CI judges one, on the real photos.

In a scratch git + DVC workspace on the 200 real flower photos (../shared) with the
MobileNetV2 alpha 0.35 ImageNet weights and `finetune.replicates: K`: `dvc repro` and a
commit (the base, seed 42), then `dvc exp run -S seed=7` (only the training seed changes:
split, features and crossval are reused) and `python -m retrain report --base HEAD`, whose
verdicts and exit status are printed. With K = 1 the gates cannot see training noise; with
K >= 2 they are recipe-level.

`--relabel F` then judges a second pull request against the same base: the workspace back at
the base, a seeded fraction F of the training images' labels shuffled among themselves
through `data/relabel.csv` (the file a user edits after the audit), `dvc exp run` (split
and everything after it re-run) and `report --base HEAD` again.

    python bench/seed_pair.py [--replicates 3] [--seeds 42 7] [--relabel 0.2]
"""

from __future__ import annotations

import subprocess

from bench_pipeline import dvc, git_commit
from common import (
    PYTHON,
    REPO,
    bench_env,
    load_average,
    parse_args,
    real_photo_params,
    set_params,
    timed_run,
)


def main() -> None:
    def extra(parser):
        parser.add_argument("--replicates", type=int, default=3)
        parser.add_argument("--seeds", type=int, nargs=2, default=(42, 7))
        parser.add_argument("--relabel", type=float, default=0.0,
                            help="also judge a pull request that shuffles this fraction of "
                                 "the training labels (data/relabel.csv)")

    args = parse_args(__doc__.splitlines()[0], extra=extra)
    from retrain.workspace import create_workspace, pipeline_env

    base_seed, new_seed = args.seeds
    ws = create_workspace(args.workdir / f"seed-pair-K{args.replicates}", source=REPO)
    env = {**bench_env(args.workdir), **{k: v for k, v in pipeline_env(ws).items()
                                         if k == "PYTHONPATH"}}
    set_params(ws, {**real_photo_params(), "seed": base_seed,
                    "finetune.replicates": args.replicates})
    print(f"load average {load_average()}", flush=True)
    seconds, out = timed_run(dvc("repro"), ws, env)
    print(f"base (seed {base_seed}, K = {args.replicates}): dvc repro {seconds:.0f} s",
          flush=True)
    git_commit(ws, env, f"base: seed {base_seed}")
    seconds, out = timed_run(dvc("exp", "run", "-S", f"seed={new_seed}"), ws, env)
    print(f"dvc exp run -S seed={new_seed}: {seconds:.0f} s", flush=True)
    print("\n".join(line for line in out.splitlines() if "Running stage" in line))
    judge(ws, env)
    if args.relabel:
        subprocess.run(["git", "checkout", "-q", "--", "."], cwd=ws, env=env, check=True)
        subprocess.run(dvc("checkout", "-q", "--force"), cwd=ws, env=env, check=True)
        changed = shuffle_training_labels(ws, args.relabel, seed=0)
        seconds, out = timed_run(dvc("exp", "run"), ws, env)
        print(f"{changed} training labels changed by data/relabel.csv; dvc exp run: "
              f"{seconds:.0f} s", flush=True)
        print("\n".join(line for line in out.splitlines() if "Running stage" in line))
        judge(ws, env)
    print(f"load average {load_average()}")


def judge(ws, env) -> None:
    report = subprocess.run([PYTHON, "-m", "retrain", "report", "--base", "HEAD"], cwd=ws,
                            env=env, capture_output=True, text=True)
    print(report.stdout + report.stderr)
    print(f"report exit status: {report.returncode}", flush=True)


def shuffle_training_labels(ws, fraction: float, seed: int) -> int:
    """Write data/relabel.csv giving a seeded `fraction` of the training images their
    labels permuted among themselves; how many labels it changes."""
    import numpy as np
    import pandas as pd

    # One row per image: identical copies share a sha256, and a relabel names each once.
    train = pd.read_csv(ws / "data" / "manifests" / "train.csv").drop_duplicates("sha256")
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(train), int(fraction * len(train)), replace=False)
    labels = train["label"].to_numpy()[picked]
    shuffled = rng.permutation(labels)
    lines = [f"{digest},{label}" for digest, label, old in zip(
        train["sha256"].to_numpy()[picked], shuffled, labels, strict=True) if label != old]
    (ws / "data" / "relabel.csv").write_text("sha256,class\n" + "\n".join(lines) + "\n")
    return len(lines)


if __name__ == "__main__":
    main()
