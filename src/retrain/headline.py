"""What `dvc metrics show` and `dvc exp show` display: the few figures people compare.

A stage measures far more than anyone compares at a glance: per-class precision and recall,
images per class and split, exclusions by reason, parameter counts, timings. Shown as DVC
metrics, they made about 150 columns, and the figures that decide between two runs were lost
among them. So every stage writes every figure it measured to its details file,
`reports/details/<stage>.json` (a DVC-cached output, so that the run-cache keeps every
stage: DVC leaves a stage with an uncached output that is neither metrics nor plots out of
it; the model card, `report`'s gates and people read it), and the stages whose figures
are compared also write the headline below to `metrics/<stage>.json` (what DVC shows): the
same keys and values, fewer of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

# Dotted key patterns of each stage's headline; `*` is any one key (a model, a format).
# Only numbers show in DVC's tables: the `*_ci95` [low, high] lists ride along for whoever
# reads the file, their bounds are columns only for test accuracy.
HEADLINE = {
    "crossval": ("val_accuracy_mean", "val_accuracy_sd"),
    "evaluate": ("*.test_loss", "*.test_accuracy", "*.test_accuracy_ci95",
                 "*.test_accuracy_ci95_low", "*.test_accuracy_ci95_high", "*.macro_f1",
                 "*.macro_f1_ci95",
                 "*.balanced_accuracy", "*.balanced_accuracy_ci95",
                 "*.leak_free_test_accuracy", "*.leak_free_test_accuracy_ci95"),
    "export": ("*.agreement", "*.agreement_ci95", "*.size_bytes", "*.latency_ms"),
    "audit": ("label_issues", "label_agreement", "near_duplicate_groups", "cross_split_groups",
              "outliers"),
}


def select(figures: dict, patterns: Iterable[str]) -> dict:
    """The entries of the nested dict `figures` whose dotted key matches a pattern, nested
    as they were (`*.macro_f1` keeps `{"head": {"macro_f1": ...}, "finetuned": {...}}`)."""
    patterns = [pattern.split(".") for pattern in patterns]

    def matches(path: list[str]) -> bool:
        return any(len(pattern) == len(path) and all(map(fnmatchcase, path, pattern))
                   for pattern in patterns)

    def keep(node: dict, path: list[str]) -> dict:
        kept = {}
        for key, value in node.items():
            if matches([*path, key]):
                kept[key] = value
            elif isinstance(value, dict) and (inner := keep(value, [*path, key])):
                kept[key] = inner
        return kept

    return keep(figures, [])


def evaluate_headline(figures: dict) -> dict:
    """`evaluate`'s headline; with more than one fine-tuning replicate, also their count and
    test accuracy's mean and sd (the training noise the recipe gates weigh)."""
    headline = select(figures, HEADLINE["evaluate"])
    spread = replicate_spread(figures.get("finetuned", {}).get("replicates"))
    if spread:
        headline["finetuned"]["replicates"] = spread
    return headline


def replicate_spread(replicates: dict | None) -> dict | None:
    """The spread people compare from evaluate's replicate figures: count and test accuracy's
    mean and sd; None for one replicate (no spread, and a mean that is test_accuracy again)."""
    if not replicates or replicates.get("count", 1) < 2:
        return None
    return {key: replicates[key] for key in ("count", "test_accuracy_mean", "test_accuracy_sd")}


def data_headline(figures: dict) -> dict:
    """`split`'s headline: how many classes and images made it in, and how many files not."""
    return {"classes": figures["classes"],
            "images": sum(split["total"] for split in figures["images"].values()),
            "excluded": figures["excluded"]["total"]}

