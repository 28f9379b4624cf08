"""The pipeline on a generated 3,670-image set at 224 px, in a scratch git + DVC workspace:

- wall time of a head-only experiment (`dvc exp run -S head.learning_rate=... train_head`,
  features cached) against training the same head the notebook way (frozen base inside
  `model.fit` on the images, same epochs): goal >= 20x faster;
- a no-op `dvc repro` (goal <= 3 s), next to a plain `dvc status`.

The workspace is a copy of dvc.yaml, params.yaml, stages/ and src/ (`retrain.workspace`),
with `data.url` pointing at the generated tarball and `model.weights: none`.

    python bench/bench_pipeline.py [--quick]
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from common import (
    FLOWER_COUNTS,
    PYTHON,
    REPO,
    bench_env,
    generated_tarball,
    load_average,
    median,
    parse_args,
    sha256_of,
    timed_run,
    verdict,
    write_json,
)

NOTEBOOK = Path(__file__).resolve().parent / "notebook_head.py"


def dvc(*args) -> list:
    return [PYTHON, "-m", "dvc", *args]


def git_commit(ws: Path, env: dict, message: str) -> None:
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run(["git", "add", "-A"], cwd=ws, env=env, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", message], cwd=ws, env=env,
                   check=True)


def make_workspace(workdir: Path, counts: list[int], epochs: int | None) -> tuple[Path, dict]:
    from retrain.workspace import create_workspace, pipeline_env

    tarball = generated_tarball(workdir, counts, 224)
    ws = create_workspace(workdir / "pipeline-ws", source=REPO)
    env = {**bench_env(workdir), **{k: v for k, v in pipeline_env(ws).items()
                                    if k == "PYTHONPATH"}}
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["data"]["url"] = str(tarball)
    params["data"]["sha256"] = sha256_of(tarball)
    params["model"].update(weights="none", image_size=224)
    params["finetune"]["epochs"] = 1  # only needed once, for the no-op measurement
    if epochs:
        params["head"]["epochs"] = epochs
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_commit(ws, env, "bench params")
    return ws, env


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv)
    counts = [c // 10 for c in FLOWER_COUNTS] if args.quick else FLOWER_COUNTS
    ws, env = make_workspace(args.workdir, counts, epochs=2 if args.quick else None)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    results = {"images": sum(counts), "image_size": 224, "model": params["model"],
               "head_epochs": params["head"]["epochs"], "workspace": str(ws)}

    # First run, every stage (untimed goal; reported for context).
    scope = []  # whole pipeline
    try:
        seconds, _ = timed_run(dvc("repro"), ws, env)
        results["first_repro"] = {"target": "all stages", "seconds": seconds}
    except RuntimeError as exc:
        # A later stage may be unfinished; the measurements below need only train_head.
        results["first_repro_error"] = str(exc).splitlines()[0]
        results["first_repro_log_tail"] = str(exc)[-1500:]
        scope = ["train_head"]
        seconds, _ = timed_run(dvc("repro", *scope), ws, env)
        results["first_repro"] = {"target": "fetch..train_head", "seconds": seconds}
    extract_metrics = yaml.safe_load((ws / "reports" / "details" / "extract.json").read_text())
    results["extract_images_per_second"] = extract_metrics.get("images_per_second")
    results["extract_engine"] = extract_metrics.get("engine")
    git_commit(ws, env, "first run")

    # No-op repro and status.
    repro, status = [], []
    for _ in range(3 if args.quick else 5):
        seconds, out = timed_run(dvc("repro", *scope), ws, env)
        repro.append(seconds)
        seconds, status_out = timed_run(dvc("status"), ws, env)
        status.append(seconds)
    results["noop_repro"] = {"target": "all stages" if not scope else "fetch..train_head",
                             "seconds": repro, "median": median(repro),
                             "output_tail": out.strip().splitlines()[-1:],
                             "status_output": status_out.strip().splitlines()[-1:]}
    results["status"] = {"seconds": status, "median": median(status)}
    results["goal_noop"] = median(repro) <= 3.0

    # Head-only experiments, features cached, back to back with the notebook way.
    experiments = []
    for rate in ("0.002", "0.0005"):
        seconds, out = timed_run(dvc("exp", "run", "-S", f"head.learning_rate={rate}",
                                     "train_head"), ws, env)
        ran = [line.split("'")[1] for line in out.splitlines()
               if line.startswith("Running stage") and line.count("'") >= 2]
        experiments.append({"learning_rate": rate, "seconds": seconds, "stages_run": ran})
    results["head_experiments"] = experiments
    seconds, out = timed_run([PYTHON, NOTEBOOK, "--workspace", ws], ws, env)
    results["notebook"] = {"seconds": seconds, "summary": out.strip().splitlines()[-1]}
    head_s = median(e["seconds"] for e in experiments)
    results["ratio"] = seconds / head_s
    results["goal_ratio"] = results["ratio"] >= 20
    results["load_average"] = load_average()
    print(markdown(results))
    write_json(args.json, results)
    return results


def markdown(r: dict) -> str:
    experiments = r["head_experiments"]
    head_s = median(e["seconds"] for e in experiments)
    stages = sorted({s for e in experiments for s in e["stages_run"]})
    noop, status = r["noop_repro"], r["status"]
    lines = [
        "## Head-only experiment against the notebook way",
        "",
        f"{r['images']} generated JPEGs at {r['image_size']} px (the flower set's class "
        f"sizes), {r['model']['backbone']} alpha {r['model']['alpha']}, random weights, "
        f"{r['head_epochs']} head epochs; scratch git + DVC workspace. First `dvc repro` "
        f"({r['first_repro']['target']}): {r['first_repro']['seconds']:.0f} s, extraction "
        f"at {r['extract_images_per_second']} images/s ({r['extract_engine']}). Load average "
        f"at the end: {r['load_average']}.",
        "",
        "| run | wall time |",
        "|---|---|",
        *(f"| `dvc exp run -S head.learning_rate={e['learning_rate']} train_head` | "
          f"{e['seconds']:.1f} s |" for e in experiments),
        f"| notebook way: frozen base inside `model.fit` on the images | "
        f"{r['notebook']['seconds']:.1f} s |",
        "",
        f"Stages the experiments ran: {', '.join(stages) or 'none'}. Notebook run: "
        f"{r['notebook']['summary']}",
        "",
        "| comparison | ratio | goal | |",
        "|---|---|---|---|",
        f"| notebook / head-only experiment (median {head_s:.1f} s) | "
        f"**{r['ratio']:.1f}x** | >= 20x | {verdict(r['goal_ratio'])} |",
        "",
        "## No-op `dvc repro`",
        "",
        f"Same workspace, nothing changed ({noop['target']}); "
        f"{len(noop['seconds'])} runs each.",
        "",
        "| command | median | runs | goal | |",
        "|---|---|---|---|---|",
        f"| `dvc repro` | **{noop['median']:.2f} s** | "
        f"{', '.join(f'{s:.2f}' for s in noop['seconds'])} | <= 3 s | "
        f"{verdict(r['goal_noop'])} |",
        f"| `dvc status` | {status['median']:.2f} s | "
        f"{', '.join(f'{s:.2f}' for s in status['seconds'])} | | |",
    ]
    if "first_repro_error" in r:
        lines += ["", f"Note: the full `dvc repro` failed ({r['first_repro_error']}), so the "
                  "no-op was measured on fetch..train_head."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
