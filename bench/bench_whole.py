"""The whole pipeline against the notebook way, side by side in one run.

- pipeline: a cold `dvc repro` of every stage (fetch through render) in a scratch git + DVC
  workspace with an empty cache (no LiteRT model, no decoded images);
- notebook way: `bench/notebook_head.py --finetune` on the same workspace's images and
  splits, after the pipeline (it reads the folder `fetch` unpacked and the split manifests,
  so it does no unpacking or splitting of its own): frozen base inside `model.fit` for
  `head.epochs`, then unfreeze from `finetune.from_layer` (BatchNorm frozen), recompile at
  lr x `finetune.lr_factor` and fit `finetune.epochs` more. It trains and validates only:
  no cross-validation, test evaluation, export or figures.

Two ratios: the notebook against the pipeline's stages that do the notebook's work (fetch,
split, extract, train_head, finetune, evaluate; goal >= 2.5x), and against all stages (goal
>= 1.5x). Data: `--data generated` (224-px JPEGs in the flower set's class proportions,
`--images`) or `--data real` (the 200 flower photos in ../shared). Model: MobileNetV2 at
`--alpha` (0.35 and 0.5: the ImageNet weights files in ../shared; 1.0: random weights, the
same arithmetic; the default where ../shared is absent), every other param at its default.
CPU seconds are the children's user + system time (`resource.getrusage(RUSAGE_CHILDREN)`);
load averages before and after each side.

    python bench/bench_whole.py [--data generated|real] [--images 3670] [--alpha 0.35] [--quick]
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

from bench_finetune import timed_stages
from bench_pipeline import dvc, git_commit
from common import (
    FLOWER_COUNTS,
    PYTHON,
    REAL_PHOTOS,
    REAL_WEIGHTS_BY_ALPHA,
    REPO,
    bench_env,
    flower_class_counts,
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
GOALS = {"notebook_work": 2.5, "all_stages": 1.5}
# The stages that do what the notebook does (unpack, split, features, head, fine-tuning,
# scoring); the others (crossval, audit, export, card, render) it does not do at all.
NOTEBOOK_WORK = ("fetch", "split", "extract", "train_head", "finetune", "evaluate")


def make_workspace(workdir: Path, data_params: dict, alpha: float) -> tuple[Path, dict]:
    """A fresh workspace and an empty cache: a cold run."""
    import shutil

    from retrain.workspace import create_workspace, pipeline_env

    shutil.rmtree(workdir / "cache", ignore_errors=True)
    ws = create_workspace(workdir / "whole-ws", source=REPO)
    env = {**bench_env(workdir), **{k: v for k, v in pipeline_env(ws).items()
                                    if k == "PYTHONPATH"}}
    weights = str(REAL_WEIGHTS_BY_ALPHA[alpha].resolve()) if alpha in REAL_WEIGHTS_BY_ALPHA \
        else "none"
    set_params(ws, {**data_params, "model.weights": weights, "model.alpha": alpha,
                    "model.image_size": 224})
    git_commit(ws, env, "bench params")
    return ws, env


def data_params(args) -> tuple[dict, str]:
    """params for the chosen data, and how to describe it."""
    if args.data == "real":
        return ({"data.url": str(REAL_PHOTOS.resolve()), "data.sha256": sha256_of(REAL_PHOTOS)},
                "the 200 real flower photos (../shared)")
    counts = flower_class_counts(200 if args.quick else args.images)
    tarball = generated_tarball(args.workdir, counts, 224)
    return ({"data.url": str(tarball), "data.sha256": sha256_of(tarball)},
            f"{sum(counts):,} generated 224-px JPEGs (classes {', '.join(map(str, counts))})")


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
    def extra(parser):
        parser.add_argument("--data", choices=("generated", "real"), default="generated")
        parser.add_argument("--images", type=int, default=sum(FLOWER_COUNTS),
                            help="generated images in all")
        parser.add_argument("--alpha", type=float, choices=(0.35, 0.5, 1.0),
                            help="default: 0.35 where ../shared has its weights, else 1.0")

    args = parse_args(__doc__.splitlines()[0], argv, extra)
    if args.alpha is None:
        args.alpha = 0.35 if REAL_WEIGHTS_BY_ALPHA[0.35].is_file() else 1.0
    params, described = data_params(args)
    ws, env = make_workspace(args.workdir, params, args.alpha)
    results = {"data": described, "alpha": args.alpha, "workspace": str(ws),
               "command": "python bench/bench_whole.py " + " ".join(argv or sys.argv[1:])}
    load = load_average()
    run = timed_stages(dvc("repro"), ws, env)
    results["pipeline"] = {"command": "dvc repro", "wall_s": run["seconds"],
                           "cpu_s": run["cpu_seconds"], "stages": run["stages"],
                           "load_before": load, "load_after": run["load_average"]}
    results["notebook"] = measured([PYTHON, NOTEBOOK, "--workspace", ws, "--finetune"],
                                   ws, env)
    work = sum(run["stages"].get(stage, 0.0) for stage in NOTEBOOK_WORK)
    results["pipeline"]["notebook_work_wall_s"] = work
    notebook = results["notebook"]["wall_s"]
    results["ratios"] = {"notebook_work": notebook / work,
                         "all_stages": notebook / run["seconds"],
                         "all_stages_cpu": results["notebook"]["cpu_s"] / run["cpu_seconds"]}
    results["goals_met"] = {name: results["ratios"][name] >= goal
                            for name, goal in GOALS.items()}
    print(markdown(results))
    write_json(args.json, results)
    return results


def goals(r: dict) -> list[tuple]:
    """(label, result, target, met) rows for the goals table of results.md."""
    if not r:
        return [("cold run vs notebook way", "-", ">= 2.5x / 1.5x", None)]
    ratios, met = r["ratios"], r["goals_met"]
    return [(f"notebook / pipeline's notebook work, alpha {r['alpha']:g}",
             f"{ratios['notebook_work']:.2f}x", f">= {GOALS['notebook_work']:g}x",
             met["notebook_work"]),
            (f"notebook / all stages, alpha {r['alpha']:g}", f"{ratios['all_stages']:.2f}x",
             f">= {GOALS['all_stages']:g}x", met["all_stages"])]


def markdown(r: dict) -> str:
    p, n, ratios = r["pipeline"], r["notebook"], r["ratios"]
    return "\n".join([
        f"### Cold run against the notebook way: {r['data']}, alpha {r['alpha']:g}",
        "",
        f"Command: `{r['command']}`. MobileNetV2 alpha {r['alpha']:g}, default params (5 head "
        "epochs, 5 fine-tuning epochs from layer 135); a fresh workspace and an empty "
        "cache. CPU: user + system seconds of the process and its children.",
        "",
        "| side | wall | CPU | load average (1/5/15 min) before; after |",
        "|---|---|---|---|",
        f"| `dvc repro`, all stages | {p['wall_s']:.0f} s | {p['cpu_s']:.0f} s | "
        f"{p['load_before']}; {p['load_after']} |",
        f"| of it, the notebook's work ({', '.join(NOTEBOOK_WORK)}) | "
        f"{p['notebook_work_wall_s']:.0f} s | | |",
        f"| notebook way: `notebook_head.py --finetune` (train + validate only) | "
        f"{n['wall_s']:.0f} s | {n['cpu_s']:.0f} s | {n['load_before']}; "
        f"{n['load_after']} |",
        "",
        "| comparison | ratio | goal | |",
        "|---|---|---|---|",
        f"| notebook / the pipeline's notebook work, wall | **{ratios['notebook_work']:.2f}x** "
        f"| >= {GOALS['notebook_work']:g}x | {verdict(r['goals_met']['notebook_work'])} |",
        f"| notebook / all stages, wall | **{ratios['all_stages']:.2f}x** | "
        f">= {GOALS['all_stages']:g}x | {verdict(r['goals_met']['all_stages'])} |",
        f"| notebook / all stages, CPU | {ratios['all_stages_cpu']:.2f}x | | |",
        "",
        "Pipeline stages (wall s, from `Running stage` to the next): "
        + ", ".join(f"{name} {sec:.1f}" for name, sec in p["stages"].items()) + ".",
        "",
        f"Notebook run: {' '.join(n['output_tail'][-1:])}",
    ]) + "\n"


if __name__ == "__main__":
    main()
