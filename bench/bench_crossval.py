"""The `crossval` stage's training loop, a baseline revision's code against this checkout's,
side by side on the same random flower-sized features (3,303 train+val rows x 1,280 floats,
5 classes, the default `head.*` recipe and 5 folds x 2 repeats).

    python bench/bench_crossval.py                  # baseline: main
    python bench/bench_crossval.py --baseline 5312050 --rounds 3

Each round runs both versions in fresh processes, alternating which goes first, and times
`cross_validate_head` alone (imports and feature generation excluded). Prints each round's
seconds, the medians and their ratio, and whether both versions gave the same fold scores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

from common import PYTHON, REPO, bench_env, load_average, machine, median, parse_args

# What the child process runs, with PYTHONPATH pointing at one version's src.
CHILD = """
import json, sys, time
import numpy as np
import yaml
from retrain.crossval import cross_validate_head
rows, size, classes, folds, repeats = 3303, 1280, 5, 5, 2
rng = np.random.default_rng(0)
labels = np.arange(rows) % classes
features = rng.normal(size=(rows, size)).astype("float32")
features[np.arange(rows), labels] += 1.0  # a learnable signal
digests = np.array([f"img{i}" for i in range(rows)])
head = yaml.safe_load(open(sys.argv[1]))["head"]
start = time.perf_counter()
summary = cross_validate_head(features, labels, digests, classes, head, folds=folds,
                              repeats=repeats, seed=42)
print(json.dumps({"seconds": time.perf_counter() - start, "per_fold": summary["per_fold"]}))
"""


def extra_args(parser) -> None:
    parser.add_argument("--baseline", default="main", help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=3)


def baseline_src(revision: str, workdir: Path) -> Path:
    """The baseline revision's src/ unpacked under the work folder."""
    commit = subprocess.run(["git", "rev-parse", revision], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout.strip()
    target = workdir / f"crossval-src-{commit[:12]}"
    if not target.exists():
        archive = workdir / f"{commit[:12]}.tar"
        subprocess.run(["git", "archive", "-o", archive, commit, "src"], cwd=REPO, check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
    return target / "src"


def run_once(src: Path, env: dict) -> dict:
    result = subprocess.run([PYTHON, "-c", CHILD, str(REPO / "params.yaml")], cwd=REPO,
                            env={**env, "PYTHONPATH": str(src)}, capture_output=True,
                            text=True)
    if result.returncode:
        raise RuntimeError(f"crossval run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = parse_args(__doc__, argv, extra_args)
    env = bench_env(args.workdir)
    versions = {"baseline": baseline_src(args.baseline, args.workdir), "new": REPO / "src"}
    seconds = {name: [] for name in versions}
    scores = {}
    print(f"load average before: {load_average()}")
    for round_ in range(args.rounds):
        order = list(versions) if round_ % 2 == 0 else list(versions)[::-1]
        for name in order:
            result = run_once(versions[name], env)
            seconds[name].append(result["seconds"])
            scores[name] = result["per_fold"]
            print(f"round {round_ + 1} {name:8s} {result['seconds']:6.2f} s")
    base, new = median(seconds["baseline"]), median(seconds["new"])
    results = {"baseline": args.baseline, "median_s": {"baseline": base, "new": new},
               "ratio": base / new, "same_fold_scores": scores["baseline"] == scores["new"],
               "machine": machine(), "load_average_after": load_average()}
    print(f"crossval, 10 heads on 3,303 x 1,280 features: baseline ({args.baseline}) "
          f"{base:.2f} s, new {new:.2f} s (medians of {args.rounds}); "
          f"{base / new:.1f}x faster; same fold scores: {results['same_fold_scores']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
