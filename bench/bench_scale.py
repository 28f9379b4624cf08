"""Cost per image from 3,670 to 100,000 images: every stage's wall and CPU seconds, images/s
and peak RSS, the disk the workspace and DVC's cache take, a no-op `dvc repro` and a
head-only `dvc exp run`.

Generated JPEGs of a realistic size (400 x 400 px, about the flower photos' 320-500 px), in
the flower set's class proportions; MobileNetV2 alpha 0.35 at 224 px with the real ImageNet
weights file from ../shared when it is there (random weights otherwise: the same arithmetic);
every other param at its default. Each stage runs as `dvc repro --single-item <stage>` under
GNU time: wall, user + system CPU, and the peak RSS of the largest process (the stage).

    python bench/bench_scale.py --images 3670 36700 [--through evaluate] [--set finetune.epochs=1]
                                [--no-exp-run]

Goals at 100,000 images: no-op `dvc repro` <= 3 s, workspace + cache <= 1.2x (images +
features), every stage's peak RSS < 4 GiB, cost per image flat.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from common import (
    PYTHON,
    REAL_WEIGHTS,
    REPO,
    bench_env,
    flower_class_counts,
    generated_tarball,
    load_average,
    median,
    parse_args,
    set_params,
    sha256_of,
    timed_run,
    write_json,
)

STAGES = ["fetch", "split", "extract", "train_head", "crossval", "audit", "finetune",
          "evaluate", "export", "card", "render"]
IMAGE_PX = 400


def du_bytes(*paths: Path) -> int:
    """Bytes on disk under `paths`, a hard-linked file counted once (one `du` call)."""
    done = subprocess.run(["du", "-scb", *map(str, paths)], capture_output=True, text=True,
                          check=True)
    return int(done.stdout.splitlines()[-1].split()[0])


def timed_stage(stage: str, ws: Path, env: dict) -> dict:
    """`dvc repro --single-item stage` under GNU time."""
    stats = ws / ".time.txt"
    seconds, output = timed_run(["/usr/bin/time", "-o", stats, "-f", "%e %U %S %M", PYTHON,
                                 "-m", "dvc", "repro", "--single-item", stage], ws, env)
    wall, user, system, rss_kib = stats.read_text().split()[-4:]
    return {"wall_s": float(wall), "cpu_s": float(user) + float(system),
            "peak_rss_mib": int(rss_kib) / 1024, "ran": f"Running stage '{stage}'" in output}


def make_workspace(workdir: Path, total: int, overrides: dict) -> tuple[Path, Path]:
    from retrain.workspace import create_workspace

    tarball = generated_tarball(workdir, flower_class_counts(total), IMAGE_PX)
    ws = workdir / f"scale-{total}"
    if ws.exists():
        shutil.rmtree(ws)
    create_workspace(ws, source=REPO)
    model = ({"model.weights": str(REAL_WEIGHTS), "model.alpha": 0.35} if REAL_WEIGHTS.exists()
             else {"model.weights": "none", "model.alpha": 0.35})
    set_params(ws, {"data.url": str(tarball), "data.sha256": sha256_of(tarball),
                    "model.backbone": "mobilenet_v2", "model.image_size": 224, **model,
                    **overrides})
    return ws, tarball


def run_size(args, total: int, env: dict) -> dict:
    ws, tarball = make_workspace(args.workdir, total, dict(args.set))
    result = {"images": total, "archive_bytes": tarball.stat().st_size,
              "load_before": load_average(), "stages": {}}
    for stage in STAGES[:STAGES.index(args.through) + 1]:
        result["stages"][stage] = timed_stage(stage, ws, env)
        print(f"{total} images: {stage} {result['stages'][stage]}", flush=True)
    layout = json.loads((ws / "data" / "layout.json").read_text())["content"]
    features = ws / "data" / "features"
    result["disk"] = {
        "images_bytes": layout["bytes"],
        "features_bytes": du_bytes(features) if features.exists() else 0,
        "workspace_and_cache_bytes": du_bytes(ws),
        "cache_bytes": du_bytes(ws / ".dvc" / "cache"),
    }
    subprocess.run(["git", "add", "-A"], cwd=ws, env=env, check=True)
    subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@localhost", "commit", "-qm",
                    "run"], cwd=ws, env=env, check=True)
    noop = [timed_run([PYTHON, "-m", "dvc", "repro", args.through], ws, env)[0]
            for _ in range(3)]
    result["noop_repro_s"] = {"median": median(noop), "runs": noop}
    if args.exp_run and args.through in STAGES[STAGES.index("evaluate"):]:
        seconds, _ = timed_run([PYTHON, "-m", "dvc", "exp", "run", "-S", "head.dropout=0.4"],
                               ws, env)
        result["head_only_exp_s"] = seconds
    result["load_after"] = load_average()
    return result


def markdown(results: list[dict]) -> str:
    lines = ["| images | stage | wall s | CPU s | images/s (wall) | CPU ms per image | "
             "peak RSS MiB |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for stage, s in r["stages"].items():
            lines.append(f"| {r['images']:,} | {stage} | {s['wall_s']:.1f} | {s['cpu_s']:.1f} | "
                         f"{r['images'] / s['wall_s']:.0f} | "
                         f"{1000 * s['cpu_s'] / r['images']:.2f} | {s['peak_rss_mib']:.0f} |")
    lines += ["", "| images | no-op `dvc repro` (median of 3) | head-only `dvc exp run` | "
              "images | features | workspace + DVC cache | ratio to images + features | "
              "load before / after |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        d = r["disk"]
        data = d["images_bytes"] + d["features_bytes"]
        exp = f"{r['head_only_exp_s']:.1f} s" if "head_only_exp_s" in r else "not run"
        lines.append(f"| {r['images']:,} | {r['noop_repro_s']['median']:.2f} s | {exp} | "
                     f"{d['images_bytes'] / 1e6:,.0f} MB | {d['features_bytes'] / 1e6:,.0f} MB | "
                     f"{d['workspace_and_cache_bytes'] / 1e6:,.0f} MB | "
                     f"{d['workspace_and_cache_bytes'] / data:.2f}x | "
                     f"{r['load_before']} / {r['load_after']} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    def extra(parser):
        parser.add_argument("--images", type=int, nargs="+", default=[3670, 36700])
        parser.add_argument("--through", default="render", choices=STAGES,
                            help="last stage to run")
        parser.add_argument("--set", action="append", default=[],
                            type=lambda kv: (kv.split("=", 1)[0], json.loads(kv.split("=", 1)[1])),
                            help="a param override, key=JSON value (finetune.epochs=1)")
        parser.add_argument("--no-exp-run", dest="exp_run", action="store_false",
                            help="skip the head-only `dvc exp run` (it re-runs every stage "
                                 "after extract: as long again at 100,000 images)")

    args = parse_args(__doc__.splitlines()[0], argv, extra)
    env = bench_env(args.workdir)
    results = [run_size(args, total, env) for total in args.images]
    print(markdown(results))
    write_json(args.json, {"results": results})
    return results


if __name__ == "__main__":
    main()
