"""How far a test metric could move: bootstrap intervals and paired tests (scipy).

A test split is a sample of the images a model will meet. Its accuracy is an estimate whose
noise shrinks only with the number of test images, so every metric meant for comparison
carries a 95% bootstrap interval over the test images: resample the test set with
replacement, recompute the metric, keep the middle 95% of the values. Two models that
predicted the same test images are compared pairwise (the same resampled images for both),
which cancels the images both get right or wrong and leaves the noise of the difference.

The metrics are computed from a confusion matrix per resample, vectorised over resamples, so
thousands of resamples cost milliseconds on a few hundred images. They match scikit-learn's
`accuracy_score`, `f1_score(average="macro", labels=<classes present>)` and
`balanced_accuracy_score`; a class with no test image in a (re)sample is left out of the
macro averages, since its recall is undefined.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
# How often a real change must be caught for a comparison to be said to see it.
POWER = 0.8
RESAMPLES = 4000
# A fixed seed: the same predictions always give the same interval, whatever params.seed is.
BOOTSTRAP_SEED = 20240
# Memory per vectorised call stays near this many integers (resamples x images, or
# resamples x classes^2 for the confusion matrices).
BATCH_CELLS = 20_000_000

# Percentile, not BCa: a good model's accuracy sits near 1 on a small test set, where the
# bootstrap distribution is discrete or degenerate (every image right) and BCa returns NaN
# or jumps between resample counts; BCa's jackknife also costs one metric evaluation per test
# image. The percentile interval is always defined and was measured to cover a simulated
# classifier's true accuracy at close to the nominal rate (tests/test_uncertainty.py).
METHOD = "percentile"


def confusion_counts(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrices (rows: true class, columns: predicted) over the last axis:
    shape (..., n) in, (..., n_classes, n_classes) out, one bincount for all of them."""
    labels, predicted = np.broadcast_arrays(np.asarray(labels), np.asarray(predicted))
    *batch, n = labels.shape
    cells = (labels * n_classes + predicted).reshape(-1, n)
    offsets = np.arange(len(cells))[:, None] * n_classes**2
    counts = np.bincount((cells + offsets).ravel(), minlength=len(cells) * n_classes**2)
    return counts.reshape(*batch, n_classes, n_classes)


def _per_class(counts: np.ndarray):
    true_total = counts.sum(axis=-1)
    predicted_total = counts.sum(axis=-2)
    hits = np.diagonal(counts, axis1=-2, axis2=-1)
    present = true_total > 0
    return hits, true_total, predicted_total, present


def accuracy_of(counts: np.ndarray) -> np.ndarray:
    hits = np.diagonal(counts, axis1=-2, axis2=-1).sum(axis=-1)
    return hits / counts.sum(axis=(-2, -1))


def macro_f1_of(counts: np.ndarray) -> np.ndarray:
    hits, true_total, predicted_total, present = _per_class(counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(present, 2 * hits / (true_total + predicted_total), np.nan)
    return np.nanmean(f1, axis=-1)


def balanced_accuracy_of(counts: np.ndarray) -> np.ndarray:
    hits, true_total, _, present = _per_class(counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, hits / true_total, np.nan)
    return np.nanmean(recall, axis=-1)


# The metrics with intervals, by their name in reports/details/evaluate.json.
METRICS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "test_accuracy": accuracy_of,
    "macro_f1": macro_f1_of,
    "balanced_accuracy": balanced_accuracy_of,
}


def _bootstrap(data: tuple[np.ndarray, ...], statistic, confidence: float) -> list[float]:
    n = len(data[0])
    cells_per_resample = max(n * len(data), statistic.cells)
    result = stats.bootstrap(
        data, statistic, paired=True, vectorized=True, n_resamples=RESAMPLES,
        batch=max(1, min(RESAMPLES, BATCH_CELLS // cells_per_resample)),
        confidence_level=confidence, method=METHOD, rng=np.random.default_rng(BOOTSTRAP_SEED),
    )
    interval = result.confidence_interval
    return [float(interval.low), float(interval.high)]


class _Metric:
    """metric(labels, predicted) along an axis, as scipy's vectorised bootstrap calls it."""

    def __init__(self, metric, n_classes: int):
        self.metric, self.n_classes, self.cells = metric, n_classes, n_classes**2

    def __call__(self, labels, predicted, axis=-1):
        labels, predicted = np.moveaxis(labels, axis, -1), np.moveaxis(predicted, axis, -1)
        return self.metric(confusion_counts(labels, predicted, self.n_classes))


class _Difference(_Metric):
    """metric(labels, new) - metric(labels, base) on the same resampled images."""

    def __call__(self, labels, base, new, axis=-1):
        return super().__call__(labels, new, axis) - super().__call__(labels, base, axis)


def _as_labels(*arrays) -> tuple[tuple[np.ndarray, ...], int]:
    arrays = tuple(np.asarray(a, dtype=np.int64) for a in arrays)
    return arrays, int(max(a.max(initial=0) for a in arrays)) + 1


def metric_interval(metric: str, labels, predicted, confidence: float = CONFIDENCE
                    ) -> list[float] | None:
    """[low, high] bootstrap interval of one of METRICS; None with fewer than 2 images."""
    (labels, predicted), n_classes = _as_labels(labels, predicted)
    if len(labels) < 2:
        return None
    return _bootstrap((labels, predicted), _Metric(METRICS[metric], n_classes), confidence)


def metric_intervals(labels, predicted) -> dict[str, list[float] | None]:
    """`<metric>_ci95` -> [low, high] for each of METRICS (the keys of evaluate.json)."""
    return {f"{name}_ci95": metric_interval(name, labels, predicted) for name in METRICS}


@dataclass(frozen=True)
class PairedDifference:
    """new minus base on the same test images, and its paired bootstrap interval."""

    metric: str
    difference: float
    interval: list[float]
    confidence: float

    def excludes_zero(self) -> bool:
        return self.interval[1] < 0 or self.interval[0] > 0


def paired_difference(metric: str, labels, base, new, confidence: float = CONFIDENCE
                      ) -> PairedDifference:
    """Bootstrap interval of metric(new) - metric(base), both models scored on the same
    resampled test images (scipy's paired bootstrap)."""
    (labels, base, new), n_classes = _as_labels(labels, base, new)
    statistic = _Difference(METRICS[metric], n_classes)
    difference = float(statistic(labels, base, new))
    if len(labels) < 2 or np.array_equal(base, new):
        interval = [difference, difference]
    else:
        interval = _bootstrap((labels, base, new), statistic, confidence)
    return PairedDifference(metric, difference, interval, confidence)


@dataclass(frozen=True)
class McNemar:
    """McNemar's exact test on the images exactly one of two models gets right."""

    base_only: int   # right before, wrong now
    new_only: int    # wrong before, right now
    pvalue: float


def mcnemar_exact(base_correct, new_correct) -> McNemar:
    """Two-sided exact McNemar test: under "no difference in accuracy" each discordant image
    is equally likely to favour either model, so the count favouring one is Binomial(b + c,
    1/2). Images both models get right or wrong carry no information about the difference."""
    base_correct, new_correct = np.asarray(base_correct, bool), np.asarray(new_correct, bool)
    base_only = int(np.sum(base_correct & ~new_correct))
    new_only = int(np.sum(~base_correct & new_correct))
    discordant = base_only + new_only
    pvalue = 1.0 if discordant == 0 else stats.binomtest(new_only, discordant, 0.5).pvalue
    return McNemar(base_only, new_only, float(pvalue))


def format_interval(interval: list[float] | None, digits: int = 4) -> str:
    if interval is None:
        return "[n/a]"
    low, high = interval
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


# --- recipes: training noise beside the test images' ----------------------------------------


@dataclass(frozen=True)
class RecipeDifference:
    """Mean metric over the new revision's fine-tuning replicates minus the base's, on the
    same test images, tested against both noises: which images are in the test set and
    which seed trained each model.

    `training_sd` is the pooled sd of the replicates' metric (None when neither side has two
    replicates: the training noise was not measured, the test covers the images only).
    """

    metric: str
    difference: float
    interval: list[float]
    pvalue: float
    confidence: float
    base_replicates: int
    new_replicates: int
    training_sd: float | None
    df: float

    @property
    def training_noise_measured(self) -> bool:
        return self.training_sd is not None

    def detectable(self, significance: float, power: float = POWER) -> float:
        """The smallest change of the replicate means this test catches `power` of the time:
        what "not significant" cannot rule out."""
        return detectable_change(self.interval, self.confidence, self.df, significance, power)


def _replicate_metric(metric: str, n_classes: int):
    """Per-replicate metric over resampled images: (K, n) predictions and (B, n) image
    indices give (K, B)."""
    def of(labels: np.ndarray, predicted: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return METRICS[metric](confusion_counts(labels[rows], predicted[:, rows], n_classes))
    return of


def detectable_change(interval: list[float], confidence: float, df: float,
                      significance: float, power: float = POWER) -> float:
    """The smallest true change that a two-sided t test, whose `confidence` interval on `df`
    degrees of freedom is `interval`, calls real at `significance` with probability `power`:
    (t(1 - significance / 2) + t(power)) * se, the usual sample-size formula, with the
    standard error read off the interval (scipy's t quantiles). Against the exact power
    (noncentral t) it is close: 0.79 at 4 df, 0.77 at 2 (two replicates a side)."""
    se = (interval[1] - interval[0]) / 2 / float(stats.t.ppf(0.5 + confidence / 2, df))
    return float((stats.t.ppf(1 - significance / 2, df) + stats.t.ppf(power, df)) * se)


def _t_verdict(difference: float, se: float, df: float, confidence: float
               ) -> tuple[list[float], float]:
    """(interval at `confidence`, two-sided p) of a t statistic difference / se on df."""
    if se == 0:
        return [difference, difference], 1.0 if difference == 0 else 0.0
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    pvalue = float(2 * stats.t.sf(abs(difference) / se, df))
    return [difference - half, difference + half], pvalue


def recipe_difference(metric: str, labels, base, new, confidence: float = CONFIDENCE
                      ) -> RecipeDifference:
    """Compare two recipes by their replicates' predictions, `base` (K_b, n) and `new`
    (K_n, n), on the same n test images.

    The difference of the replicate means has two independent parts of noise: the test
    images (the standard error of a paired bootstrap over the images, scipy, of the
    replicate-mean difference) and the training seeds (the replicates' pooled variance,
    s^2 (1/K_b + 1/K_n), on sum(K - 1) degrees of freedom). Their sum is tested on
    Welch-Satterthwaite's degrees of freedom, so three replicates' uncertain spread widens
    the interval (a t on 4 df, not a normal). A bootstrap over so few replicates would not:
    it sees their spread as exact and shrinks it by (K - 1) / K. The image part also sees
    some training noise (models disagree image by image), so the test leans conservative.
    """
    (labels, base, new), n_classes = _as_labels(labels, np.atleast_2d(base),
                                                np.atleast_2d(new))
    of = _replicate_metric(metric, n_classes)
    everything = np.arange(len(labels))
    base_values, new_values = of(labels, base, everything), of(labels, new, everything)
    difference = float(new_values.mean() - base_values.mean())

    def mean_difference(rows, axis=-1):
        rows = np.moveaxis(rows, axis, -1)
        return of(labels, new, rows).mean(axis=0) - of(labels, base, rows).mean(axis=0)

    image_se = 0.0
    if len(labels) > 1:
        image_se = float(stats.bootstrap(
            (everything,), mean_difference, vectorized=True, n_resamples=RESAMPLES,
            batch=max(1, BATCH_CELLS // (len(labels) * (len(base) + len(new)))),
            method=METHOD, rng=np.random.default_rng(BOOTSTRAP_SEED)).standard_error)
    freedom = (len(base) - 1) + (len(new) - 1)
    training_sd, training_var, df = None, 0.0, np.inf
    if freedom:
        pooled = ((len(base) - 1) * np.var(base_values, ddof=min(1, len(base) - 1))
                  + (len(new) - 1) * np.var(new_values, ddof=min(1, len(new) - 1))) / freedom
        training_sd = float(np.sqrt(pooled))
        training_var = float(pooled * (1 / len(base) + 1 / len(new)))
        if training_var > 0:  # Welch-Satterthwaite; the image part's df is large
            df = (image_se**2 + training_var) ** 2 / (training_var**2 / freedom)
    interval, pvalue = _t_verdict(difference, float(np.sqrt(image_se**2 + training_var)), df,
                                  confidence)
    return RecipeDifference(metric, difference, interval, pvalue, confidence, len(base),
                            len(new), training_sd, float(df))


@dataclass(frozen=True)
class FoldComparison:
    """Nadeau and Bengio's corrected resampled t-test on per-fold scores paired by fold."""

    difference: float  # mean over folds of new minus base
    interval: list[float]
    pvalue: float
    confidence: float
    pairs: int
    t: float
    df: int
    same_folds: bool = True  # False: each side drew its own folds, paired by position

    def detectable(self, significance: float, power: float = POWER) -> float:
        """The smallest change of the fold mean this test catches `power` of the time."""
        return detectable_change(self.interval, self.confidence, self.df, significance, power)


def corrected_resampled_ttest(base_scores, new_scores, folds: int,
                              confidence: float = CONFIDENCE,
                              same_folds: bool = True) -> FoldComparison:
    """Two revisions' scores on the same k folds (repeated r times), paired by fold.

    Folds share most of their training rows, so the k * r differences are correlated and
    the plain t-test's variance s^2 / (k r) is far too small (it rejects a true "no change"
    much too often). Nadeau and Bengio (2003) correct it to (1 / (k r) + n_test / n_train)
    s^2, with n_test / n_train = 1 / (k - 1) for k-fold; t on k r - 1 degrees of freedom
    (Bouckaert and Frank, 2004, for repeated k-fold).
    """
    differences = np.asarray(new_scores, float) - np.asarray(base_scores, float)
    pairs = len(differences)
    if pairs < 2 or folds < 2:
        raise ValueError("the corrected t-test needs two or more folds")
    mean = float(differences.mean())
    se = float(np.sqrt((1 / pairs + 1 / (folds - 1)) * differences.var(ddof=1)))
    interval, pvalue = _t_verdict(mean, se, pairs - 1, confidence)
    return FoldComparison(mean, interval, pvalue, confidence, pairs,
                          mean / se if se else 0.0, pairs - 1, same_folds)
