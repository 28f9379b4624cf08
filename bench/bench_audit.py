"""Wall time and peak memory of the audit on generated features (no images, no TensorFlow).

Features are class clusters after a ReLU (non-negative, as pooled backbone features are),
with 1% of the labels moved to another class and 0.5% of the rows given a near-copy, so
every part of the audit has something to find. Each size runs in its own process, so its
peak RSS is its own; the load average before and after each says how busy the machine was.

    .venv/bin/python bench/bench_audit.py          # 3,670 x 1,280, then 100,000 x 1,280
    .venv/bin/python bench/bench_audit.py --rows 3670 --dims 1280
    .venv/bin/python bench/bench_audit.py --workspace WS --rows 36700 100000

With `--workspace`, the features are a pipeline workspace's (data/features and
data/manifests after `extract`), each size a seeded draw of that many of its rows: the cost
per row of one data set at several sizes, in one sitting. Each part's wall and CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

SIZES = [(3670, 1280), (100_000, 1280)]  # the flower set's size; a large web-scraped set
CLASSES = 5
PARAMS = {"duplicate_similarity": 0.98, "outlier_fraction": 0.01, "outlier_neighbours": 10,
          "gallery_size": 24}


def generated_inputs(rows: int, dims: int, seed: int = 0):
    from retrain.audit import AuditInputs

    rng = np.random.default_rng(seed)
    truth = rng.integers(0, CLASSES, rows)
    centres = rng.normal(size=(CLASSES, dims)).astype(np.float32)
    features = centres[truth] + rng.normal(size=(rows, dims)).astype(np.float32) * 2
    copies = rng.choice(rows, size=rows // 200, replace=False)
    features[copies[: len(copies) // 2]] = features[copies[len(copies) // 2:][: len(copies) // 2]]
    np.maximum(features, 0, out=features)
    labels = truth.copy()
    moved = rng.choice(rows, size=rows // 100, replace=False)
    labels[moved] = (labels[moved] + 1) % CLASSES
    names = [f"class_{c}" for c in range(CLASSES)]
    table = pd.DataFrame({"path": [f"{i:07d}.jpg" for i in range(rows)],
                          "label": np.asarray(names)[labels], "label_index": labels,
                          "sha256": [f"{i:064x}" for i in range(rows)],
                          "split": rng.choice(["train", "val", "test"], rows, p=[0.72, 0.2, 0.08])})
    return AuditInputs(table, features, names)


def workspace_inputs(workspace: Path, rows: int):
    """`rows` of a workspace's audit inputs, a seeded draw kept in table order."""
    from retrain.audit import AuditInputs, read_inputs

    inputs = read_inputs(workspace / "data" / "features", workspace / "data" / "manifests")
    total = len(inputs.table)
    if rows > total:
        raise SystemExit(f"{workspace} holds {total} images, fewer than {rows}")
    keep = np.sort(np.random.default_rng(0).choice(total, rows, replace=False))
    return AuditInputs(inputs.table.iloc[keep].reset_index(drop=True), inputs.features[keep],
                       inputs.classes)


def measure(rows: int, dims: int, workspace: Path | None = None) -> dict:
    from retrain import audit

    inputs = workspace_inputs(workspace, rows) if workspace else generated_inputs(rows, dims)
    dims = inputs.features.shape[1]
    parts, cpu = {}, {}

    def timed(name, function, *args):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = function(*args)
        parts[name] = round(time.perf_counter() - start, 1)
        cpu[name] = round(time.process_time() - start_cpu, 1)
        print(f"{rows} x {dims}: {name} {parts[name]} s, CPU {cpu[name]} s", file=sys.stderr,
              flush=True)
        return result

    probabilities = timed("out_of_fold_fits", audit.out_of_fold_probabilities, inputs, 5, 42)
    issues = timed("cleanlab_label_issues", audit.label_issues, inputs, probabilities)
    space = timed("projection", audit.neighbour_space, inputs.features, 42)
    groups = timed("near_duplicates", audit.near_duplicate_groups, inputs,
                   PARAMS["duplicate_similarity"], space)
    # as the stage does: beyond OUTLIER_REFERENCE_ROWS images, among that many (by sha256)
    odd = timed("outliers", audit.outliers, inputs, PARAMS["outlier_fraction"],
                PARAMS["outlier_neighbours"], space, audit.outlier_reference(inputs.table))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"rows": rows, "dims": dims, "neighbour_dims": space.reduced.shape[1],
            "seconds": round(sum(parts.values()), 1),
            "cpu_seconds": round(sum(cpu.values()), 1),
            "parts_s": parts, "parts_cpu_s": cpu, "peak_rss_mb": round(peak_mb),
            "tensorflow_imported": "tensorflow" in sys.modules,
            "label_issues": int((issues["flagged"] == "yes").sum()),
            "near_duplicate_groups": int(groups["group"].nunique()),
            "near_duplicate_images": len(groups),
            "outliers": sorted(odd.loc[odd["flagged"] == "yes", "path"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+")
    parser.add_argument("--dims", type=int, default=1280)
    parser.add_argument("--workspace", type=Path,
                        help="measure on this workspace's features, not generated ones")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child run
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.rows[0], args.dims, args.workspace)))
        return
    sizes = [(rows, args.dims) for rows in args.rows] if args.rows else SIZES
    for rows, dims in sizes:
        # Other work on the machine slows every part: the load says how much there was.
        print(f"load average before: {os.getloadavg()}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, __file__, "--one", "--rows", str(rows), "--dims",
                        str(dims), *(["--workspace", str(args.workspace)] if args.workspace
                                     else [])], check=True)
        print(f"load average after: {os.getloadavg()}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
