"""Fine-tuning: the cached path (frozen part under LiteRT once per view, upper part trained on
its outputs) against the full path (today's recipe: every layer on every image, every epoch).

- Wall and CPU time of a whole `dvc exp run -S head.dropout=0.4` (train_head, finetune,
  evaluate, render) with `finetune.path: full` and `auto`, each in its own copy of one
  workspace (so neither restores anything from the other's run-cache), on generated 224-px
  images with the flower set's class sizes, MobileNetV2 alpha 1.0, random weights (the same
  arithmetic as ImageNet weights), 5 fine-tuning epochs; the finetune stage's own time is
  read off the log (from `Running stage 'finetune'` to the next stage).
- Peak RSS of `stages/finetune.py` (cached path) at 10,000 generated images.
- Validation accuracy of both paths, 3 seeds each, on the 200 real flower photos with the
  MobileNetV2 alpha 0.35 ImageNet weights (`../shared`; skipped where absent).

    python bench/bench_finetune.py [--quick] [--images N] [--epochs N] [--rss-images N]
        [--rss-epochs N] [--parts exp,stage,rss,accuracy] [--order full,auto]
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import statistics
import subprocess
import tarfile
import time
from pathlib import Path

import yaml
from common import (
    FLOWER_COUNTS,
    PYTHON,
    REPO,
    SHARED,
    bench_env,
    extracted,
    generated_tarball,
    load_average,
    parse_args,
    sha256_of,
    timed_run,
    verdict,
    write_json,
)

GIB = 2**30
REAL_PHOTOS = SHARED / "data" / "flower_photos_small.tgz"
REAL_WEIGHTS = (SHARED / "weights"
                / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5")
PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
            "sys.exit(code)")


def run_stages_to_head(raw, scratch, env: dict) -> None:
    """split, extract and train_head in `scratch` (its params.yaml), as dvc.yaml runs them."""
    stage = REPO / "stages"
    for script, *rest in (
            ("split.py", "--raw", raw, "--out", "manifests", "--metrics", "metrics",
             "--details", "data-details.json"),
            ("extract.py", "--raw", raw, "--manifests", "manifests", "--out", "features",
             "--details", "extract.json"),
            ("train_head.py", "--features", "features", "--manifests", "manifests",
             "--model", "head.keras", "--live", "live-head", "--details", "head.json")):
        timed_run([PYTHON, stage / script, *rest], scratch, env)


def git_commit(ws: Path, env: dict, message: str) -> None:
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run(["git", "add", "-A"], cwd=ws, env=env, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", message], cwd=ws, env=env,
                   check=True)


def edit_params(path: Path, **changes) -> dict:
    params = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        *sections, key = dotted.split("__")
        node = params
        for section in sections:
            node = node[section]
        node[key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def timed_stages(cmd: list, cwd: Path, env: dict) -> dict:
    """Run `cmd`, timestamping each `Running stage` line: total wall and CPU seconds (the
    command and its children) and each stage's wall seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    marks, lines = [], []
    with subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        for line in proc.stdout:
            lines.append(line)
            found = re.match(r"Running stage '([\w-]+)'", line)
            if found:
                marks.append((found.group(1), time.perf_counter() - start))
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n" + "".join(lines)[-4000:])
    stages = {name: (marks[i + 1][1] if i + 1 < len(marks) else seconds) - at
              for i, (name, at) in enumerate(marks)}
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"seconds": seconds, "cpu_seconds": cpu, "stages": stages,
            "load_average": load_average()}


def stage_runs(args, env: dict) -> dict:
    """CPU and wall seconds of `stages/finetune.py` alone, full and cached interleaved
    (full, cached, cached, full), in the workspace `experiment_runs` prepared: CPU seconds
    hold still when other jobs load the cores, wall seconds do not."""
    base = args.workdir / "finetune-ws"
    env = {**env, "PYTHONPATH": str(base / "src")}
    cmd = [PYTHON, "stages/finetune.py", "--raw", "data/raw", "--manifests", "data/manifests",
           "--head", "models/head.keras", "--head-details", "reports/details/head.json",
           "--model", "bench-model.keras", "--serving", "bench-serving",
           "--replicates", "bench-replicates",
           "--live", "bench-live", "--details", "bench-finetune.json"]
    runs = {"full": [], "auto": []}
    for path in ("full", "auto", "auto", "full"):
        edit_params(base / "params.yaml", finetune__path=path)
        forget_decoded_images(args.workdir)
        run = timed_stages(cmd, base, env)
        run["metrics"] = json.loads((base / "bench-finetune.json").read_text())
        runs[path].append(run)
    edit_params(base / "params.yaml", finetune__path="full")
    return {name: {"cpu_seconds": [r["cpu_seconds"] for r in rs],
                   "seconds": [r["seconds"] for r in rs],
                   "train_images_per_second": [r["metrics"]["train_images_per_second"]
                                               for r in rs],
                   "load_average": [r["load_average"] for r in rs]}
            for name, rs in runs.items()}


def experiment_runs(args, env: dict) -> dict:
    from retrain.workspace import create_workspace, pipeline_env

    counts = [c // 10 for c in FLOWER_COUNTS] if args.quick else \
        [round(c * args.images / sum(FLOWER_COUNTS)) for c in FLOWER_COUNTS]
    tarball = generated_tarball(args.workdir, counts, 224)
    base = create_workspace(args.workdir / "finetune-ws", source=REPO)
    env = {**env, "PYTHONPATH": pipeline_env(base)["PYTHONPATH"]}
    params = edit_params(base / "params.yaml", data__url=str(tarball),
                         data__sha256=sha256_of(tarball), model__weights="none",
                         model__image_size=224, model__alpha=1.0,
                         finetune__epochs=args.epochs, finetune__path="full")
    git_commit(base, env, "bench params")
    timed_run([PYTHON, "-m", "dvc", "repro", "train_head"], base, env)
    git_commit(base, env, "features and head")
    runs = {}
    for path in args.order.split(","):  # each in a copy: no run-cache shared between them
        ws = base.with_name(f"finetune-ws-{path}")
        shutil.rmtree(ws, ignore_errors=True)
        shutil.copytree(base, ws, symlinks=True)
        ws_env = {**env, "PYTHONPATH": str(ws / "src")}
        forget_decoded_images(args.workdir)  # both runs decode their images once
        runs[path] = timed_stages([PYTHON, "-m", "dvc", "exp", "run", "-S", "head.dropout=0.4",
                                   "-S", f"finetune.path={path}"], ws, ws_env)
        runs[path]["metrics"] = json.loads(
            (ws / "reports" / "details" / "finetune.json").read_text())
    return {"images": sum(counts), "epochs": args.epochs, "model": params["model"],
            "runs": runs}


def peak_rss(args, env: dict) -> dict:
    """Peak RSS of the finetune stage, cached path, at `args.rss_images` generated images."""
    images = 1000 if args.quick else args.rss_images
    classes = 10
    tarball = generated_tarball(args.workdir, [images // classes] * classes, 64, seed=1)
    raw = extracted(tarball)
    scratch = args.workdir / f"finetune-rss-{images}"
    scratch.mkdir(parents=True, exist_ok=True)
    edit_params_from(REPO / "params.yaml", scratch / "params.yaml", model__weights="none",
                     model__image_size=224, model__alpha=1.0,
                     finetune__epochs=args.rss_epochs)
    stage = REPO / "stages"
    if not (scratch / "head.keras").exists():
        run_stages_to_head(raw, scratch, env)
    forget_decoded_images(args.workdir)  # the worst case: the first run decodes them all
    seconds, out = timed_run(
        [PYTHON, "-c", PEAK_RSS, PYTHON, stage / "finetune.py", "--raw", raw,
         "--manifests", "manifests", "--head", "head.keras", "--head-details", "head.json",
         "--model", "model.keras", "--serving", "serving", "--replicates", "replicates",
         "--live", "live-finetune",
         "--details", "finetune.json"], scratch, env)
    peak = int(re.search(r"PEAK_RSS_KB (\d+)", out).group(1)) * 1024
    metrics = json.loads((scratch / "finetune.json").read_text())
    return {"images": images, "epochs": args.rss_epochs, "peak_rss_bytes": peak,
            "seconds": seconds, "path": metrics["path"], "kept_mb": metrics.get("kept_mb"),
            "goal": peak < 2 * GIB}


def forget_decoded_images(workdir: Path) -> None:
    """Empty the decoded-image cache of the benchmark's cache folder (`bench_env`)."""
    shutil.rmtree(workdir / "cache" / "images", ignore_errors=True)


def edit_params_from(source: Path, dest: Path, **changes) -> dict:
    shutil.copy(source, dest)
    return edit_params(dest, **changes)


def accuracy_runs(args, env: dict) -> dict | None:
    """Validation accuracy of both paths on the real photos, per seed (both paths share the
    seed's split, features and head: a paired comparison)."""
    if not (REAL_PHOTOS.exists() and REAL_WEIGHTS.exists()):
        return None
    raw = args.workdir / "real-photos"
    if not raw.exists():
        tmp = raw.with_name(".tmp-real-photos")
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(REAL_PHOTOS) as tar:
            tar.extractall(tmp, filter="data")
        tmp.rename(raw)
    stage = REPO / "stages"
    rows = []
    for seed in args.seeds:
        scratch = args.workdir / f"finetune-real-seed{seed}"
        scratch.mkdir(parents=True, exist_ok=True)
        edit_params_from(REPO / "params.yaml", scratch / "params.yaml", seed=seed,
                         model__weights=str(REAL_WEIGHTS), model__image_size=224,
                         model__alpha=0.35)
        run_stages_to_head(raw, scratch, env)
        row = {"seed": seed}
        for path in ("full", "auto"):
            edit_params(scratch / "params.yaml", finetune__path=path)
            seconds, _ = timed_run(
                [PYTHON, stage / "finetune.py", "--raw", raw, "--manifests", "manifests",
                 "--head", "head.keras", "--head-details", "head.json",
                 "--model", f"model-{path}.keras", "--serving", f"serving-{path}",
                 "--replicates", f"replicates-{path}",
                 "--live", f"live-{path}", "--details", f"finetune-{path}.json"], scratch, env)
            metrics = json.loads((scratch / f"finetune-{path}.json").read_text())
            row[path] = {"val_accuracy": metrics["val_accuracy"], "path": metrics["path"],
                         "seconds": seconds, "epochs": metrics["epochs_run"]}
        rows.append(row)
    full = [r["full"]["val_accuracy"] for r in rows]
    cached = [r["auto"]["val_accuracy"] for r in rows]
    spread = max(full) - min(full)
    return {"seeds": rows, "full_mean": statistics.mean(full), "cached_mean":
            statistics.mean(cached), "full_range": spread,
            "goal": abs(statistics.mean(cached) - statistics.mean(full)) <= max(spread, 1e-9)
            or max(abs(a - b) for a, b in zip(full, cached)) == 0}


def main(argv=None) -> dict:
    def options(parser):
        parser.add_argument("--images", type=int, default=sum(FLOWER_COUNTS))
        parser.add_argument("--epochs", type=int, default=5)
        parser.add_argument("--rss-images", type=int, default=10000)
        parser.add_argument("--rss-epochs", type=int, default=1)
        parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        parser.add_argument("--parts", default="exp,stage,rss,accuracy")
        parser.add_argument("--order", default="full,auto",
                            help="which path's experiment runs first (load drifts)")

    args = parse_args(__doc__.splitlines()[0], argv, options)
    if args.quick:
        args.epochs, args.rss_epochs = 2, 1
    env = bench_env(args.workdir)
    parts = args.parts.split(",")
    results = {"load_average_before": load_average(), "command": "python bench/"
               "bench_finetune.py " + " ".join(argv if argv is not None else
                                               __import__("sys").argv[1:])}
    if "exp" in parts:
        results["experiments"] = [experiment_runs(args, env)]
        write_json(args.json, results)
    if "stage" in parts:
        results["stage"] = stage_runs(args, env)
        write_json(args.json, results)
    if "rss" in parts:
        results["rss"] = peak_rss(args, env)
        write_json(args.json, results)
    if "accuracy" in parts:
        results["accuracy"] = accuracy_runs(args, env)
    results["load_average_after"] = load_average()
    print(markdown(results))
    write_json(args.json, results)
    return results


def ratios(r: dict) -> dict:
    full, auto = r["runs"]["full"], r["runs"]["auto"]
    return {"stage": full["stages"]["finetune"] / auto["stages"]["finetune"],
            "experiment": full["seconds"] / auto["seconds"],
            "experiment_cpu": full["cpu_seconds"] / auto["cpu_seconds"]}


def stage_ratios(stage: dict) -> dict:
    full, auto = stage["full"], stage["auto"]
    return {key: statistics.mean(full[field]) / statistics.mean(auto[field])
            for key, field in (("cpu", "cpu_seconds"), ("wall", "seconds"))}


def experiments(r: dict) -> list[dict]:
    """Every round of the experiment comparison (one per `--order`), in the results."""
    return r.get("experiments") or ([r["experiment"]] if r.get("experiment") else [])


def mean_ratios(r: dict) -> dict:
    rounds = [ratios(exp) for exp in experiments(r)]
    return {key: statistics.mean(x[key] for x in rounds) for key in rounds[0]} if rounds \
        else {}


def goals(r: dict) -> list[tuple]:
    """(label, result, target, met) rows for the goals table of results.md."""
    ratio, rss, acc = mean_ratios(r), r.get("rss"), r.get("accuracy")
    stage = stage_ratios(r["stage"]) if r.get("stage") else None
    return [
        ("finetune stage alone, full path / cached path",
         f"{stage['wall']:.2f}x wall, {stage['cpu']:.2f}x CPU" if stage else "-", ">= 2.5x",
         stage and stage["wall"] >= 2.5),
        ("`dvc exp run -S head.dropout=0.4`, full / cached",
         f"{ratio['experiment']:.2f}x" if ratio else "-", ">= 2x",
         ratio and ratio["experiment"] >= 2),
        (f"finetune peak RSS at {rss['images']:,} images" if rss else "finetune peak RSS",
         f"{rss['peak_rss_bytes'] / 2**20:.0f} MiB" if rss else "-", "< 2 GiB",
         rss and rss["goal"]),
        ("cached path validation accuracy (real photos, 3 seeds)",
         f"{acc['cached_mean']:.3f} vs full {acc['full_mean']:.3f}" if acc else "-",
         "within the full path's seed spread", acc and acc["goal"]),
    ]


def markdown(r: dict) -> str:
    lines = ["## Fine-tuning: cached path against the full path", "",
             f"Command: `{r['command']}`. Load average before: {r['load_average_before']}; "
             f"after: {r.get('load_average_after', '-')}.", ""]
    rounds = experiments(r)
    if rounds:
        exp, m = rounds[0], rounds[0]["model"]
        lines += [
            f"`dvc exp run -S head.dropout=0.4 -S finetune.path=full|auto`, each in its own "
            f"copy of one workspace: {exp['images']:,} generated JPEGs at 224 px, "
            f"{m['backbone']} alpha {m['alpha']}, random weights, {exp['epochs']} fine-tuning "
            "epochs, from_layer 135; the decoded-image cache emptied before each run. Stage "
            "times are read off the log (from `Running stage` to the next stage); CPU "
            "seconds are the run's and its children's. One round per order of the two runs "
            "(other jobs share the cores, and their load drifts).",
            "",
            "| round | run | finetune stage | whole experiment | CPU seconds | load after |",
            "|---|---|---|---|---|---|",
        ]
        for number, exp in enumerate(rounds, 1):
            order = " then ".join(exp["runs"])
            lines += [f"| {number} ({order}) | `finetune.path: {name}` "
                      f"({run['metrics']['path']}) | {run['stages']['finetune']:.0f} s | "
                      f"{run['seconds']:.0f} s | {run['cpu_seconds']:.0f} | "
                      f"{run['load_average']} |" for name, run in exp["runs"].items()]
        ratio = mean_ratios(r)
        each = [ratios(exp) for exp in rounds]
        stage_rounds = ", ".join(f"{x['stage']:.2f}" for x in each)
        experiment_rounds = ", ".join(f"{x['experiment']:.2f}" for x in each)
        lines += [
            "",
            "| comparison | ratio (mean of rounds) | rounds | goal | |",
            "|---|---|---|---|---|",
            f"| finetune stage, full / cached | **{ratio['stage']:.2f}x** | "
            f"{stage_rounds} | >= 2.5x | "
            f"{verdict(ratio['stage'] >= 2.5)} |",
            f"| whole `dvc exp run -S head.dropout=0.4`, full / cached | "
            f"**{ratio['experiment']:.2f}x** (CPU {ratio['experiment_cpu']:.2f}x) | "
            f"{experiment_rounds} | >= 2x | "
            f"{verdict(ratio['experiment'] >= 2)} |",
            "",
            "Per stage (s): " + "; ".join(
                f"round {number} {name}: " + ", ".join(
                    f"{stage} {t:.0f}" for stage, t in run["stages"].items())
                for number, exp in enumerate(rounds, 1) for name, run in exp["runs"].items())
            + ".",
            "",
        ]
    stage = r.get("stage")
    if stage:
        full, auto = stage["full"], stage["auto"]
        cpu, wall = stage_ratios(stage)["cpu"], stage_ratios(stage)["wall"]
        lines += [
            "`stages/finetune.py` alone in the same workspace, interleaved full, cached, "
            "cached, full (decoded-image cache emptied before each):",
            "",
            "| path | CPU seconds | wall seconds | training images/s | load after |",
            "|---|---|---|---|---|",
            *(f"| {name} | {', '.join(f'{x:.0f}' for x in run['cpu_seconds'])} | "
              f"{', '.join(f'{x:.0f}' for x in run['seconds'])} | "
              f"{', '.join(str(x) for x in run['train_images_per_second'])} | "
              f"{'; '.join(run['load_average'])} |"
              for name, run in (("full", full), ("cached", auto))),
            "",
            f"Full / cached: **{cpu:.2f}x** in CPU seconds, {wall:.2f}x in wall seconds "
            "(means of the two runs each).",
            "",
        ]
    rss = r.get("rss")
    if rss:
        lines += [
            f"Peak RSS of `stages/finetune.py` ({rss['path']} path) at {rss['images']:,} "
            f"generated images (64 px JPEGs resized to 224), {rss['epochs']} epoch(s): "
            f"**{rss['peak_rss_bytes'] / 2**20:.0f} MiB** in {rss['seconds']:.0f} s "
            f"(kept outputs {rss['kept_mb']:.0f} MB); goal < 2 GiB: {verdict(rss['goal'])}. "
            "The run decodes all images into the cache first (the worst case). Memory does "
            "not grow with epochs: training views stream, and the kept validation outputs "
            "are written in the first epoch and read back with positioned reads.",
            "",
        ]
    acc = r.get("accuracy")
    if acc:
        lines += [
            "Validation accuracy on the 200 real flower photos (MobileNetV2 alpha 0.35 "
            "ImageNet weights, 224 px, default recipe); per seed, both paths share the split, "
            "features and head:",
            "",
            "| seed | full path | cached path | difference |",
            "|---|---|---|---|",
            *(f"| {row['seed']} | {row['full']['val_accuracy']:.4f} | "
              f"{row['auto']['val_accuracy']:.4f} | "
              f"{row['auto']['val_accuracy'] - row['full']['val_accuracy']:+.4f} |"
              for row in acc["seeds"]),
            "",
            f"Means: full {acc['full_mean']:.4f}, cached {acc['cached_mean']:.4f}; the full "
            f"path's seed-to-seed range is {acc['full_range']:.4f} (3 seeds: a range, not an "
            f"interval). Cached within the full path's seed-to-seed spread: "
            f"{verdict(acc['goal'])}.",
            "",
        ]
    elif "accuracy" in r:
        lines += ["Accuracy on real photos: not run (../shared absent).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
