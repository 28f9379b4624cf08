"""What a GPU machine gains: 200 real flower photos through every stage, next to a CPU run.

The real photos (`../shared/data/flower_photos_small.tgz`, 40 per class) and the real
MobileNetV2 alpha 0.35 ImageNet weights go through every stage of dvc.yaml in a scratch git +
DVC workspace (`dvc repro -s STAGE`, one stage at a time, timed with DVC's own overhead). It
prints the seconds per stage, extraction and fine-tuning images/s, the device, precision and
replicas fine-tuning ran with, and the test metrics with their 95% intervals, each next to
the CPU reference: the committed `bench/gpu_check_cpu.json` (a 2-core CPU), or a CPU pass
on this machine with `--cpu-pass` (GPUs hidden). About 1-2 minutes on a GPU machine, 3-5
on 2 CPU cores.

    python bench/gpu_check.py                       # this machine against the reference
    python bench/gpu_check.py --cpu-pass            # ... against a CPU pass run here too
    python bench/gpu_check.py --write-reference     # on a CPU machine: (re)write the reference
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import yaml
from common import (
    PYTHON,
    REAL_PHOTOS,
    REAL_WEIGHTS,
    REPO,
    bench_env,
    load_average,
    machine,
    parse_args,
    real_photo_params,
    set_params,
    timed_run,
    write_json,
)

REFERENCE = Path(__file__).resolve().parent / "gpu_check_cpu.json"
# Merged over params.yaml with the real photos and weights (`real_photo_params`): a few
# epochs (the first epoch of each fit pays for tracing, so fine-tuning throughput is read
# from the later ones).
CHECK_PARAMS = {
    "head": {"epochs": 5},
    "finetune": {"epochs": 3},
}
METRICS = ("test_accuracy", "macro_f1", "balanced_accuracy")


def extra_args(parser) -> None:
    parser.add_argument("--photos", type=Path, default=REAL_PHOTOS)
    parser.add_argument("--weights", type=Path, default=REAL_WEIGHTS)
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    parser.add_argument("--cpu-pass", action="store_true",
                        help="also run on this machine's CPU (GPUs hidden) and compare with it")
    parser.add_argument("--write-reference", action="store_true",
                        help="write this run's results to --reference")


def check_params(workspace: Path, photos: Path, weights: Path) -> None:
    """params.yaml of the scratch workspace: the repository's, with CHECK_PARAMS and the files."""
    set_params(workspace, {**CHECK_PARAMS, **real_photo_params(photos, weights)})


def run_pass(label: str, workdir: Path, photos: Path, weights: Path, hide_gpus: bool) -> dict:
    """Every stage once, from a fresh workspace and a fresh cache; the figures that compare."""
    from retrain.workspace import create_workspace

    workspace = workdir / f"workspace-{label}"
    if workspace.exists():
        shutil.rmtree(workspace)
    create_workspace(workspace, source=REPO)
    check_params(workspace, photos, weights)
    env = bench_env(workdir / f"cache-{label}")
    shutil.rmtree(env["RETRAIN_CACHE"], ignore_errors=True)  # converted models, image caches
    env["PYTHONPATH"] = str(workspace / "src")
    if hide_gpus:
        env["CUDA_VISIBLE_DEVICES"] = "-1"
    stages = list(yaml.safe_load((workspace / "dvc.yaml").read_text())["stages"])
    seconds = {}
    for stage in stages:  # dvc.yaml lists them in dependency order
        seconds[stage], _ = timed_run([PYTHON, "-m", "dvc", "repro", "-s", stage], workspace,
                                      env)
        print(f"  {label}: {stage:<11} {seconds[stage]:6.1f} s", flush=True)

    def read(name):
        return json.loads((workspace / "reports" / "details" / name).read_text())

    extract, finetune, evaluate = read("extract.json"), read("finetune.json"), read(
        "evaluate.json")
    return {
        "label": label,
        "stage_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "total_seconds": round(sum(seconds.values()), 1),
        "extract": {"engine": extract["engine"], "images": extract["images"],
                    "images_per_second": extract["images_per_second"]},
        "finetune": {key: finetune.get(key) for key in (
            "device", "precision", "replicas", "train_images_per_second", "val_accuracy")},
        "evaluate": {model: {key: evaluate[model].get(key) for key in (
            *METRICS, *(f"{m}_ci95" for m in METRICS))} for model in ("head", "finetuned")},
        "test_images": sum(c["support"] for c in evaluate["finetuned"]["per_class"].values()),
        "load_average_after": load_average(),  # other jobs on the machine slow every stage
    }


def side_by_side(run: dict, reference: dict) -> str:
    """The table printed at the end: this machine, the reference, and their ratio."""
    def ratio(a, b, faster_is_smaller=True):
        if not a or not b:
            return ""
        return f"{(b / a if faster_is_smaller else a / b):.2f}x"

    width = 28
    lines = [f"{'':<{width}} {'this run':>14} {'reference':>14} {'speed-up':>9}",
             f"{'machine':<{width}} {_machine(run)[:14]:>14} {_machine(reference)[:14]:>14}"]
    tune, ref_tune = run["finetune"], reference["finetune"]
    for key in ("device", "precision", "replicas"):
        lines.append(f"{'finetune ' + key:<{width}} {str(tune[key])[:14]:>14} "
                     f"{str(ref_tune[key])[:14]:>14}")
    for stage, seconds in run["stage_seconds"].items():
        other = reference["stage_seconds"].get(stage)
        lines.append(f"{stage + ' (s)':<{width}} {seconds:>14.1f} "
                     f"{other if other is not None else '-':>14} {ratio(seconds, other):>9}")
    lines.append(f"{'load average (1/5/15 min)':<{width}} "
                 f"{run.get('load_average_after', '?'):>14} "
                 f"{reference.get('load_average_after', '?'):>14}")
    lines.append(f"{'all stages (s)':<{width}} {run['total_seconds']:>14.1f} "
                 f"{reference['total_seconds']:>14.1f} "
                 f"{ratio(run['total_seconds'], reference['total_seconds']):>9}")
    for name, mine, theirs in (
            (f"extract images/s ({run['extract']['engine']})",
             run["extract"]["images_per_second"], reference["extract"]["images_per_second"]),
            ("fine-tuning images/s", tune["train_images_per_second"],
             ref_tune["train_images_per_second"])):
        lines.append(f"{name:<{width}} {mine:>14.1f} {theirs:>14.1f} "
                     f"{ratio(mine, theirs, faster_is_smaller=False):>9}")
    for model in ("head", "finetuned"):
        for metric in METRICS:
            mine, theirs = run["evaluate"][model], reference["evaluate"][model]
            lines.append(f"{model + ' ' + metric:<{width}} {_with_interval(mine, metric):>14} "
                         f"{_with_interval(theirs, metric):>14}")
    lines.append(f"(metrics on {run['test_images']} test images; [a, b]: their 95% bootstrap "
                 "interval from evaluate.json, a 95% confidence interval for the model's "
                 "metric on images like these; speed-up: reference time / this run's)")
    return "\n".join(lines)


def _machine(run: dict) -> str:
    gpu = run["machine"]["gpu"]
    return gpu if gpu not in ("none", "hidden") else f"CPU, {run['machine']['cores']} cores"


def _with_interval(metrics: dict, metric: str) -> str:
    value, interval = metrics.get(metric), metrics.get(f"{metric}_ci95")
    if value is None:
        return "-"
    if interval:
        return f"{value:.2f} [{interval[0]:.2f},{interval[1]:.2f}]"
    return f"{value:.3f}"


def main(argv=None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv, extra_args)
    for path, what in ((args.photos, "photos"), (args.weights, "weights")):
        if not path.exists():
            print(f"error: {path}: {what} not found (--{what} PATH)", file=sys.stderr)
            return 2
    sys.path.insert(0, str(REPO / "src"))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    start = time.perf_counter()
    this = {"machine": machine(), **run_pass("device", args.workdir, args.photos, args.weights,
                                             hide_gpus=False)}
    if args.cpu_pass:
        reference = {"machine": {**machine(), "gpu": "hidden"},
                     **run_pass("cpu", args.workdir, args.photos, args.weights, hide_gpus=True)}
    elif args.reference.exists():
        reference = json.loads(args.reference.read_text())
    else:
        reference = this
        print(f"note: no reference at {args.reference}: the table compares the run with itself")
    print(f"\ngpu check: {time.perf_counter() - start:.0f} s in all\n")
    print(side_by_side(this, reference))
    write_json(args.json, {"run": this, "reference": reference})
    if args.write_reference:
        write_json(args.reference, this)
        print(f"\nwrote {args.reference}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
