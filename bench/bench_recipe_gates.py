"""Error rates of `report`'s default gates: seed-only changes (false alarms) and planted
regressions (detections), at the recipe level (fine-tuning replicates) and at the model
level (one model each, the gates before replicates).

Data (`--data`): the 200 real flower photos (`../shared`; one stratified split of 96 train,
24 val, 80 test), or `--images N` generated 224-px JPEGs in the flower set's class
proportions (48% / 12% / 40%). MobileNetV2 alpha 0.35 with the ImageNet weights file. One
head trained on the cached features (seed 0), then per revision K fine-tuned replicates
from that head (`fine_tune_replicates`, the stage's own code) with the default recipe except
the augmentation: flips only, so every training view recurs and the frozen part's outputs
are computed once for all revisions (memoised by pixels) instead of once per view and
revision; the order and dropout still follow each replicate's seed. Test predictions come
from each replicate's upper part on the frozen outputs of the test images (the same function
as the full model). Trainings run in-process, not as `dvc exp run`s: a whole pipeline per
revision would cost minutes each.

Revisions: `seed` = 1..S (S - 1 seed-only pairs, i vs i + 1), and per planted regression R
revisions (seeds 101..): `finetune.lr_factor: 10`, 20% or 50% of the training labels
shuffled (the revision trains its own head on them: changed data re-runs `train_head`), and
`finetune.from_layer: 30`. Each regression revision is compared with seed-only revision i;
each regression's true effect (mean test accuracy against the seed-only revisions', Welch's
95% interval) says whether it is a regression on this data at all. Part `pair` judges one
seed-only pair (`--pair 42 7`) in full.

The crossval gate (`metrics/crossval.json:accuracy`) judges crossval's folds of
the default head recipe on the train+val features: unchanged by a seed-only revision or a
fine-tuning param (crossval reads neither), re-run on a revision's shuffled labels, and on
its own noise measured by S - 1 `crossval.seed`-only pairs (other folds, other heads).

    python bench/bench_recipe_gates.py [--data real|generated] [--images 1000] [--seeds 21]
        [--regressions 5] [--replicates 3] [--parts cost,pair,gates]
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from common import (
    REAL_PHOTOS,
    REAL_WEIGHTS,
    REPO,
    extracted,
    load_average,
    parse_args,
    use_bench_cache,
)

ALPHA_PARAMS = {"backbone": "mobilenet_v2", "weights": str(REAL_WEIGHTS), "image_size": 224,
                "alpha": 0.35}


@functools.cache
def default_params() -> dict:
    """params.yaml, read once: every revision's crossval and audit read it."""
    from retrain.params import load_params

    return load_params(REPO / "params.yaml", check_model=False)


def gate_figure(gate: dict) -> tuple[str, str]:
    """(file, dotted key) of the stage figure a default gate reads, as `report` resolves it."""
    from retrain.headline import stage_figure

    return stage_figure(*gate_file_and_key(gate))


def gate_file_and_key(gate: dict) -> tuple[str, str]:
    """A `file:key` gate's metrics file and key."""
    path, _, key = gate["metric"].rpartition(":")
    return path, key


# `report`'s default gates, as params.yaml holds them: on the fine-tuned model's test
# metrics, on crossval's mean (the head recipe over the folds of train+val) and on the
# audit's label agreement.
DEFAULT_GATES = default_params()["report"]["gates"]
FINETUNED_GATES = [g for g in DEFAULT_GATES
                   if gate_figure(g)[1].startswith("finetuned.")]
CROSSVAL_GATES = [g for g in DEFAULT_GATES if gate_figure(g)[0].endswith("/crossval.json")]
AUDIT_GATES = [g for g in DEFAULT_GATES if gate_figure(g)[0].endswith("/audit.json")]
REGRESSIONS = {"lr_factor_10": {"lr_factor": 10.0},
               "labels_shuffled_20pc": {"shuffle": 0.2},
               "labels_shuffled_50pc": {"shuffle": 0.5},
               "from_layer_30": {"from_layer": 30}}


def decoded_set(root: Path):
    """The class-folder set under `root`: decoded 224-px images (the image cache's array),
    labels, class count."""
    from retrain.cache import user_cache_dir
    from retrain.images import cached_image_array
    from retrain.workspace import sha256_of

    paths = sorted(root.rglob("*.jpg"))
    classes = sorted({p.parent.name for p in paths})
    labels = np.array([classes.index(p.parent.name) for p in paths])
    images = cached_image_array(paths, [sha256_of(p) for p in paths], 224,
                                user_cache_dir("images"))
    return images, labels, len(classes)


def stratified_parts(labels, test_size, val_size) -> dict:
    """Row indices of a stratified train / val / test split (sizes: counts or fractions;
    `val_size` of what the test part leaves)."""
    from sklearn.model_selection import train_test_split

    rest, test = train_test_split(np.arange(len(labels)), test_size=test_size,
                                  stratify=labels, random_state=0)
    train, val = train_test_split(rest, test_size=val_size, stratify=labels[rest],
                                  random_state=0)
    return {"train": train, "val": val, "test": test}


def load_photos(workdir: Path):
    """Decoded 224-px images, labels, and a stratified 96 / 24 / 80 split."""
    tarball = Path(workdir) / "flower_photos_small.tgz"
    if not tarball.exists():
        import shutil

        shutil.copy(REAL_PHOTOS, tarball)
    images, labels, classes = decoded_set(extracted(tarball))
    return np.asarray(images), labels, stratified_parts(labels, 80, 24), classes


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


def pooled_features(images, parts) -> dict:
    """The frozen backbone's pooled features of every split (what `extract` writes),
    computed once for every head and audit the benchmark runs."""
    from retrain.base import build_base
    from retrain.features import pooled_model

    extractor = pooled_model(build_base(ALPHA_PARAMS))
    return {k: extractor.predict(images[v].astype("float32"), verbose=0)
            for k, v in parts.items()}


def trained_head(features, labels, parts, classes, seed=0, train_labels=None):
    """A head trained on the cached features (20 epochs); `train_labels` replaces the
    training labels (a revision whose data changed re-runs `train_head` too)."""
    from retrain.head import build_head, train_head
    from retrain.reproducibility import make_deterministic

    make_deterministic(seed)
    head = build_head(features["train"].shape[1], classes, 0.3, seed)
    train_head(head, (features["train"],
                      labels[parts["train"]] if train_labels is None else train_labels),
               (features["val"], labels[parts["val"]]), learning_rate=0.001, epochs=20,
               batch_size=32, verbose=0)
    return head


@dataclass
class Data:
    """One benchmark's photos, split, cached features and the head seed-only revisions share."""
    images: np.ndarray
    labels: np.ndarray
    parts: dict
    classes: int
    features: dict = field(default_factory=dict)
    head: object = None
    engines: dict = field(default_factory=dict)  # from_layer -> memoised frozen part

    @property
    def test_labels(self) -> np.ndarray:
        return self.labels[self.parts["test"]]


def shuffled(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """`labels` with a `fraction` of them, drawn with `seed`, permuted among themselves."""
    rng = np.random.default_rng(seed)
    out = labels.copy()
    picked = rng.choice(len(out), int(fraction * len(out)), replace=False)
    out[picked] = rng.permutation(out[picked])
    return out


def revision(seed, data: Data, replicates, change=None, augmentation=None, engines=None):
    """K fine-tuned replicates of one revision; (K, test) predicted classes, seconds.
    A revision with shuffled training labels trains its own head on them first, as a
    pull request that changes the data re-runs `train_head` before `finetune`."""
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
    engines = data.engines if engines is None else engines
    from_layer = change.get("from_layer", 135)
    train_labels = data.labels[data.parts["train"]]
    head = data.head
    start = time.perf_counter()
    if change.get("shuffle"):
        train_labels = shuffled(train_labels, change["shuffle"], seed)
        head = trained_head(data.features, data.labels, data.parts, data.classes, seed,
                            train_labels)
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

    images, parts = data.images, data.parts
    list(fine_tune_replicates(
        build(), Split(images[parts["train"]], train_labels),
        Split(images[parts["val"]], data.labels[parts["val"]]),
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
    for gate in FINETUNED_GATES:
        metric = gate_figure(gate)[1].split(".")[1]

        def value(predicted, metric=metric):
            return float(METRICS[metric](confusion_counts(labels, predicted, len(classes))))

        result = GateResult(gate["metric"], gate_file_and_key(gate)[0], "higher",
                            gate["tolerance"], value(base[0]), value(new[0]),
                            gate["significance"], level=level)
        out[gate["metric"]] = replace(result, evidence=gather_evidence(result, sets)).status
    return out


def crossval_folds(data: Data, train_labels: np.ndarray | None = None,
                   seed: int | None = None) -> dict:
    """crossval's per-fold scores of the default head recipe on the train+val features
    (the stage's own function; `crossval.seed` = `seed`, default params.yaml's), with the
    revision's training labels."""
    from retrain.crossval import cross_validate_head

    params = default_params()
    crossval = params["crossval"]
    train = data.labels[data.parts["train"]] if train_labels is None else train_labels
    labels = np.concatenate([train, data.labels[data.parts["val"]]])
    features = np.concatenate([data.features["train"], data.features["val"]])
    rows = np.concatenate([data.parts["train"], data.parts["val"]])
    digests = np.array([f"{row:064x}" for row in rows])
    return cross_validate_head(features, labels, digests, data.classes, params["head"],
                               folds=crossval["folds"], repeats=crossval["repeats"],
                               seed=crossval["seed"] if seed is None else seed)


def crossval_verdicts(base: dict, new: dict) -> dict:
    """The crossval gates' statuses for base vs new summaries, as `report` judges them
    (the same at either level: the folds are the only test a crossval mean has)."""
    from retrain.report import GateResult, fold_evidence

    out = {}
    for gate in CROSSVAL_GATES:
        key = gate_figure(gate)[1]
        result = GateResult(gate["metric"], gate_file_and_key(gate)[0], gate["direction"],
                            gate["tolerance"], base[key], new[key], gate["significance"])
        out[gate["metric"]] = replace(result, evidence=fold_evidence(result, base, new)).status
    return out


def audit_agreement(data: Data, train_labels: np.ndarray | None = None,
                    seed: int | None = None):
    """The audit's per-image label agreement (the stage's own out-of-fold classifier, on
    crossval's folds with `crossval.seed` = `seed`) with the revision's training labels:
    the table `report` pairs by image."""
    import pandas as pd

    from retrain.audit import AuditInputs, out_of_fold_probabilities

    crossval = default_params()["crossval"]
    names = ("train", "val", "test")
    labels = np.concatenate([data.labels[data.parts["train"]] if train_labels is None
                             else train_labels,
                             *(data.labels[data.parts[n]] for n in names[1:])])
    rows = np.concatenate([data.parts[n] for n in names])
    table = pd.DataFrame({"label_index": labels, "sha256": [f"{r:064x}" for r in rows],
                          "split": np.repeat(names, [len(data.parts[n]) for n in names])})
    features = np.concatenate([data.features[n] for n in names])
    probabilities = out_of_fold_probabilities(
        AuditInputs(table, features, [str(c) for c in range(data.classes)]),
        crossval["folds"], crossval["seed"] if seed is None else seed)
    return table.assign(copy=0, agrees=probabilities.argmax(axis=1) == labels)


def audit_verdicts(base, new) -> dict:
    """The audit gates' statuses for base vs new tables (`audit_agreement`), as `report`
    judges them: paired by image, McNemar (the same at either level)."""
    from retrain.report import GateResult, agreement_evidence

    out = {}
    for gate in AUDIT_GATES:
        result = GateResult(gate["metric"], gate_file_and_key(gate)[0], gate["direction"],
                            gate["tolerance"],
                            float(base["agrees"].mean()), float(new["agrees"].mean()),
                            gate["significance"])
        out[gate["metric"]] = replace(result, evidence=agreement_evidence(
            base, new, result.confidence)).status
    return out


def data_verdicts(data: Data, base: tuple, train_labels=None, seed=None) -> dict:
    """The crossval and audit gates for a revision with these training labels and
    `crossval.seed` against `base` (its crossval summary and audit table)."""
    return {**crossval_verdicts(base[0], crossval_folds(data, train_labels, seed)),
            **audit_verdicts(base[1], audit_agreement(data, train_labels, seed))}


def rate(failures: int, total: int) -> dict:
    from scipy.stats import binomtest

    interval = binomtest(failures, total).proportion_ci(0.95) if total else None
    return {"failed": failures, "of": total, "rate": failures / total if total else None,
            "ci95": [round(interval.low, 3), round(interval.high, 3)] if interval else None}


def effect(base: dict, changed: dict, test_labels) -> dict:
    """A change's true effect on test accuracy: mean over revisions of the replicates' mean,
    changed minus seed-only, with Welch's 95% interval (scipy) over the revisions."""
    from scipy.stats import ttest_ind

    def means(runs):
        return [float((predicted == test_labels).mean()) for predicted in runs.values()]

    result = ttest_ind(means(changed), means(base), equal_var=False)
    interval = result.confidence_interval(0.95)
    return {"accuracy_change": round(float(np.mean(means(changed)) - np.mean(means(base))), 4),
            "ci95": [round(float(interval.low), 4), round(float(interval.high), 4)]}


def load_data(args) -> Data:
    if args.data == "real":
        return Data(*load_photos(args.workdir))
    return Data(*load_generated(args.workdir, args.images, args.noise))


def load_generated(workdir: Path, images: int, noise: float):
    """Generated 224-px JPEGs in the flower set's class proportions, split as the photos are
    (48% train, 12% val, 40% test, stratified). Each image is blended with a fixed noise image
    of its own (weight `noise`): the generated shapes alone are so easy that every model
    scores 1.0, and a gate cannot be tested at the ceiling."""
    from common import flower_class_counts, generated_tarball

    root = extracted(generated_tarball(Path(workdir), flower_class_counts(images), 224, seed=3))
    cached, labels, classes = decoded_set(root)
    pixels = np.array(cached)  # a writable copy
    rng = np.random.default_rng(0)
    for row in range(len(pixels)):
        blend = rng.integers(0, 256, pixels.shape[1:], dtype=np.uint8)
        pixels[row] = ((1 - noise) * pixels[row] + noise * blend).astype(np.uint8)
    return pixels, labels, stratified_parts(labels, 0.4, 0.2), classes


def accuracies(predicted, test_labels) -> list[float]:
    return (predicted == test_labels).mean(axis=1).round(3).tolist()


LEVELS = {"recipe_K": "recipe", "model_K1": "model"}


def judged(test_labels, base, new, replicates, data_gates=None) -> dict:
    """Each level's gate statuses for one pair of revisions; `data_gates`: the crossval
    and audit gates' statuses (`data_verdicts`), the same at both levels."""
    return {name: {**verdicts(test_labels, base, new, level,
                              replicates if level == "recipe" else 1), **(data_gates or {})}
            for name, level in LEVELS.items()}


def main() -> None:
    def extra(parser):
        parser.add_argument("--data", choices=("real", "generated"), default="real")
        parser.add_argument("--images", type=int, default=1000,
                            help="generated images (--data generated)")
        parser.add_argument("--noise", type=float, default=0.7,
                            help="generated images: weight of the noise blended in")
        parser.add_argument("--seeds", type=int, default=21)
        parser.add_argument("--regressions", type=int, default=5)
        parser.add_argument("--replicates", type=int, default=3)
        parser.add_argument("--pair", type=int, nargs=2, default=(42, 7),
                            help="one seed-only pair judged in full (part 'pair')")
        parser.add_argument("--parts", default="cost,pair,gates")
        parser.add_argument("--changes", default=",".join(REGRESSIONS),
                            help="the planted regressions to run, comma-separated")

    args = parse_args(__doc__, extra=extra)
    use_bench_cache(args.workdir)
    from retrain.reproducibility import make_deterministic

    make_deterministic(0)
    data = load_data(args)
    data.features = pooled_features(data.images, data.parts)
    data.head = trained_head(data.features, data.labels, data.parts, data.classes)
    test_labels = data.test_labels
    results = {"data": args.data, "replicates": args.replicates,
               "load_average_start": load_average(),
               "split": {k: len(v) for k, v in data.parts.items()}}
    print(f"{args.data}: split {results['split']}", flush=True)
    if "cost" in args.parts:
        from retrain.augment import Augmentation

        default_views = Augmentation(flip=True, brightness=0.1, contrast=0.1)
        for k in (1, args.replicates):
            _, seconds = revision(42, data, k, augmentation=default_views, engines={})
            results[f"cost_default_augmentation_K{k}_s"] = round(seconds, 1)
            print(f"cost: K={k}, default augmentation (views computed per revision): "
                  f"{seconds:.1f} s", flush=True)
    if "pair" in args.parts:
        a, b = args.pair
        base, new = (revision(seed, data, args.replicates)[0] for seed in (a, b))
        statuses = judged(test_labels, base, new, args.replicates)
        results["pair"] = {"seeds": [a, b], "accuracy": {str(a): accuracies(base, test_labels),
                                                         str(b): accuracies(new, test_labels)},
                           "verdicts": statuses}
        print(f"seed {a} vs seed {b}: {json.dumps(results['pair'])}", flush=True)
    if "gates" in args.parts:
        runs, seconds = {}, []
        for seed in range(1, args.seeds + 1):
            runs[seed], spent = revision(seed, data, args.replicates)
            seconds.append(spent)
            print(f"seed {seed}: accuracy per replicate {accuracies(runs[seed], test_labels)} "
                  f"({spent:.1f} s)", flush=True)
        per_replicate = np.array([(runs[s] == test_labels).mean(axis=1) for s in runs])
        results["spread"] = {
            "test_accuracy_mean": float(per_replicate.mean()),
            "sd_within_revision_shared_views": float(np.sqrt(per_replicate.var(
                axis=1, ddof=1).mean())),
            "sd_across_revisions_replicate0": float(per_replicate[:, 0].std(ddof=1))}
        pairs = [(s, s + 1) for s in range(1, args.seeds)]
        # crossval and the audit do not read `seed`: a seed-only change leaves them as they
        # were (DVC does not re-run them), so their gates compare identical outputs. Their
        # own noise is measured by changing `crossval.seed` (other folds, other heads and
        # out-of-fold classifiers) instead.
        base_data = (crossval_folds(data), audit_agreement(data))
        unchanged = {**crossval_verdicts(base_data[0], base_data[0]),
                     **audit_verdicts(base_data[1], base_data[1])}
        statuses = [judged(test_labels, runs[a], runs[b], args.replicates, unchanged)
                    for a, b in pairs]
        results["false_alarms"] = failure_rates(statuses)
        print(json.dumps(results["false_alarms"], indent=1), flush=True)
        by_seed = {s: (crossval_folds(data, seed=s), audit_agreement(data, seed=s))
                   for s in range(1, args.seeds + 1)}
        results["crossval_seed_false_alarms"] = failure_rates(
            [{name: {**crossval_verdicts(by_seed[a][0], by_seed[b][0]),
                     **audit_verdicts(by_seed[a][1], by_seed[b][1])} for name in LEVELS}
             for a, b in pairs], gates=CROSSVAL_GATES + AUDIT_GATES)
        results["crossval_val_accuracy_by_seed"] = [
            by_seed[s][0]["val_accuracy_mean"] for s in by_seed]
        results["label_agreement_by_crossval_seed"] = [
            float(by_seed[s][1]["agrees"].mean()) for s in by_seed]
        print("crossval.seed only:", json.dumps(results["crossval_seed_false_alarms"]),
              flush=True)
        results["detections"], results["effects"] = {}, {}
        for kind in args.changes.split(","):
            change = REGRESSIONS[kind]
            bad_runs, kind_statuses = {}, []
            for i in range(args.regressions):
                bad_runs[i], spent = revision(101 + i, data, args.replicates, change)
                data_gates = unchanged  # a fine-tuning param: crossval, audit do not re-run
                if change.get("shuffle"):  # other labels: both re-run on them
                    data_gates = data_verdicts(data, base_data, shuffled(
                        data.labels[data.parts["train"]], change["shuffle"], 101 + i))
                print(f"{kind} #{i}: accuracy per replicate "
                      f"{accuracies(bad_runs[i], test_labels)} ({spent:.1f} s); crossval "
                      f"and audit gates {data_gates}", flush=True)
                kind_statuses.append(judged(test_labels, runs[1 + i], bad_runs[i],
                                            args.replicates, data_gates))
            results["detections"][kind] = failure_rates(kind_statuses)
            results["effects"][kind] = effect(runs, bad_runs, test_labels)
            print(kind, json.dumps(results["effects"][kind]),
                  json.dumps(results["detections"][kind]), flush=True)
        results["seconds_per_revision_median"] = float(np.median(seconds))
    results["load_average_end"] = load_average()
    print(json.dumps(results, indent=1))
    if "gates" in args.parts:
        print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


CHANGES = {"seed": "seed only (seed i vs i + 1)",
           "crossval_seed": "`crossval.seed` only (i vs i + 1: other folds)",
           "lr_factor_10": "`finetune.lr_factor: 10`",
           "labels_shuffled_20pc": "20% of training labels shuffled",
           "labels_shuffled_50pc": "50% of training labels shuffled",
           "from_layer_30": "`finetune.from_layer: 30`"}


def markdown(results: dict) -> str:
    """The table of results.md: per change, its true effect and how often CI failed."""
    def shown(entry):
        low, high = entry["ci95"]
        return f"{entry['failed']}/{entry['of']} [{low:.3f}, {high:.3f}]"

    k = results["replicates"]
    gates = [f"recipe_K:{g['metric']}" for g in (*FINETUNED_GATES[:1], *CROSSVAL_GATES,
                                                  *AUDIT_GATES)]
    rows = [f"| change | pairs | effect on test accuracy [95% CI] | recipe level, {k} vs {k} "
            "replicates: CI failed [95% CI] | model level, one model each: CI failed | "
            "of which: test accuracy, crossval, label agreement (recipe level) |",
            "|---|---|---|---|---|---|"]

    def row(name, rates, effect="0 (by definition)"):
        which = ", ".join(f"{rates[g]['failed']}" for g in gates)
        return (f"| {name} | {rates['recipe_K:any']['of']} | {effect} | "
                f"{shown(rates['recipe_K:any'])} | {shown(rates['model_K1:any'])} | {which} |")

    rows.append(row(CHANGES["seed"], results["false_alarms"]))
    folds = results["crossval_seed_false_alarms"]
    rows.append(f"| {CHANGES['crossval_seed']} | {folds['recipe_K:any']['of']} | "
                f"0 (by definition) | {shown(folds['recipe_K:any'])} | "
                f"{shown(folds['model_K1:any'])} | "
                + ", ".join(["-"] + [f"{folds[g]['failed']}" for g in gates[1:]]) + " |")
    for kind, rates in results["detections"].items():
        effect = results["effects"][kind]
        low, high = effect["ci95"]
        rows.append(row(CHANGES[kind], rates,
                        f"{effect['accuracy_change']:+.3f} [{low:+.3f}, {high:+.3f}]"))
    return "\n".join(rows)


def failure_rates(statuses: list[dict], gates: list[dict] = DEFAULT_GATES) -> dict:
    """Per level, how often each gate (and any gate: CI fails) called a regression."""
    rates = {}
    for name in LEVELS:
        for gate in gates:
            failed = sum(s[name][gate["metric"]] == "regression" for s in statuses)
            rates[f"{name}:{gate['metric']}"] = rate(failed, len(statuses))
        failed_any = sum(any(v == "regression" for v in s[name].values()) for s in statuses)
        rates[f"{name}:any"] = rate(failed_any, len(statuses))
    return rates


if __name__ == "__main__":
    main()
