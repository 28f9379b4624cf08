"""The whole pipeline against the notebook way, side by side in one run.

- pipeline: `dvc repro` from split through render (split, extract, train_head, crossval,
  finetune, evaluate, export, card, render) in a scratch git + DVC workspace; `fetch` runs
  first, untimed (it only unpacks the generated tarball, which the notebook way reads too);
- notebook way: `bench/notebook_head.py --finetune` on the same workspace's images and
  splits: frozen base inside `model.fit` for `head.epochs`, then unfreeze from
  `finetune.from_layer` (BatchNorm frozen), recompile at lr x `finetune.lr_factor` and fit
  `finetune.epochs` more. It trains and validates only: no cross-validation, test
  evaluation, export or figures, so the comparison favours it.

Both on generated 224-px JPEGs (the flower set's class proportions), MobileNetV2 alpha 1.0
with random weights (`model.weights: none` costs the same arithmetic as ImageNet weights),
every other param at its default. Goal: the pipeline >= 3x faster (wall). CPU seconds are
the children's user + system time (`resource.getrusage(RUSAGE_CHILDREN)`).

    python bench/bench_whole.py [--images 3670] [--quick]
"""

from __future__ import annotations

import resource
from pathlib import Path

from bench_finetune import timed_stages
from bench_pipeline import dvc, git_commit
from common import (
    FLOWER_COUNTS,
    PYTHON,
    REPO,
    bench_env,
    generated_tarball,
    load_average,
    parse_args,
    set_params,
    sha256_of,
    timed_run,
    verdict,
    write_json,
)

NOTEBOOK = Path(__file__).resolve().parent / "notebook_head.py"
GOAL = 3.0


def class_counts(images: int) -> list[int]:
    """The flower set's class proportions scaled to `images` in all."""
    counts = [round(c * images / sum(FLOWER_COUNTS)) for c in FLOWER_COUNTS]
    counts[-1] += images - sum(counts)
    return counts


def make_workspace(workdir: Path, counts: list[int]) -> tuple[Path, dict]:
    from retrain.workspace import create_workspace, pipeline_env

    tarball = generated_tarball(workdir, counts, 224)
    ws = create_workspace(workdir / "whole-ws", source=REPO)
    env = {**bench_env(workdir), **{k: v for k, v in pipeline_env(ws).items()
                                    if k == "PYTHONPATH"}}
    set_params(ws, {"data.url": str(tarball), "data.sha256": sha256_of(tarball),
                    "model.weights": "none", "model.alpha": 1.0, "model.image_size": 224})
    git_commit(ws, env, "bench params")
    return ws, env


def measured(cmd: list, cwd: Path, env: dict) -> dict:
    """Wall and CPU seconds of one subprocess (and what it waited for), the load around it."""
    before, load = resource.getrusage(resource.RUSAGE_CHILDREN), load_average()
    seconds, out = timed_run(cmd, cwd, env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"command": " ".join(map(str, cmd)).replace(PYTHON, "python"), "wall_s": seconds,
            "cpu_s": cpu, "load_before": load, "load_after": load_average(),
            "output_tail": out.strip().splitlines()[-3:]}


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv, lambda p: p.add_argument(
        "--images", type=int, default=sum(FLOWER_COUNTS), help="generated images in all"))
    images = 200 if args.quick else args.images
    counts = class_counts(images)
    ws, env = make_workspace(args.workdir, counts)
    timed_run(dvc("repro", "fetch"), ws, env)  # untimed: both sides read data/raw
    results = {"images": sum(counts), "counts": counts, "workspace": str(ws),
               "command": "python bench/bench_whole.py" + (f" --images {images}"
                                                         if images != sum(FLOWER_COUNTS)
                                                         else "")}
    load = load_average()
    run = timed_stages(dvc("repro"), ws, env)
    results["pipeline"] = {"command": "dvc repro", "wall_s": run["seconds"],
                           "cpu_s": run["cpu_seconds"], "stages": run["stages"],
                           "load_before": load, "load_after": run["load_average"]}
    results["notebook"] = measured([PYTHON, NOTEBOOK, "--workspace", ws, "--finetune"],
                                   ws, env)
    results["ratio_wall"] = results["notebook"]["wall_s"] / results["pipeline"]["wall_s"]
    results["ratio_cpu"] = results["notebook"]["cpu_s"] / results["pipeline"]["cpu_s"]
    results["goal"] = results["ratio_wall"] >= GOAL
    print(markdown(results))
    write_json(args.json, results)
    return results


def goals(r: dict) -> list[tuple]:
    """(label, result, target, met) rows for the goals table of results.md."""
    label = (f"whole pipeline (split..render) vs notebook way, {r['images']:,} images"
             if r else "whole pipeline (split..render) vs notebook way")
    value = f"{r['ratio_wall']:.2f}x wall, {r['ratio_cpu']:.2f}x CPU" if r else "-"
    return [(label, value, f">= {GOAL:g}x", r.get("goal") if r else None)]


def markdown(r: dict) -> str:
    p, n = r["pipeline"], r["notebook"]
    return "\n".join([
        "## Whole pipeline against the notebook way",
        "",
        f"Command: `{r['command']}`. {r['images']:,} generated JPEGs at 224 px "
        f"(classes {', '.join(map(str, r['counts']))}), MobileNetV2 alpha 1.0, random "
        "weights, default params (5 head epochs, 5 fine-tuning epochs from layer 135). "
        "`fetch` excluded (run first, untimed). CPU: user + system seconds of the process "
        "and its children.",
        "",
        "| side | wall | CPU | load average before / after (1/5/15 min) |",
        "|---|---|---|---|",
        f"| `dvc repro` split..render (all 9 stages) | {p['wall_s']:.0f} s | "
        f"{p['cpu_s']:.0f} s | {p['load_before']} / {p['load_after']} |",
        f"| notebook way: `notebook_head.py --finetune` (train + validate only) | "
        f"{n['wall_s']:.0f} s | {n['cpu_s']:.0f} s | {n['load_before']} / "
        f"{n['load_after']} |",
        "",
        "| comparison | ratio | goal | |",
        "|---|---|---|---|",
        f"| notebook / pipeline, wall | **{r['ratio_wall']:.2f}x** | >= {GOAL:g}x | "
        f"{verdict(r['goal'])} |",
        f"| notebook / pipeline, CPU | {r['ratio_cpu']:.2f}x | | |",
        "",
        "Pipeline stages (wall s, from `Running stage` to the next): "
        + ", ".join(f"{name} {sec:.0f}" for name, sec in p["stages"].items()) + ".",
        "",
        f"Notebook run: {' '.join(n['output_tail'][-1:])}",
    ]) + "\n"


if __name__ == "__main__":
    main()
