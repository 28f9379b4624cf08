"""The small profile's whole pipeline (what `make small`, the demo, CI on pull requests and
most pipeline tests run) from this working tree and from a base revision, side by side:
each stage's wall time and the ratio base / now. Each run starts cold (its own empty
download, image and LiteRT cache), as a test session's first run does.

    python bench/bench_small_profile.py --base e9850f8 [--rounds 2]

Rounds alternate which side runs first (use an even number of rounds), so neither always
pays for the cold file cache, and a change in the machine's load hits both; the load
average is printed before and after.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from bench_finetune import timed_stages
from common import PYTHON, REPO, load_average, median, parse_args, write_json


def source_tree(workdir: Path, revision: str) -> Path:
    """The pipeline files of `revision`, exported to a folder of their own."""
    dest = workdir / f"source-{revision}"
    if not dest.exists():
        dest.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", revision], cwd=REPO, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def timed_pipeline(source: Path, dest: Path) -> dict[str, float]:
    """{stage: seconds from its "Running stage" line to the next one's, or to the end}, and
    "total", for `dvc repro` of the small profile in a fresh workspace made from `source`."""
    from retrain.workspace import create_workspace, pipeline_env

    shutil.rmtree(dest, ignore_errors=True)
    workspace = create_workspace(dest / "ws", source=source, profile="small")
    env = {**pipeline_env(workspace), "RETRAIN_CACHE": str(dest / "cache")}
    run = timed_stages([PYTHON, "-m", "dvc", "repro"], workspace, env)
    return {**run["stages"], "total": run["seconds"]}


def main(argv=None) -> None:
    def extra(parser):
        parser.add_argument("--base", required=True, help="git revision to compare with")
        parser.add_argument("--rounds", type=int, default=1)

    args = parse_args(__doc__, argv, extra)
    sys.path.insert(0, str(REPO / "src"))
    sources = {"base": source_tree(args.workdir, args.base), "now": REPO}
    print(f"load average before: {load_average()}")
    runs = {name: [] for name in sources}
    for round_ in range(args.rounds):
        # Alternate which side goes first: the first run of a pair pays for a cold file
        # cache and first imports (1.1-1.3x on stages whose code did not change).
        order = list(sources.items())[:: 1 if round_ % 2 == 0 else -1]
        for name, source in order:
            runs[name].append(timed_pipeline(source, args.workdir / f"small-{name}"))
            print(f"round {round_ + 1} {name}: {runs[name][-1]['total']:.1f} s", flush=True)
    print(f"load average after: {load_average()}")

    stages = list(runs["now"][0])
    print(f"\n| stage | {args.base} (s) | now (s) | base / now |\n|---|---|---|---|")
    results = {}
    for stage in stages:
        base, now = (median([run.get(stage, 0.0) for run in runs[name]]) for name in sources)
        results[stage] = {"base_s": base, "now_s": now}
        ratio = f"{base / now:.2f}x" if now else "-"
        print(f"| {stage} | {base:.1f} | {now:.1f} | {ratio} |")
    write_json(args.json, {"base": args.base, "rounds": args.rounds, "stages": results,
                           "runs": runs})


if __name__ == "__main__":
    main()
