"""Peak memory (RSS) of the extract stage at 1,000 and 10,000 images.

Goal: peak RSS at 10,000 images <= 1.2x that at 1,000, and under 2 GiB. Runs
stages/extract.py as a subprocess (after stages/split.py made the manifests) on generated
small JPEGs, resized to 224 by the loader, and reads the child's peak RSS with
`getrusage(RUSAGE_CHILDREN)` in a fresh wrapper process per measurement.

    python bench/bench_memory.py [--quick]
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from common import (
    MODEL,
    PYTHON,
    REPO,
    bench_env,
    extracted,
    generated_tarball,
    load_average,
    parse_args,
    timed_run,
    verdict,
    write_json,
)

# Runs argv[1:] and prints the peak RSS of that child (Linux: kilobytes).
PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
            "sys.exit(code)")
GIB = 2**30


def measure(workdir: Path, images: int, env: dict) -> dict:
    classes = 10
    tarball = generated_tarball(workdir, [images // classes] * classes, 64, seed=1)
    raw = extracted(tarball)
    scratch = workdir / f"memory-{images}"
    scratch.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"].update(MODEL)
    (scratch / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    manifests = scratch / "manifests"
    if not (manifests / "train.csv").exists():
        timed_run([PYTHON, REPO / "stages" / "split.py", "--raw", raw, "--out", manifests,
                   "--metrics", scratch / "metrics", "--details", scratch / "details.json"],
                  scratch, env)
    seconds, out = timed_run(
        [PYTHON, "-c", PEAK_RSS, PYTHON, REPO / "stages" / "extract.py", "--raw", raw,
         "--manifests", manifests, "--out", scratch / "features",
         "--details", scratch / "extract.json"], scratch, env)
    peak_kb = int(re.search(r"PEAK_RSS_KB (\d+)", out).group(1))
    metrics = json.loads((scratch / "extract.json").read_text())
    return {"images": images, "peak_rss_bytes": peak_kb * 1024, "seconds": seconds,
            "images_per_second": metrics["images_per_second"], "engine": metrics["engine"]}


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv)
    env = bench_env(args.workdir)
    sizes = (200, 2000) if args.quick else (1000, 10000)
    # A first run converts the model to LiteRT (cached afterwards): measured, reported, and
    # kept out of the comparison, which is about images, not the one-off conversion.
    for old in (args.workdir / "cache" / "litert").glob("*.tflite"):
        old.unlink()
    cold = measure(args.workdir, sizes[0], env)
    runs = [measure(args.workdir, n, env) for n in sizes]
    small, large = runs
    ratio = large["peak_rss_bytes"] / small["peak_rss_bytes"]
    results = {"runs": runs, "cold": cold, "ratio": ratio, "model": MODEL,
               "load_average": load_average(),
               "goal": ratio <= 1.2 and max(r["peak_rss_bytes"] for r in runs) < 2 * GIB}
    print(markdown(results))
    write_json(args.json, results)
    return results


def markdown(r: dict) -> str:
    lines = [
        "## Peak memory of `extract`",
        "",
        f"`stages/extract.py` as a subprocess on generated 64 px JPEGs resized to "
        f"{r['model']['image_size']} ({r['model']['backbone']}, random weights, all three "
        "splits); peak RSS of the child from `getrusage(RUSAGE_CHILDREN)`.",
        "",
        "| images | peak RSS | wall time | images/s | engine |",
        "|---|---|---|---|---|",
        *(f"| {x['images']:,} | {x['peak_rss_bytes'] / 2**20:.0f} MiB | {x['seconds']:.0f} s | "
          f"{x['images_per_second']} | {x['engine']} |" for x in r["runs"]),
        "",
        "| comparison | ratio | goal | |",
        "|---|---|---|---|",
        f"| peak RSS, {r['runs'][1]['images']:,} / {r['runs'][0]['images']:,} images | "
        f"**{r['ratio']:.2f}** | <= 1.2 and < 2 GiB | {verdict(r['goal'])} |",
        "",
        f"Both runs found the LiteRT model in the cache. The first run of all, which converted "
        f"it, peaked at {r['cold']['peak_rss_bytes'] / 2**20:.0f} MiB "
        f"({r['cold']['images']:,} images, {r['cold']['seconds']:.0f} s).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
