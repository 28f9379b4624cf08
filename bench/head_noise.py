"""How far the head's figures move by chance: cross-validation spread and seed-to-seed spread.

    python bench/head_noise.py --data real        # ../shared's 200 flower photos, alpha 0.35
    python bench/head_noise.py --data generated   # the small profile's generated set

In a scratch git + DVC workspace: `dvc repro crossval train_head` once (timing the `crossval`
stage on its own), then the head retrained under several training seeds with
`dvc repro train_head`, each time checking that `split` and `extract` did not run. Prints
metrics/crossval.json, each seed's validation and test accuracy (head on cached features),
and their mean, sd and range. Fine-tuning is not run: the figures are the head's.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import (
    PYTHON,
    REAL_PHOTOS,
    REAL_WEIGHTS,
    REPO,
    bench_env,
    parse_args,
    real_photo_params,
    set_params,
)


def extra_args(parser) -> None:
    parser.add_argument("--data", choices=("real", "generated"), default="real")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])


def dvc(workspace: Path, env: dict, *args: str) -> str:
    result = subprocess.run([PYTHON, "-m", "dvc", *args], cwd=workspace, env=env,
                            capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def make_workspace(data: str, workdir: Path) -> Path:
    from retrain.workspace import create_workspace

    if data == "generated":
        return create_workspace(workdir / "noise-generated", source=REPO, profile="small")
    for path in (REAL_PHOTOS, REAL_WEIGHTS):
        if not path.exists():
            sys.exit(f"{path} not found: --data real needs ../shared")
    workspace = create_workspace(workdir / "noise-real", source=REPO)
    set_params(workspace, real_photo_params())
    return workspace


def head_test_accuracy(workspace: Path) -> float:
    """The head's accuracy on the cached test features (what `evaluate` reports as head)."""
    import keras
    import pandas as pd

    head = keras.models.load_model(workspace / "models" / "head.keras")
    features = np.load(workspace / "data" / "features" / "test.npy")
    labels = pd.read_csv(workspace / "data" / "manifests" / "test.csv")["label_index"]
    predicted = head.predict(features, verbose=0).argmax(axis=1)
    return float((predicted == labels.to_numpy()).mean())


def spread(values: list[float]) -> str:
    return (f"mean {statistics.mean(values):.3f}, sd {statistics.stdev(values):.3f}, "
            f"range {min(values):.3f}-{max(values):.3f}")


def main(argv=None) -> int:
    args = parse_args(__doc__, argv, extra_args)
    env = bench_env(args.workdir)
    workspace = make_workspace(args.data, args.workdir)
    set_params(workspace, {"crossval.folds": 5, "crossval.repeats": 2})  # the defaults
    dvc(workspace, env, "repro", "extract")
    start = time.perf_counter()
    log = dvc(workspace, env, "repro", "crossval")
    wall = time.perf_counter() - start
    inner = re.search(r"; ([\d.]+) s\n", log)
    crossval = json.loads((workspace / "metrics" / "crossval.json").read_text())
    data = json.loads((workspace / "reports" / "details" / "data.json").read_text())["images"]
    print(f"data: {args.data}; train {data['train']['total']}, val {data['val']['total']}, "
          f"test {data['test']['total']} images")
    print(f"crossval: `dvc repro crossval` {wall:.1f} s wall "
          f"({inner.group(1) if inner else '?'} s in the stage's folds)")
    print("metrics/crossval.json:", json.dumps(crossval))

    val, test = [], []
    for seed in args.seeds:
        set_params(workspace, {"seed": seed})
        log = dvc(workspace, env, "repro", "train_head")
        ran = re.findall(r"Running stage '([\w-]+)'", log)
        assert ran == ["train_head"], f"seed {seed} ran {ran}"
        val.append(json.loads((workspace / "reports" / "details" / "head.json").read_text())[
            "val_accuracy"])
        test.append(head_test_accuracy(workspace))
        print(f"seed {seed}: ran {ran}; head val_accuracy {val[-1]:.3f}, "
              f"test accuracy {test[-1]:.3f}")
    print(f"seed-to-seed ({len(args.seeds)} seeds), head val_accuracy: {spread(val)}")
    print(f"seed-to-seed ({len(args.seeds)} seeds), head test accuracy: {spread(test)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
