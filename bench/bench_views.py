"""Fine-tuning with a bounded set of views per image (`finetune.augment.views`) against new
views every epoch, on the cached path, and both against the full path.

- `epoch`: where one training view's time goes, in CPU-ms per image (batch 32, MobileNetV2
  at 224, the shared alpha 0.35 ImageNet weights where present): the augmentation (numpy),
  the frozen part below `from_layer` under LiteRT, the upper part's training step, and the
  full model's training step (the full path). From them, one epoch's cost on each path.
- `speed`: `stages/finetune.py` alone in one workspace of `--images` generated 224-px JPEGs in
  the flower set's class sizes (split, extract and train_head run first), once per setting:
  `finetune.path: full` (views 0, the classic recipe), cached with views 0, cached with
  `--views`. Wall and CPU seconds (the stage and its children); each setting's runs alternate
  with the others' (`--rounds`).
- `accuracy`: in-process, as `bench_recipe_gates.py` trains a revision (the stage's own
  `fine_tune_replicates`), on the 200 real photos (96 train / 24 val / 80 test) or generated
  images: per seed, one model with new views every epoch and one with `--views` views, from
  the same head, with the same order and dropout seeds. Test accuracy (images no model
  trained on) per seed, and the paired difference over seeds with its 95% t interval
  (scipy `ttest_rel`): the range of mean changes the seeds are compatible with.

    python bench/bench_views.py [--parts epoch,speed,accuracy] [--views 2] [--images 3670]
        [--rounds 2] [--seeds 10] [--data real|generated]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from common import (
    FLOWER_COUNTS,
    PYTHON,
    REAL_WEIGHTS,
    REPO,
    bench_env,
    extracted,
    flower_class_counts,
    generated_tarball,
    load_average,
    parse_args,
    use_bench_cache,
    write_json,
)

DEFAULT_AUGMENT = {"flip": True, "brightness": 0.1, "contrast": 0.1, "views": 0}


def model_params() -> dict:
    weights = str(REAL_WEIGHTS) if REAL_WEIGHTS.exists() else "none"
    return {"backbone": "mobilenet_v2", "weights": weights, "image_size": 224, "alpha": 0.35}


def cpu_ms_per_image(step, images: int, repeats: int = 5) -> float:
    """CPU-ms per image of `step()` on a batch of `images`, after one warm-up call."""
    step()
    start = time.process_time()
    for _ in range(repeats):
        step()
    return round((time.process_time() - start) * 1000 / (repeats * images), 3)


def epoch_breakdown(args) -> dict:
    """Per-view costs of one training step, and what an epoch costs on each path."""
    import keras

    from retrain.augment import Augmentation, epoch_views
    from retrain.base import build_base
    from retrain.features import make_engine
    from retrain.finetune import assemble_model, unfreeze_from
    from retrain.frozen_part import cut_frozen_part
    from retrain.head import build_head, compile_classifier
    from retrain.reproducibility import make_deterministic

    make_deterministic(0)
    params, batch = model_params(), 32
    base = build_base(params)
    model = assemble_model(base, build_head(base.output.shape[-1], 5, 0.3, 0))
    unfreeze_from(model, 135)
    cut = cut_frozen_part(model)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, batch)
    views = epoch_views(0, 0, batch, Augmentation.from_params(DEFAULT_AUGMENT))
    pixels = views.pixels(images, np.arange(batch))
    engine = make_engine("auto", cut.lower, params)
    flat = engine(pixels)
    compile_classifier(cut.upper, 1e-4)
    compile_classifier(model, 1e-4)
    upper_inputs = cut.split(flat)
    costs = {
        "augmentation": cpu_ms_per_image(lambda: views.pixels(images, np.arange(batch)), batch),
        "frozen_part": cpu_ms_per_image(lambda: engine(pixels), batch),
        "upper_step": cpu_ms_per_image(lambda: cut.upper.train_on_batch(upper_inputs, labels),
                                       batch),
        "full_step": cpu_ms_per_image(lambda: model.train_on_batch(pixels, labels), batch),
    }
    keras.backend.clear_session()
    per_view = costs["augmentation"] + costs["frozen_part"] + costs["upper_step"]
    epochs, train_images = 5, round(0.72 * sum(FLOWER_COUNTS))  # the default split's train
    full = epochs * (costs["augmentation"] + costs["full_step"])
    new_views = epochs * per_view
    bounded = args.views * per_view + (epochs - args.views) * costs["upper_step"]
    return {"engine": getattr(engine, "name", "engine"), "batch": batch,
            "cpu_ms_per_image": costs, "cut_values_per_image": cut.width,
            "five_epochs_cpu_ms_per_image": {"full": round(full, 2),
                                             "cached_new_views": round(new_views, 2),
                                             f"cached_views_{args.views}": round(bounded, 2)},
            "five_epochs_cpu_s_at_3670": {
                "full": round(full * train_images / 1000, 1),
                "cached_new_views": round(new_views * train_images / 1000, 1),
                f"cached_views_{args.views}": round(bounded * train_images / 1000, 1)}}


def speed_runs(args, env: dict) -> dict:
    """`stages/finetune.py` alone, full path then cached with and without bounded views."""
    from bench_finetune import edit_params, edit_params_from, run_stages_to_head

    images = 400 if args.quick else args.images
    raw = extracted(generated_tarball(args.workdir, flower_class_counts(images), 224, seed=5))
    scratch = args.workdir / f"views-{images}"
    scratch.mkdir(parents=True, exist_ok=True)
    params = model_params()
    edit_params_from(REPO / "params.yaml", scratch / "params.yaml",
                     **{f"model__{k}": v for k, v in params.items()})
    if not (scratch / "head.keras").exists():
        run_stages_to_head(raw, scratch, env)
    settings = {"full": ("full", 0), "cached_new_views": ("auto", 0),
                f"cached_views_{args.views}": ("auto", args.views)}
    runs = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, (path, views) in settings.items():
            edit_params(scratch / "params.yaml", finetune__path=path,
                        finetune__augment__views=views)
            runs[name].append(stage_run(raw, scratch, env, name))
            print(name, json.dumps(runs[name][-1]), flush=True)
    return {"images": images, "model": params, "runs": runs}


def stage_run(raw: Path, scratch: Path, env: dict, name: str) -> dict:
    """One run of the stage: wall and CPU seconds (`timed_stages`) and what it reported."""
    from bench_finetune import timed_stages

    run = timed_stages([PYTHON, REPO / "stages" / "finetune.py", "--raw", raw, "--manifests",
                        "manifests", "--head", "head.keras", "--head-details", "head.json",
                        "--model", f"model-{name}.keras", "--serving", f"serving-{name}",
                        "--replicates", f"replicates-{name}", "--live", f"live-{name}",
                        "--details", f"finetune-{name}.json"], scratch, env)
    details = json.loads((scratch / f"finetune-{name}.json").read_text())
    return {"seconds": round(run["seconds"], 1), "cpu_seconds": round(run["cpu_seconds"], 1),
            "path": details["path"], "kept_mb": details.get("kept_mb"),
            "val_accuracy": details.get("val_accuracy"),
            "train_images_per_second": details.get("train_images_per_second"),
            "load_average": run["load_average"]}


def accuracy_runs(args) -> dict:
    """Test accuracy per seed with new views every epoch and with `args.views` views."""
    from bench_recipe_gates import load_data, pooled_features, revision, trained_head
    from scipy.stats import ttest_rel

    from retrain.augment import Augmentation
    from retrain.reproducibility import make_deterministic

    make_deterministic(0)
    args.noise = 0.7
    data = load_data(args)
    data.features = pooled_features(data.images, data.parts)
    data.head = trained_head(data.features, data.labels, data.parts, data.classes)
    test = data.test_labels
    rows = []
    for seed in range(1, args.seeds + 1):
        row = {"seed": seed}
        for name, views in (("new_views", 0), (f"views_{args.views}", args.views)):
            augmentation = Augmentation.from_params({**DEFAULT_AUGMENT, "views": views})
            predicted, seconds = revision(seed, data, 1, augmentation=augmentation,
                                          engines={})
            row[name] = {"test_accuracy": round(float((predicted[0] == test).mean()), 4),
                         "seconds": round(seconds, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    new = np.array([r["new_views"]["test_accuracy"] for r in rows])
    bounded = np.array([r[f"views_{args.views}"]["test_accuracy"] for r in rows])
    interval = ttest_rel(bounded, new).confidence_interval(0.95)
    return {"data": args.data, "split": {k: len(v) for k, v in data.parts.items()},
            "seeds": rows, "new_views_mean": round(float(new.mean()), 4),
            "bounded_mean": round(float(bounded.mean()), 4),
            "difference": round(float((bounded - new).mean()), 4),
            "difference_ci95": [round(float(interval.low), 4), round(float(interval.high), 4)],
            "sd_across_seeds_new_views": round(float(new.std(ddof=1)), 4)}


def main() -> None:
    def extra(parser):
        parser.add_argument("--parts", default="epoch,speed,accuracy")
        parser.add_argument("--views", type=int, default=2)
        parser.add_argument("--images", type=int, default=sum(FLOWER_COUNTS))
        parser.add_argument("--rounds", type=int, default=2)
        parser.add_argument("--seeds", type=int, default=10)
        parser.add_argument("--data", choices=("real", "generated"), default="real")

    args = parse_args(__doc__.splitlines()[0], extra=extra)
    use_bench_cache(args.workdir)
    parts = args.parts.split(",")
    results = {"views": args.views, "load_average_start": load_average()}
    if "epoch" in parts:
        results["epoch"] = epoch_breakdown(args)
        print(json.dumps(results["epoch"], indent=1), flush=True)
    if "speed" in parts:
        results["speed"] = speed_runs(args, bench_env(args.workdir))
    if "accuracy" in parts:
        results["accuracy"] = accuracy_runs(args)
    results["load_average_end"] = load_average()
    print(json.dumps(results, indent=1))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
