"""CI metric diff report: what changed against a base revision, and whether it is allowed to.

`dvc metrics diff` shows the numbers but never fails on them (treeverse/dvc#10408), so a pull
request that makes the model worse would pass CI. This command adds the missing gate: each
entry of `report.gates` in params.yaml names a metric, the direction that is better and an
absolute tolerance, and the command exits 1 when a gated metric gets worse by more than that.
The Markdown it writes is meant for a pull-request comment (`cml comment create`).

A test metric is noisy (retrain.uncertainty), so a fixed tolerance alone fails on noise and
misses real drops hidden in it. When both revisions predicted the same test images (matched by
content: the sha256 evaluate writes beside each path), each gated test figure of a model
(metrics/models/<model>.json) also gets a paired comparison on those files: the difference
with its paired bootstrap interval and, for accuracy, McNemar's exact test. A gate with a
`significance` level then fails only when the drop exceeds its tolerance *and* the paired
test calls it real at that level; without a shared test set the tolerance alone decides.
Two default gates weigh more than the test images: crossval's mean (the folds of both
revisions, Nadeau and Bengio's corrected t-test) and the audit's label agreement (every
image, paired by content whatever its label, McNemar's test), the gate for labels gone
wrong.

Exit status: 0 pass, 1 regression, 2 usage error (bad params, unknown revision, dvc failure).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd

from retrain import headline, uncertainty
from retrain.atomic import write_text
from retrain.errors import UserError, exits_cleanly
from retrain.params import load_params
from retrain.urls import redact

EXIT_PASS = 0
EXIT_REGRESSION = 1

# A change of exactly the tolerance passes; float noise (0.9 - 0.89 = 0.010000000000000009)
# must not turn it into a failure.
SLACK = 1e-9


class ReportError(UserError):
    """The report could not be made; exit 2 so CI tells it apart from a regression (1)."""

    exit_code = 2


# Every figure the stages measured, of which the metrics files hold the headline
# (retrain.headline): a gate may name a figure DVC does not show, e.g. a class's recall.
DETAILS = headline.DETAILS
# evaluate's figures, and each model's per-image predictions by its key in them.
EVALUATE_DETAILS = headline.details_file("evaluate")
PREDICTIONS = {"finetuned": "reports/predictions.csv", "head": "reports/predictions_head.csv"}
# Fine-tuning replicate k >= 1's predicted class in the predictions CSV (retrain.evaluate).
REPLICATE_COLUMN = "predicted_replicate_{}"
# crossval's per-fold scores, paired by fold for a gate on one of its `<score>_mean` figures
# (or their headline copies: metrics/crossval.json's `accuracy` is `val_accuracy_mean`).
CROSSVAL_DETAILS = headline.details_file("crossval")
# The audit's label_agreement, and its per-image table (each image's label and the class a
# classifier that never saw it predicts), paired by image for a gate on it.
AUDIT_DETAILS = headline.details_file("audit")
AUDIT_AGREEMENT = headline.AUDIT_ROWS["label_issues"]["agreement"]
AUDIT_LABELS = "reports/audit/label_issues.csv"


@dataclass(frozen=True)
class AddedImages:
    """The images only the workspace audited, against the base's agreement rate: a one-sided
    binomial test of "they agree with their labels no less often than the base's did"."""

    images: int
    agreeing: int
    base_rate: float
    pvalue: float


@dataclass(frozen=True)
class Evidence:
    """What the paired data say about one gated metric's change.

    For a model's test figures, `difference` and `mcnemar` exist only when both revisions
    predicted the same test files, the two revisions' own intervals whenever both
    predictions tables could be read; for the audit's label agreement, they are over the
    images both audits hold, and `added` tests the images only the workspace holds; for
    crossval's means, `folds` holds the fold test.
    """

    old_interval: list[float] | None
    new_interval: list[float] | None
    difference: uncertainty.PairedDifference | None = None
    mcnemar: uncertainty.McNemar | None = None
    # Recipe level: the fine-tuning replicates of both revisions on the paired images, or
    # the cross-validation folds of both paired by fold.
    recipe: uncertainty.RecipeDifference | None = None
    folds: uncertainty.FoldComparison | None = None
    over: str = ""  # what the paired test ran over, where not the test images
    added: AddedImages | None = None

    @property
    def paired(self) -> bool:
        return self.difference is not None or self.folds is not None

    def recipe_test(self):
        """The recipe-level test that weighs training noise, if one was measured."""
        if self.recipe is not None and self.recipe.training_noise_measured:
            return self.recipe
        return self.folds

    def drop_is_real(self, significance: float, direction: str, level: str = "recipe"
                     ) -> bool:
        """Whether the test rejects "no change" at `significance` in the worse direction.

        Recipe level (where the revisions have replicates or folds): the recipe test's p;
        crossval's folds decide at either level, being its only test. Model level, or where
        training noise was not measured: McNemar's exact test for accuracy, else the paired
        bootstrap interval (at confidence 1 - significance) lying wholly on the worse side
        of zero. With images only the workspace audited (`added`), McNemar's test and theirs
        each run at half the significance (Bonferroni), and either can call the drop real."""
        worse_sign = -1 if direction == "higher" else 1
        recipe = self.recipe_test() if level == "recipe" else None
        if recipe is None and self.difference is None and self.mcnemar is None:
            recipe = self.folds  # crossval's folds: the one test there is, at either level
        if recipe is not None:
            return bool(np.sign(recipe.difference) == worse_sign) and \
                recipe.pvalue < significance
        if self.mcnemar is not None:
            got_worse = np.sign(self.mcnemar.new_only - self.mcnemar.base_only) == worse_sign
            if self.added is None:
                return bool(got_worse) and self.mcnemar.pvalue < significance
            return (bool(got_worse) and self.mcnemar.pvalue < significance / 2) or \
                self.added.pvalue < significance / 2
        low, high = self.difference.interval
        return high < 0 if worse_sign < 0 else low > 0


@dataclass(frozen=True)
class GateResult:
    """One gate checked against one metrics file."""

    metric: str
    path: str
    direction: str
    tolerance: float
    old: float | None
    new: float | None
    significance: float | None = None
    evidence: Evidence | None = None
    level: str = "recipe"  # or "model": which test a significance applies to
    off: bool = False  # the file's stage is turned off in the workspace (`enabled: false`)

    @property
    def change(self) -> float | None:
        if self.old is None or self.new is None:
            return None
        return self.new - self.old

    @property
    def status(self) -> str:
        """`pass`, `regression`, `not significant` (worse beyond the tolerance, but the paired
        test does not call the drop real), `new` (no base value) or `missing` (no value now).

        A metric that vanished from the workspace fails: the gate can no longer be checked,
        which is exactly what a broken evaluate stage looks like. One that is new passes,
        since the pull request that introduces a metric has nothing to compare with. `off`:
        the stage that writes it is turned off in the workspace (e.g. `crossval.folds: 0`)
        and was off (or absent) at the base too: nothing to check, and the verdict says so.
        `turned off`: the base had the figure and the workspace turned its stage off, which
        fails, or a pull request could switch off the checks it would fail.
        """
        if self.off:
            return "off" if self.old is None else "turned off"
        if self.new is None or math.isnan(self.new):
            return "missing"
        if self.old is None:
            return "new"
        worse = -self.change if self.direction == "higher" else self.change
        if worse <= self.tolerance + SLACK:
            return "pass"
        if self.significance is None or self.evidence is None or not self.evidence.paired:
            return "regression"
        if self.evidence.drop_is_real(self.significance, self.direction, self.level):
            return "regression"
        return "not significant"

    @property
    def passed(self) -> bool:
        return self.status in ("pass", "new", "not significant", "off")

    @property
    def confidence(self) -> float:
        """The paired interval's level: 1 - significance, so that it excludes zero exactly
        when the gate calls a drop real."""
        return 1 - self.significance if self.significance else uncertainty.CONFIDENCE


@dataclass(frozen=True)
class Report:
    markdown: str
    verdict: str
    passed: bool


# --- dvc -----------------------------------------------------------------------------------


class _Dvc:
    """One `dvc ARGS --json` run in repo_dir, started now and read later.

    The report needs three dvc commands of about a second each, mostly interpreter start-up;
    they only read the repository, so they run side by side. dvc runs under this interpreter
    so the report sees the dvc installed next to it, not whichever is first on PATH.
    """

    def __init__(self, args: list[str], repo_dir: str | Path):
        self.name = "dvc " + " ".join(args)
        cmd = [sys.executable, "-m", "dvc", *args, "--json"]
        try:
            self.proc = subprocess.Popen(
                cmd, cwd=repo_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        except OSError as exc:
            raise ReportError(f"could not run dvc in {repo_dir}: {exc.strerror}") from None

    def result(self) -> tuple[dict[str, Any], str]:
        """The parsed JSON output and dvc's stderr; a failure becomes a ReportError."""
        stdout, stderr = self.proc.communicate()
        if self.proc.returncode != 0:
            raise ReportError(f"{self.name}: {_last_line(stderr)}")
        try:
            return json.loads(stdout or "{}"), stderr
        except json.JSONDecodeError:
            raise ReportError(f"{self.name}: output is not JSON") from None

    def stop(self) -> None:
        """Reap the process; one still running after another failed is no longer needed."""
        if self.proc.returncode is None:
            self.proc.kill()
            self.proc.communicate()


def _last_line(stderr: str) -> str:
    """dvc ends its error output with a support link; the message is the ERROR line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    line = (errors or lines or ["failed without a message"])[-1]
    return line.removeprefix("ERROR:").strip()


def _load_warnings(stderr: str) -> list[str]:
    """dvc reports an unreadable metrics file on stderr and carries on with a null value."""
    return [line.strip() for line in stderr.splitlines() if "failed to load" in line]


# --- gates ---------------------------------------------------------------------------------


def _number(value: Any, metric: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReportError(f"gated metric {metric}: expected a number, got {value!r}")
    return float(value)


def _matches(metrics: dict[str, dict], metric: str) -> list[tuple[str, dict]]:
    """Entries for `key` in every metrics file that has it, or for `file:key` in that file."""
    path, sep, key = metric.rpartition(":")
    if sep:
        entry = metrics.get(path, {}).get(key)
        return [(path, entry)] if entry else []
    return [(path, keys[metric]) for path, keys in metrics.items() if metric in keys]


def _present(metrics: dict[str, dict], metric: str) -> list[tuple[str, dict]]:
    return [(path, entry) for path, entry in _matches(metrics, metric)
            if entry.get("old") is not None or entry.get("new") is not None]


def _turned_off(diffs: dict[str, dict], metric: str) -> bool:
    """Whether a gate naming its file (`file:key`, a headline or a details file) finds that
    file saying its stage is off in the workspace (`{"enabled": false}`, as crossval and
    audit write in each of their files when turned off)."""
    path, sep, _ = metric.rpartition(":")
    return bool(sep) and (diffs.get(path, {}).get("enabled") or {}).get("new") is False


def _with_base_from_details(path: str, key: str, entry: dict,
                            details: dict[str, dict]) -> dict:
    """A headline figure the base does not have (written before the headline held it, in
    another layout) takes the base's value of the stage figure it copies, so that the gate
    still compares the two revisions."""
    source = headline.copied_from(path, key)
    if entry.get("old") is not None or source is None:
        return entry
    return {**entry, "old": (details.get(source[0], {}).get(source[1]) or {}).get("old")}


def check_gates(metrics: dict[str, dict], gates: list[dict], base: str,
                details: dict[str, dict] | None = None) -> list[GateResult]:
    """Evaluate each gate against `dvc metrics diff --all --json` output: the metrics files
    DVC shows, then, for a metric none of them holds, `details` (the same diff over the
    stages' details files)."""
    details = details or {}
    both = {**details, **metrics}
    results = []
    for gate in gates:
        name = gate["metric"]
        named_path, _, key = name.rpartition(":")
        if _turned_off(both, name):
            old = (both.get(named_path, {}).get(key) or {}).get("old")
            results.append(GateResult(name, named_path, gate["direction"],
                                      float(gate["tolerance"]),
                                      _number(old, name), None, gate.get("significance"),
                                      level=gate.get("level", "recipe"), off=True))
            continue
        found = ([(path, _with_base_from_details(path, key, entry, details))
                  for path, entry in _present(metrics, name)]
                 or _present(details, name))
        if not found:
            raise ReportError(f"gated metric {name}: found neither in {base} nor in the workspace")
        for path, entry in found:
            results.append(
                GateResult(
                    metric=name,
                    path=path,
                    direction=gate["direction"],
                    tolerance=float(gate["tolerance"]),
                    old=_number(entry.get("old"), name),
                    new=_number(entry.get("new"), name),
                    significance=gate.get("significance"),
                    level=gate.get("level", "recipe"),
                )
            )
    return results


# --- paired comparisons ------------------------------------------------------------------


# How two revisions' test images are matched. By content: a file re-encoded or replaced under
# the same name is another image, a renamed one the same; identical copies (one class may hold
# the same bytes twice) match in path order. By file name only when a table lacks the sha256
# column (written before evaluate recorded it).
BY_CONTENT = ("sha256", "copy")
BY_NAME = ("path",)


@dataclass(frozen=True)
class TestSets:
    """One model's predictions at the base and in the workspace, aligned by test image.

    `base` and `new` are None, and `note` says why, when a table cannot be read; otherwise
    `note` says why images were matched by file name, if they were. The sets are paired when
    both predicted exactly the same images with the same labels; `shared` counts the images
    (same `key` and label) they have in common.
    """

    model: str
    base: pd.DataFrame | None = None
    new: pd.DataFrame | None = None
    shared: int = 0
    note: str = ""
    key: tuple[str, ...] = BY_CONTENT

    @property
    def paired(self) -> bool:
        return (self.base is not None and self.new is not None
                and self.shared == len(self.base) == len(self.new) > 0)


def _read_predictions(text: str, where: str) -> pd.DataFrame | str:
    """The path, actual and predicted columns of an evaluate predictions CSV, with sha256 and
    each sha256's copy number where it has them; or why not."""
    table = _read_csv(text, where, "a predictions CSV", ["path", "actual", "predicted"])
    if isinstance(table, str):
        return table
    if table["path"].duplicated().any():
        return f"{where} names a test file twice"
    replicates = _replicate_columns(table)
    if "sha256" not in table.columns:
        return table[["path", "actual", "predicted", *replicates]]
    return _with_copy_numbers(table[["path", "sha256", "actual", "predicted", *replicates]])


def _read_csv(text: str, where: str, what: str, columns: list[str]) -> pd.DataFrame | str:
    """A CSV's text as strings, holding at least `columns`; or why not."""
    try:
        table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return f"{where} is not {what}"
    if not set(columns) <= set(table.columns):
        return f"{where} lacks the {', '.join(columns[:-1])} and {columns[-1]} columns"
    return table


def _with_copy_numbers(table: pd.DataFrame) -> pd.DataFrame:
    """`table` with each sha256's copy number (in path order): identical copies, which one
    class may hold, pair one to one."""
    return table.assign(copy=table.sort_values("path").groupby("sha256").cumcount())


def _replicate_columns(table: pd.DataFrame) -> list[str]:
    """evaluate's columns of fine-tuning replicates 1, 2, ... (`predicted` is replicate 0)."""
    columns, index = [], 1
    while (name := REPLICATE_COLUMN.format(index)) in table.columns:
        columns.append(name)
        index += 1
    return columns


def _base_text(base: str, path: str, repo_dir: Path) -> str | None:
    """A `cache: false` output as committed at `base` (git tracks those), or None."""
    done = subprocess.run(["git", "show", f"{base}:{path}"], cwd=repo_dir,
                          capture_output=True, check=False)
    return done.stdout.decode("utf-8", "replace") if done.returncode == 0 else None


def load_test_sets(model: str, base: str, repo_dir: str | Path) -> TestSets:
    """Both revisions' predictions of `model` (head or finetuned)."""
    repo_dir, path = Path(repo_dir), PREDICTIONS[model]
    base_text = _base_text(base, path, repo_dir)
    if base_text is None:
        return TestSets(model, note=f"{path} is not committed at {base}")
    try:
        new_text = (repo_dir / path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return TestSets(model, note=f"{path} is missing in the workspace")
    old = _read_predictions(base_text, f"{path} at {base}")
    new = _read_predictions(new_text, f"{path} in the workspace")
    for table in (old, new):
        if isinstance(table, str):
            return TestSets(model, note=table)
    lacking = [where for table, where in ((old, f"`{path}` at `{base}`"),
                                          (new, f"`{path}` in the workspace"))
               if "sha256" not in table.columns]
    key = BY_NAME if lacking else BY_CONTENT
    note = (f"no sha256 column in {' or '.join(lacking)} (written before evaluate recorded "
            "it), so a file replaced under the same name counts as the same image"
            if lacking else "")
    matched = [*key, "actual"]
    shared = len(old.merge(new[matched], on=matched))
    return TestSets(model, old, new, shared, note, key)


def _class_indices(*columns: pd.Series) -> list[np.ndarray]:
    names = sorted(set().union(*(set(column) for column in columns)))
    index = {name: i for i, name in enumerate(names)}
    return [column.map(index).to_numpy(np.int64) for column in columns]


def stage_figure(result: GateResult) -> tuple[str, str]:
    """The stage figure a gate read (retrain.headline.stage_figure)."""
    return headline.stage_figure(result.path, result.metric.rpartition(":")[2])


def gather_evidence(result: GateResult, test_sets: TestSets) -> Evidence | None:
    """The intervals and paired test for a gate on a model's test metric; None when the
    predictions cannot tell (unreadable tables, or a metric without an interval)."""
    metric = stage_figure(result)[1].split(".", 1)[-1]
    if test_sets.base is None or metric not in uncertainty.METRICS:
        return None
    old, new = test_sets.base, test_sets.new
    old_labels, old_predicted, new_labels, new_predicted = _class_indices(
        old["actual"], old["predicted"], new["actual"], new["predicted"])
    evidence = Evidence(uncertainty.metric_interval(metric, old_labels, old_predicted),
                        uncertainty.metric_interval(metric, new_labels, new_predicted))
    if not test_sets.paired:
        return evidence
    aligned = old[list(test_sets.key)].merge(new, on=list(test_sets.key), how="left")
    base_columns = ["predicted", *_replicate_columns(old)]
    new_columns = ["predicted", *_replicate_columns(aligned)]
    labels, *indexed = _class_indices(old["actual"], *(old[c] for c in base_columns),
                                      *(aligned[c] for c in new_columns))
    base_replicates = np.array(indexed[:len(base_columns)])
    new_replicates = np.array(indexed[len(base_columns):])
    base_predicted, new_predicted = base_replicates[0], new_replicates[0]
    difference = uncertainty.paired_difference(metric, labels, base_predicted, new_predicted,
                                               result.confidence)
    mcnemar = (uncertainty.mcnemar_exact(base_predicted == labels, new_predicted == labels)
               if metric == "test_accuracy" else None)
    recipe = uncertainty.recipe_difference(metric, labels, base_replicates, new_replicates,
                                           result.confidence)
    return replace(evidence, difference=difference, mcnemar=mcnemar, recipe=recipe)


def fold_evidence(result: GateResult, old: dict, new: dict) -> Evidence | None:
    """For a gate on crossval's `<score>_mean`: both revisions' per-fold scores (`old`,
    `new`: crossval's details as the stage writes them) paired by fold (Nadeau and
    Bengio's corrected t-test), when both ran as many folds and repeats; None otherwise.

    The folds are the same when both details carry the same `folds_digest` (which images
    each fold validated on). With another `crossval.seed`, or other images or labels, they
    differ and fold j of one side is paired with fold j of the other: the pairing then
    removes none of the fold-to-fold variance, which the differences' spread counts in
    full, so the test is conservative (it loses power; it does not call noise real more
    often). `FoldComparison.same_folds` says which case it was."""
    score = stage_figure(result)[1].removesuffix("_mean")
    old_scores = (old.get("per_fold") or {}).get(score)
    new_scores = (new.get("per_fold") or {}).get(score)
    if not (isinstance(old_scores, list) and isinstance(new_scores, list)
            and len(old_scores) == len(new_scores) > 1
            and all(old.get(key) == new.get(key) for key in ("folds", "repeats"))):
        return None
    folds = uncertainty.corrected_resampled_ttest(
        old_scores, new_scores, int(new["folds"]), result.confidence,
        same_folds=old.get("folds_digest") is not None
        and old.get("folds_digest") == new.get("folds_digest"))
    return Evidence(None, None, folds=folds)


def crossval_evidence(result: GateResult, base: str, repo_dir: str | Path) -> Evidence | None:
    """`fold_evidence` for a gate on metrics/crossval.json, from crossval's details at
    `base` and in the workspace. They are read here, not taken from `dvc metrics diff`,
    which leaves lists such as the per-fold scores out."""
    path, key = stage_figure(result)
    if not (path == CROSSVAL_DETAILS and key.endswith("_mean")):
        return None
    texts = _both_revisions(CROSSVAL_DETAILS, base, repo_dir)
    try:
        old, new = (json.loads(text) for text in texts) if texts else (None, None)
    except json.JSONDecodeError:
        return None
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return None
    return fold_evidence(result, old, new)


def _both_revisions(path: str, base: str, repo_dir: str | Path) -> tuple[str, str] | None:
    """A DVC-cached output's text at `base` and in the workspace; None if either cannot
    be read (the gate then falls back to its tolerance)."""
    base_text = _base_output(base, path, Path(repo_dir))
    try:
        new_text = (Path(repo_dir) / path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return None if base_text is None else (base_text, new_text)


def _read_agreement(text: str, where: str) -> pd.DataFrame | str:
    """Per image of an audit table (sha256, its copy number, whether the label is the
    class predicted without it: `agrees`), or why not."""
    table = _read_csv(text, where, "an audit table", ["path", "sha256", "label", "suggested_label"])
    if isinstance(table, str):
        return table
    table = _with_copy_numbers(table.assign(agrees=table["label"] == table["suggested_label"]))
    return table[["sha256", "copy", "label", "agrees"]]


def agreement_evidence(old: pd.DataFrame, new: pd.DataFrame, confidence: float) -> Evidence:
    """Two revisions' audit tables (`_read_agreement`) paired by image content: the
    paired interval of the agreement's change and McNemar's exact test on the images that
    agree with their label in one revision only. Unlike the test images, an image whose
    label changed is still the same image: that change is what this gate is for."""
    def interval(agrees):
        return uncertainty.metric_interval("test_accuracy", np.ones(len(agrees), int),
                                           agrees.astype(int))

    aligned = old.merge(new, on=["sha256", "copy"], suffixes=("_old", "_new"))
    evidence = Evidence(interval(old["agrees"].to_numpy()), interval(new["agrees"].to_numpy()),
                        added=_added_images(old, new))
    if len(aligned) < 2:
        return replace(evidence, over="no image in both audits")
    base, now = (aligned[f"agrees_{side}"].to_numpy() for side in ("old", "new"))
    difference = uncertainty.paired_difference(
        "test_accuracy", np.ones(len(aligned), int), base.astype(int), now.astype(int),
        confidence)
    relabelled = (aligned["label_old"] != aligned["label_new"]).to_numpy()
    lost, gained = base & ~now, ~base & now
    over = (f"over the {len(aligned)} images both revisions audited: agreement lost by "
            f"{lost.sum()} ({(lost & relabelled).sum()} relabelled), gained by {gained.sum()} "
            f"({(gained & relabelled).sum()} relabelled)")
    return replace(evidence, difference=difference, mcnemar=uncertainty.mcnemar_exact(base, now),
                   over=over)


def _added_images(old: pd.DataFrame, new: pd.DataFrame) -> AddedImages | None:
    """The images only `new` holds, tested against `old`'s agreement rate; None if none."""
    from scipy.stats import binomtest

    added = new.merge(old[["sha256", "copy"]], on=["sha256", "copy"], how="left",
                      indicator=True)
    added = added[added["_merge"] == "left_only"]
    if added.empty or old.empty:
        return None
    rate, agreeing = float(old["agrees"].mean()), int(added["agrees"].sum())
    pvalue = binomtest(agreeing, len(added), rate, alternative="less").pvalue if rate else 1.0
    return AddedImages(len(added), agreeing, rate, float(pvalue))


def _base_output(base: str, path: str, repo_dir: Path) -> str | None:
    """A DVC-cached output as it was at `base` (from the cache or the default remote, as
    `dvc metrics diff` reads the details files), or None when DVC cannot read it."""
    import dvc.api

    try:
        return dvc.api.read(path, repo=str(repo_dir), rev=base, encoding="utf-8")
    except Exception:  # noqa: BLE001  (not in the cache, no remote, a remote's own errors)
        # Evidence only sharpens a gate: without it the tolerance decides, as the verdict
        # says ("no paired test"), and the report must not stop on the way.
        return None


def label_agreement_evidence(result: GateResult, base: str,
                             repo_dir: str | Path) -> Evidence | None:
    """For a gate on the audit's label_agreement: both revisions' audit tables paired by
    image (`agreement_evidence`); None where either cannot be read."""
    if stage_figure(result) != (AUDIT_DETAILS, AUDIT_AGREEMENT):
        return None
    texts = _both_revisions(AUDIT_LABELS, base, repo_dir)
    if texts is None:
        return None
    old, new = (_read_agreement(text, f"{AUDIT_LABELS} {where}")
                for text, where in zip(texts, (f"at {base}", "in the workspace"), strict=True))
    if isinstance(old, str) or isinstance(new, str):
        return None
    return agreement_evidence(old, new, result.confidence)


def _evaluated_model(result: GateResult) -> str | None:
    """`finetuned` for a gate on one of the fine-tuned model's test figures (headline or
    details), else None."""
    path, key = stage_figure(result)
    model = key.split(".", 1)[0]
    return model if path == EVALUATE_DETAILS and model in PREDICTIONS else None


def add_evidence(results: list[GateResult], base: str, repo_dir: str | Path
                 ) -> tuple[list[GateResult], dict[str, TestSets]]:
    """Each gate with its evidence, and the test sets read for them (by model). crossval's
    per-fold scores and the audit's tables are read at `base` and in the workspace."""
    test_sets = {model: load_test_sets(model, base, repo_dir)
                 for model in dict.fromkeys(filter(None, map(_evaluated_model, results)))}

    def evidence(r: GateResult) -> Evidence | None:
        if r.off:
            return None
        if model := _evaluated_model(r):
            return gather_evidence(r, test_sets[model])
        return crossval_evidence(r, base, repo_dir) or label_agreement_evidence(
            r, base, repo_dir)

    return [replace(r, evidence=evidence(r)) for r in results], test_sets


# --- figures -------------------------------------------------------------------------------


def _under(path: str, folder: str) -> bool:
    folder = folder.rstrip("/")
    return path.rstrip("/") == folder or path.startswith(folder + "/")


def _dvc_changed(diff: dict[str, Any], repo_dir: Path, figures_dir: str) -> set[str]:
    """Changed DVC-tracked files under figures_dir.

    `dvc diff` lists files inside a tracked folder only when the base's folder listing is in
    the local cache; on a fresh CI checkout it names just the folder, so then every figure in
    it counts as changed.
    """
    entries = [e["path"] for kind in ("added", "modified") for e in diff.get(kind, [])]
    entries += [e["path"]["new"] for e in diff.get("renamed", [])]
    entries = [p for p in entries if _under(p, figures_dir)]
    files = {p for p in entries if not p.endswith("/")}
    for folder in (p for p in entries if p.endswith("/")):
        if not any(_under(f, folder) for f in files):
            files |= {p.relative_to(repo_dir).as_posix() for p in (repo_dir / folder).rglob("*")}
    return files


def _git_changed(base: str, repo_dir: Path, figures_dir: str) -> set[str]:
    """Changed git-tracked and new untracked files under figures_dir (`cache: false` plots)."""
    commands = [
        ["git", "diff", "--name-only", base, "--", figures_dir],
        ["git", "ls-files", "--others", "--exclude-standard", "--", figures_dir],
    ]
    files: set[str] = set()
    for cmd in commands:
        done = subprocess.run(cmd, cwd=repo_dir, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ReportError(f"{' '.join(cmd[:2])}: {_last_line(done.stderr)}")
        files |= {line for line in done.stdout.splitlines() if line}
    return files


def changed_figures(
    base: str, repo_dir: str | Path, figures_dir: str, dvc_diff: dict[str, Any] | None = None
) -> list[str]:
    """PNG paths (relative to repo_dir) under figures_dir that differ from `base`.

    dvc_diff is `dvc diff --json base` output when the caller already has it.
    """
    repo_dir = Path(repo_dir)
    figures_dir = PurePosixPath(figures_dir).as_posix()
    if dvc_diff is None:
        dvc_diff = _Dvc(["diff", base], repo_dir).result()[0]
    files = _dvc_changed(dvc_diff, repo_dir, figures_dir)
    files |= _git_changed(base, repo_dir, figures_dir)
    return sorted(p for p in files if p.lower().endswith(".png") and (repo_dir / p).is_file())


# --- markdown ------------------------------------------------------------------------------


def _fmt(value: Any, sign: bool = False) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:+.4g}" if sign else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool) and sign:
        return f"{value:+d}"
    return str(value)


def _cell(value: Any, sign: bool = False) -> str:
    return _fmt(value, sign).replace("|", "\\|").replace("\n", " ")


def _change(old: Any, new: Any) -> Any:
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (old, new))
    return new - old if numbers else None


def _table(header: list[str], rows: list[list[str]], empty: str) -> list[str]:
    if not rows:
        return [empty]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _interval(interval: list[float] | None) -> str:
    return "—" if interval is None else f"[{_fmt(interval[0])}, {_fmt(interval[1])}]"


def _evidence_words(r: GateResult) -> str:
    """`95% paired interval [a, b], McNemar p = 0.03`, or why the tolerance alone decides."""
    e = r.evidence
    if e is None:
        # A gate's significance applies only where a paired test exists (a model's test
        # figures with intervals, crossval's means, the audit's label agreement); say so
        # rather than let the level suggest a test ran.
        return "no paired test for this metric: tolerance only" if r.significance else ""
    if not e.paired:
        return f"{e.over or 'test sets differ'}: tolerance only"
    if e.folds is not None:
        paired = "paired by fold" if e.folds.same_folds else \
            "other folds (crossval.seed or the images changed), paired by position"
        return (f"corrected resampled t-test over {e.folds.pairs} folds {paired}: "
                f"{r.confidence:.0%} interval {_interval(e.folds.interval)}, "
                f"p = {e.folds.pvalue:.3g}")
    recipe = e.recipe_test() if r.level == "recipe" else None
    if recipe is not None:
        return (f"recipe test over {recipe.base_replicates} vs {recipe.new_replicates} "
                f"replicates and the test images: {r.confidence:.0%} interval "
                f"{_interval(recipe.interval)} of the replicate means' change "
                f"{_fmt(recipe.difference, sign=True)}, p = {recipe.pvalue:.3g}, training sd "
                f"{_fmt(recipe.training_sd)}; one model each: paired interval "
                f"{_interval(e.difference.interval)}"
                + (f", McNemar p = {e.mcnemar.pvalue:.3g}" if e.mcnemar is not None else ""))
    words = f"{r.confidence:.0%} paired interval {_interval(e.difference.interval)}"
    if e.mcnemar is not None:
        words += f", McNemar p = {e.mcnemar.pvalue:.3g}"
    words += f" ({e.over})" if e.over else ""
    if e.added is not None:
        a = e.added
        words += (f"; the {a.images} images only in the workspace: {a.agreeing} agree "
                  f"({a.agreeing / a.images:.1%} against the base's {a.base_rate:.1%}), "
                  f"binomial p = {a.pvalue:.3g}; each test at half the significance")
    return words


def _detectable_words(r: GateResult) -> str:
    """What a recipe test's "not significant" cannot rule out: the smallest change the gate
    catches 80% of the time with these replicates (or folds) and test images (its test's
    detectable change, or the tolerance where that is larger)."""
    recipe = r.evidence.recipe_test() if r.evidence is not None and r.level == "recipe" \
        else None
    if recipe is None:
        return ""
    more = "crossval repeats" if isinstance(recipe, uncertainty.FoldComparison) \
        else "replicates or test images"
    # A change within the tolerance passes whatever the test says.
    smallest = max(recipe.detectable(r.significance), r.tolerance)
    return (f"; this comparison catches a change of {_fmt(smallest)} "
            f"or more {uncertainty.POWER:.0%} of the time: a smaller one needs more {more}")


def _training_noise_note(results: list[GateResult]) -> str:
    """Said after the verdict when a recipe gate could judge one model of each side only."""
    unmeasured = [r for r in results if r.level == "recipe" and r.evidence is not None
                  and r.evidence.recipe is not None
                  and not r.evidence.recipe.training_noise_measured]
    if not unmeasured:
        return ""
    return (" (training noise not measured: one fine-tuning replicate per revision, so "
            "the paired tests compare two models, and a seed's luck can pass for a change "
            "of recipe; `finetune.replicates` >= 3 measures it)")


def _verdict(results: list[GateResult]) -> str:
    return _gate_verdict(results) + _training_noise_note(results)


def _gate_verdict(results: list[GateResult]) -> str:
    failed = [r for r in results if not r.passed]
    if not failed:
        checked = f"{sum(r.status != 'off' for r in results)} checked"
        verdict = f"✅ **pass**: no gated metric got worse beyond its tolerance ({checked})"
        off = [r for r in results if r.status == "off"]
        if off:
            verdict += "; not checked, their stage is off (`enabled: false`): " + ", ".join(
                f"`{r.metric}`" for r in off)
        noise = [r for r in results if r.status == "not significant"]
        if noise:
            verdict += "; not significant: " + "; ".join(
                f"`{r.metric}` {_fmt(r.change, sign=True)} ({_evidence_words(r)}, "
                f"significance {_fmt(r.significance)}{_detectable_words(r)})" for r in noise)
        return verdict
    parts = []
    for r in failed:
        where = f"`{r.metric}` ({r.path})"
        if r.status == "missing":
            parts.append(f"{where} is missing in the workspace (was {_fmt(r.old)})")
            continue
        if r.status == "turned off":
            parts.append(f"{where} not checked: this revision turned its stage off "
                         f"(`enabled: false`; was {_fmt(r.old)})")
            continue
        evidence = _evidence_words(r)
        rule = f"tolerance {_fmt(r.tolerance)}"
        if r.significance is not None:
            rule += f", significance {_fmt(r.significance)}"
        parts.append(
            f"{where} {_fmt(r.old)} → {_fmt(r.new)} ({_fmt(r.change, sign=True)}"
            + (f", {evidence}" if evidence else "")
            + f"; {rule}, {r.direction} is better)"
        )
    return "❌ **regression**: " + "; ".join(parts)


def _params_section(params: dict[str, dict]) -> list[str]:
    rows = [
        [f"`{path}`", f"`{key}`",
         _cell(_shown(key, e.get("old"))), _cell(_shown(key, e.get("new")))]
        for path, keys in sorted(params.items())
        for key, e in sorted(keys.items())
    ]
    return ["## Params changed", ""] + _table(
        ["file", "param", "old", "new"], rows, "No params changed."
    )


def _shown(key: str, value):
    """A param as the report prints it: a URL's password and query values hidden."""
    return redact(value, value) if key == "data.url" and isinstance(value, str) else value


def _metrics_section(metrics: dict[str, dict]) -> list[str]:
    rows = [
        [
            f"`{path}`",
            f"`{key}`",
            _cell(e.get("old")),
            _cell(e.get("new")),
            _cell(_change(e.get("old"), e.get("new")), sign=True),
        ]
        for path, keys in sorted(metrics.items())
        for key, e in sorted(keys.items())
        if e.get("old") != e.get("new")
    ]
    return ["## Metrics changed", ""] + _table(
        ["file", "metric", "old", "new", "change"], rows, "No metrics changed."
    )


RESULT_MARKS = {"pass": "✅", "new": "✅ new", "not significant": "✅ not significant",
                "regression": "❌", "missing": "❌ missing", "off": "✅ off",
                "turned off": "❌ turned off"}


def _with_interval(value: float | None, interval: list[float] | None) -> str:
    return _cell(value) + ("" if interval is None else " " + _cell(_interval(interval)))


def _gates_section(results: list[GateResult]) -> list[str]:
    rows = []
    for r in results:
        e = r.evidence
        change = _cell(r.change, sign=True)
        if e is not None and e.paired:
            tested = e.difference or e.folds
            change += " " + _cell(_interval(tested.interval))
        mcnemar = e.mcnemar if e is not None else None
        rows.append([
            f"`{r.metric}`",
            f"`{r.path}`",
            f"{r.direction} is better",
            _cell(r.tolerance),
            _cell(r.significance),
            _with_interval(r.old, e.old_interval if e else None),
            _with_interval(r.new, e.new_interval if e else None),
            change,
            "—" if mcnemar is None else
            f"{mcnemar.pvalue:.3g} ({mcnemar.base_only} vs {mcnemar.new_only})",
            RESULT_MARKS[r.status],
        ])
    header = ["metric", "file", "direction", "tolerance", "significance", "old", "new",
              "change", "McNemar p", "result"]
    lines = ["## Gates", ""] + _table(header, rows, "No gates configured.")
    if any(r.evidence is not None for r in results):
        lines += ["", "Old and new: 95% bootstrap interval over each revision's test images. "
                  "Change: paired bootstrap interval over the test images both predicted, at "
                  "1 − significance (95% without one). McNemar p: exact test on the images "
                  "exactly one revision gets right (right only at the base vs only now). A "
                  "gate with a significance fails when the metric is worse beyond its "
                  "tolerance and the paired test calls the drop real (p or the interval's "
                  "level); without a shared test set the tolerance alone decides."]
    if any(r.evidence is not None and r.evidence.over for r in results):
        lines += ["", "Label agreement (the audit): old and new over each revision's audited "
                  "images; change over the images both audited, paired by content whatever "
                  "their label; McNemar p on the images whose label stopped vs started "
                  "agreeing with the audit's out-of-fold classifier, beside a binomial test "
                  "of the images only the workspace audited."]
    if any(r.evidence is not None and r.evidence.recipe_test() is not None for r in results):
        lines += ["", "Recipe gates (`level: recipe`, the default) decide by the test that "
                  "also weighs training noise: fine-tuning replicates of both revisions "
                  "(mean change, its interval over the test images and the seeds, t-test) "
                  "or crossval's folds paired by fold (by position where the folds "
                  "differ; Nadeau and Bengio's corrected resampled t-test). The paired "
                  "change and McNemar p compare one model of each (replicate 0: the "
                  "shipped one); `level: model` gates on those."]
    return lines


def _test_sets_section(test_sets: dict[str, TestSets]) -> list[str]:
    lines = []
    for model, sets in test_sets.items():
        path = PREDICTIONS[model]
        if sets.base is None:
            lines.append(f"- `{model}`: no paired comparison, {sets.note}; gates use their "
                         "tolerance alone.")
        elif sets.paired:
            lines.append(f"- `{model}`: both revisions predicted the same {sets.shared} test "
                         f"images (`{path}`), matched {_matched_by(sets)}: changes are paired.")
        else:
            lines.append(f"- `{model}`: **unpaired**, the test sets differ: {sets.shared} "
                         f"images paired {_matched_by(sets)} with the same label, "
                         f"{len(sets.base) - sets.shared} only at the base and "
                         f"{len(sets.new) - sets.shared} only in the workspace; the paired "
                         "tests need the same images on both sides, so gates use their "
                         "tolerance alone, each revision's own interval is shown.")
        if sets.base is not None and sets.key == BY_NAME:
            lines.append(f"  Paired by file name: {sets.note}.")
    return ["## Test sets", ""] + lines if lines else []


def _matched_by(sets: TestSets) -> str:
    return "by content (sha256)" if sets.key == BY_CONTENT else "by file name"


def _figures_section(figures: list[str], link_prefix: str) -> list[str]:
    """Changed figures, folded: a run renders a dozen of them, too many to show unasked."""
    lines = ["## Changed figures", ""]
    if not figures:
        return lines + ["No figures changed."]
    lines += ["<details>", f"<summary>{len(figures)} changed</summary>", ""]
    for path in figures:
        link = quote(PurePosixPath(link_prefix, path).as_posix())
        lines += [f"### `{path}`", "", f"![{PurePosixPath(path).name}]({link})", ""]
    return lines + ["</details>"]


def _figures_or_why_not(
    run: _Dvc, base: str, repo_dir: str | Path, figures_dir: str, link_prefix: str
) -> list[str]:
    """The figures section, or why it is missing.

    The figures only illustrate the report: failing to list them must not hide the verdict.
    """
    try:
        figures = changed_figures(base, repo_dir, figures_dir, run.result()[0])
    except ReportError as exc:
        return ["## Changed figures", "", f"Could not list changed figures: {exc}"]
    return _figures_section(figures, link_prefix)


def compose_report(
    base: str,
    gates: list[dict],
    repo_dir: str | Path = ".",
    figures_dir: str = "reports/figures",
    link_prefix: str = ".",
    context: str = "",
) -> Report:
    """Collect the diffs, check the gates and lay out the Markdown.

    link_prefix is the path from where the Markdown will live to repo_dir, so that the image
    links resolve for `cml comment create`, which uploads the local images it finds. context
    says what the compared runs were made on (CI: the real data or the small profile).
    """
    runs = [
        _Dvc(["metrics", "diff", "--all", base], repo_dir),
        _Dvc(["params", "diff", base], repo_dir),
        _Dvc(["diff", base], repo_dir),
    ]
    if (Path(repo_dir) / DETAILS).is_dir():
        runs.append(_Dvc(["metrics", "diff", "--all", base, "--targets", DETAILS], repo_dir))
    try:
        (metrics, stderr), (params, _) = runs[0].result(), runs[1].result()
        details = runs[3].result()[0] if len(runs) > 3 else {}
        results, test_sets = add_evidence(check_gates(metrics, gates, base, details), base,
                                          repo_dir)
        figure_lines = _figures_or_why_not(runs[2], base, repo_dir, figures_dir, link_prefix)
    finally:
        for run in runs:
            run.stop()
    verdict = _verdict(results)
    notes = [f"> {warning}" for warning in _load_warnings(stderr)]
    header = [f"# Metrics report: workspace vs `{base}`", "", verdict]
    if context:
        header += ["", f"Compared on: {context}"]
    sections = [
        header,
        notes,
        _params_section(params),
        _metrics_section(metrics),
        _gates_section(results),
        _test_sets_section(test_sets),
        figure_lines,
    ]
    markdown = "\n\n".join("\n".join(s) for s in sections if s) + "\n"
    return Report(markdown, verdict, all(r.passed for r in results))


def build_report(
    base: str, gates: list[dict], repo_dir: str | Path = ".", figures_dir: str = "reports/figures"
) -> tuple[str, bool]:
    """The report's Markdown and whether every gate passed."""
    report = compose_report(base, gates, repo_dir, figures_dir)
    return report.markdown, report.passed


# --- command line --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="retrain report",
        description="Markdown diff of params, metrics and figures against a base revision; "
        "exits 1 when a gated metric (params.yaml report.gates) regresses beyond its "
        "tolerance (and, for a gate with a significance, a paired test on the shared test "
        "images calls the drop real).",
    )
    parser.add_argument("--base", default="main", help="git revision to compare with")
    parser.add_argument("--out", help="write the Markdown here (default: print it)")
    parser.add_argument("--params", default="params.yaml", help="params file with report.gates")
    parser.add_argument("--figures", default="reports/figures", help="folder of figures")
    parser.add_argument("--context", default=os.environ.get("RETRAIN_REPORT_CONTEXT", ""),
                        help="what the compared runs were made on, printed in the report "
                        "(default: $RETRAIN_REPORT_CONTEXT)")
    return parser.parse_args(argv)


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gates = load_params(args.params, check_model=False)["report"]["gates"]
    link_prefix = "."
    if args.out:
        out_dir = Path(args.out).resolve().parent
        link_prefix = Path(os.path.relpath(Path.cwd(), out_dir)).as_posix()
    report = compose_report(args.base, gates, ".", args.figures, link_prefix, args.context)
    if args.out:
        write_text(args.out, report.markdown)
        print(report.verdict)
        if args.context:
            print(f"Compared on: {args.context}")
    else:
        print(report.markdown, end="")
    return EXIT_PASS if report.passed else EXIT_REGRESSION


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
