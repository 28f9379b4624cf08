"""Error rates of `report`'s default gates on real photos: seed-only changes (false alarms)
and planted regressions (detections), at the recipe level (fine-tuning replicates) and at
the model level (one model each, the gates before replicates).

On the 200 real flower photos (`../shared`) with the MobileNetV2 alpha 0.35 ImageNet weights:
one stratified split (96 train, 24 val, 80 test), one head trained on the cached features
(seed 0), then per revision K fine-tuned replicates from that head (`fine_tune_replicates`,
the stage's own code) with the default recipe except the augmentation: flips only, so every
training view recurs and the frozen part's outputs are computed once for all revisions
(memoised by pixels) instead of once per view and revision; the order and dropout still
follow each replicate's seed. Test predictions come from each replicate's upper part on the
frozen outputs of the test images (the same function as the full model). Trainings run
in-process, not as `dvc exp run`s: a whole pipeline per revision would cost minutes each.

Revisions: `seed` = 1..S (S - 1 seed-only pairs, i vs i + 1), and per planted regression R
revisions (seeds 101..): `finetune.lr_factor: 10`, 20% of the training labels shuffled,
`finetune.from_layer: 30`. Each regression revision is compared with seed-only revision i.

    python bench/bench_recipe_gates.py [--seeds 21] [--regressions 5] [--replicates 3]
        [--parts cost,gates]
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from common import REAL_PHOTOS, REAL_WEIGHTS, extracted, load_average, parse_args, use_bench_cache

ALPHA_PARAMS = {"backbone": "mobilenet_v2", "weights": str(REAL_WEIGHTS), "image_size": 224,
                "alpha": 0.35}
DEFAULT_GATES = [{"metric": "finetuned.test_accuracy", "direction": "higher",
                  "tolerance": 0.01, "significance": 0.05},
                 {"metric": "finetuned.macro_f1", "direction": "higher", "tolerance": 0.01,
                  "significance": 0.05}]
REGRESSIONS = {"lr_factor_10": {"lr_factor": 10.0},
               "labels_shuffled_20pc": {"shuffle": 0.2},
               "from_layer_30": {"from_layer": 30}}


def load_photos(workdir: Path):
    """Decoded 224-px images, labels, and a stratified 96 / 24 / 80 split."""
    from sklearn.model_selection import train_test_split

    from retrain.cache import user_cache_dir
    from retrain.images import cached_image_array
    from retrain.workspace import sha256_of

    root = extracted(Path(workdir) / "flower_photos_small.tgz") \
        if (Path(workdir) / "flower_photos_small.tgz").exists() else None
    if root is None:
        import shutil

        shutil.copy(REAL_PHOTOS, Path(workdir) / "flower_photos_small.tgz")
        root = extracted(Path(workdir) / "flower_photos_small.tgz")
    paths = sorted(root.rglob("*.jpg"))
    classes = sorted({p.parent.name for p in paths})
    labels = np.array([classes.index(p.parent.name) for p in paths])
    images = np.asarray(cached_image_array(paths, [sha256_of(p) for p in paths], 224,
                                           user_cache_dir("images")))
    rest, test = train_test_split(np.arange(len(paths)), test_size=80, stratify=labels,
                                  random_state=0)
    train, val = train_test_split(rest, test_size=24, stratify=labels[rest], random_state=0)
    return images, labels, {"train": train, "val": val, "test": test}, len(classes)


class MemoEngine:
    """The frozen part's engine, remembering each view's outputs by its pixels."""

    def __init__(self, engine):
        self.engine, self.seen, self.name = engine, {}, getattr(engine, "name", "engine")

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        keys = [hashlib.sha1(row.tobytes()).hexdigest() for row in pixels]
        missing = [i for i, k in enumerate(keys) if k not in self.seen]
        if missing:
            for i, out in zip(missing, self.engine(pixels[missing])):
                self.seen[keys[i]] = out
        return np.stack([self.seen[k] for k in keys])


def trained_head(images, labels, parts, classes):
    from retrain.base import build_base
    from retrain.features import pooled_model
    from retrain.head import build_head, train_head
    from retrain.reproducibility import make_deterministic

    make_deterministic(0)
    extractor = pooled_model(build_base(ALPHA_PARAMS))
    features = {k: extractor.predict(images[v].astype("float32"), verbose=0)
                for k, v in parts.items() if k != "test"}
    head = build_head(features["train"].shape[1], classes, 0.3, 0)
    train_head(head, (features["train"], labels[parts["train"]]),
               (features["val"], labels[parts["val"]]), learning_rate=0.001, epochs=20,
               batch_size=32, verbose=0)
    return head


def revision(seed, head, images, labels, parts, replicates, engines, change=None,
             augmentation=None):
    """K fine-tuned replicates of one revision; (K, test) predicted classes, seconds."""
    from retrain.augment import Augmentation
    from retrain.base import build_base
    from retrain.features import make_engine
    from retrain.finetune import (
        Recipe,
        Split,
        assemble_model,
        fine_tune_replicates,
        replicate_seeds,
        unfreeze_from,
    )
    from retrain.frozen_part import cut_frozen_part
    from retrain.reproducibility import make_deterministic

    change = change or {}
    from_layer = change.get("from_layer", 135)
    train_labels = labels[parts["train"]].copy()
    if change.get("shuffle"):
        rng = np.random.default_rng(seed)
        picked = rng.choice(len(train_labels), int(change["shuffle"] * len(train_labels)),
                            replace=False)
        train_labels[picked] = rng.permutation(train_labels[picked])
    seeds = replicate_seeds(seed, replicates)
    recipe = Recipe(learning_rate=0.001 * change.get("lr_factor", 0.1), epochs=5,
                    batch_size=32, seed=seed, view_seed=seed,
                    augmentation=augmentation or Augmentation(flip=True))
    models = []

    def build():
        for replicate_seed in seeds:
            base = build_base(ALPHA_PARAMS)
            make_deterministic(replicate_seed)
            model = assemble_model(base, head)
            unfreeze_from(model, from_layer)
            models.append(model)
            yield model

    def engine_for(lower):
        if from_layer not in engines:
            engines[from_layer] = MemoEngine(make_engine("auto", lower, ALPHA_PARAMS))
        return engines[from_layer]

    start = time.perf_counter()
    list(fine_tune_replicates(
        build(), Split(images[parts["train"]], train_labels),
        Split(images[parts["val"]], labels[parts["val"]]),
        [replace(recipe, seed=s) for s in seeds], make_engine=engine_for,
        callbacks=None))
    seconds = time.perf_counter() - start
    predicted = []
    for model in models:
        cut = cut_frozen_part(model)
        test_flat = engines[from_layer](images[parts["test"]].astype("float32"))
        predicted.append(np.asarray(cut.upper(cut.split(test_flat), training=False)).argmax(1))
    return np.array(predicted), seconds


def verdicts(labels, base, new, level, replicates):
    """Each default gate's status for base vs new, as `report` judges them."""
    from retrain.evaluate import predictions_table
    from retrain.report import GateResult, TestSets, gather_evidence
    from retrain.uncertainty import METRICS, confusion_counts

    classes = [str(c) for c in range(int(labels.max()) + 1)]
    tables = []
    for predicted in (base[:replicates], new[:replicates]):
        probabilities = np.eye(len(classes))[predicted]
        table = predictions_table([f"{i}.jpg" for i in range(len(labels))],
                                  [f"{i:064x}" for i in range(len(labels))],
                                  probabilities[0], labels, classes, list(probabilities[1:]))
        tables.append(table.astype(str).assign(copy=0))
    sets = TestSets("finetuned", *tables, shared=len(labels))
    out = {}
    for gate in DEFAULT_GATES:
        metric = gate["metric"].split(".")[1]

        def value(predicted, metric=metric):
            return float(METRICS[metric](confusion_counts(labels, predicted, len(classes))))

        result = GateResult(gate["metric"], "metrics/evaluate.json", "higher",
                            gate["tolerance"], value(base[0]), value(new[0]),
                            gate["significance"], level=level)
        out[gate["metric"]] = replace(result, evidence=gather_evidence(result, sets)).status
    return out


def rate(failures: int, total: int) -> dict:
    from scipy.stats import binomtest

    interval = binomtest(failures, total).proportion_ci(0.95) if total else None
    return {"failed": failures, "of": total, "rate": failures / total if total else None,
            "ci95": [round(interval.low, 3), round(interval.high, 3)] if interval else None}


def main() -> None:
    def extra(parser):
        parser.add_argument("--seeds", type=int, default=21)
        parser.add_argument("--regressions", type=int, default=5)
        parser.add_argument("--replicates", type=int, default=3)
        parser.add_argument("--parts", default="cost,gates")

    args = parse_args(__doc__, extra=extra)
    use_bench_cache(args.workdir)
    from retrain.reproducibility import make_deterministic

    make_deterministic(0)
    images, labels, parts, classes = load_photos(args.workdir)
    head = trained_head(images, labels, parts, classes)
    test_labels = labels[parts["test"]]
    results = {"load_average_start": load_average(), "split": {k: len(v) for k, v in
                                                               parts.items()}}
    if "cost" in args.parts:
        from retrain.augment import Augmentation

        default_views = Augmentation(flip=True, brightness=0.1, contrast=0.1)
        for k in (1, args.replicates):
            _, seconds = revision(42, head, images, labels, parts, k, {},
                                  augmentation=default_views)
            results[f"cost_default_augmentation_K{k}_s"] = round(seconds, 1)
            print(f"cost: K={k}, default augmentation (views computed per revision): "
                  f"{seconds:.1f} s", flush=True)
    if "gates" in args.parts:
        engines: dict = {}
        runs, seconds = {}, []
        for seed in range(1, args.seeds + 1):
            runs[seed], spent = revision(seed, head, images, labels, parts, args.replicates,
                                         engines)
            seconds.append(spent)
            print(f"seed {seed}: accuracy per replicate "
                  f"{(runs[seed] == test_labels).mean(axis=1).round(3).tolist()} "
                  f"({spent:.1f} s)", flush=True)
        accuracies = np.array([(runs[s] == test_labels).mean(axis=1) for s in runs])
        results["spread"] = {
            "sd_within_revision_shared_views": float(np.sqrt(accuracies.var(axis=1,
                                                                            ddof=1).mean())),
            "sd_across_revisions_replicate0": float(accuracies[:, 0].std(ddof=1))}
        levels = {"recipe_K": ("recipe", args.replicates), "model_K1": ("model", 1)}
        pairs = [(s, s + 1) for s in range(1, args.seeds)]
        false_alarms = {}
        for name, (level, k) in levels.items():
            statuses = [verdicts(test_labels, runs[a], runs[b], level, k) for a, b in pairs]
            for gate in DEFAULT_GATES:
                failed = sum(s[gate["metric"]] == "regression" for s in statuses)
                false_alarms[f"{name}:{gate['metric']}"] = rate(failed, len(pairs))
            failed_any = sum(any(v == "regression" for v in s.values()) for s in statuses)
            false_alarms[f"{name}:any"] = rate(failed_any, len(pairs))
        results["false_alarms"] = false_alarms
        print(json.dumps(false_alarms, indent=1), flush=True)
        detections = {}
        for kind, change in REGRESSIONS.items():
            statuses = {name: [] for name in levels}
            for i in range(args.regressions):
                bad, spent = revision(101 + i, head, images, labels, parts, args.replicates,
                                      engines, change)
                print(f"{kind} #{i}: accuracy per replicate "
                      f"{(bad == test_labels).mean(axis=1).round(3).tolist()} ({spent:.1f} s)",
                      flush=True)
                for name, (level, k) in levels.items():
                    statuses[name].append(verdicts(test_labels, runs[1 + i], bad, level, k))
            for name in levels:
                failed = sum(any(v == "regression" for v in s.values())
                             for s in statuses[name])
                detections[f"{name}:{kind}"] = rate(failed, args.regressions)
        results["detections"] = detections
        results["seconds_per_revision_median"] = float(np.median(seconds))
        print(json.dumps(detections, indent=1), flush=True)
    results["load_average_end"] = load_average()
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
