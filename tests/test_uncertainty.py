"""Bootstrap intervals and paired tests: they mean what they say, and match scikit-learn."""

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from retrain.uncertainty import (
    METRICS,
    confusion_counts,
    mcnemar_exact,
    metric_interval,
    metric_intervals,
    paired_difference,
)


def simulated_classifier(rng, n: int, accuracy: float, n_classes: int = 4):
    """Test labels and predictions of a classifier right with probability `accuracy`."""
    labels = rng.integers(0, n_classes, n)
    wrong = rng.random(n) >= accuracy
    shift = rng.integers(1, n_classes, n)  # any other class
    return labels, np.where(wrong, (labels + shift) % n_classes, labels)


def test_the_95_interval_covers_the_true_accuracy_about_95_times_in_100():
    true_accuracy, draws = 0.8, 200
    rng = np.random.default_rng(12)
    covered = 0
    for _ in range(draws):
        labels, predicted = simulated_classifier(rng, 60, true_accuracy)
        low, high = metric_interval("test_accuracy", labels, predicted)
        covered += low <= true_accuracy <= high
    assert 0.90 * draws <= covered <= 0.99 * draws, covered


def test_point_metrics_match_scikit_learn_and_skip_classes_without_test_images():
    rng = np.random.default_rng(3)
    labels, predicted = simulated_classifier(rng, 80, 0.7, n_classes=5)
    labels[labels == 3] = 2   # class 3 has no test image, yet is predicted
    counts = confusion_counts(labels, predicted, 5)
    present = np.unique(labels)
    assert METRICS["test_accuracy"](counts) == pytest.approx(accuracy_score(labels, predicted))
    assert METRICS["macro_f1"](counts) == pytest.approx(
        f1_score(labels, predicted, labels=present, average="macro"))
    with pytest.warns(UserWarning, match="not in y_true"):
        expected = balanced_accuracy_score(labels, predicted)
    assert METRICS["balanced_accuracy"](counts) == pytest.approx(expected)


def test_intervals_are_seeded_contain_the_estimate_and_narrow_with_more_images():
    rng = np.random.default_rng(5)
    small = simulated_classifier(rng, 40, 0.8)
    large = simulated_classifier(rng, 1000, 0.8)

    intervals = metric_intervals(*small)

    assert set(intervals) == {"test_accuracy_ci95", "macro_f1_ci95", "balanced_accuracy_ci95"}
    assert intervals == metric_intervals(*small)   # same predictions, same interval
    counts = confusion_counts(*small, 4)
    for name, metric in METRICS.items():
        low, high = intervals[f"{name}_ci95"]
        assert low < metric(counts) < high
    small_width = np.diff(intervals["test_accuracy_ci95"])[0]
    large_width = np.diff(metric_interval("test_accuracy", *large))[0]
    assert large_width < small_width / 3   # width shrinks like 1 / sqrt(n)


def test_a_single_test_image_has_no_interval():
    assert metric_interval("test_accuracy", [1], [1]) is None


@pytest.mark.parametrize("base_only, new_only", [(0, 0), (0, 5), (7, 2), (3, 3), (20, 9),
                                                 (1, 12)])
def test_mcnemar_exact_p_value_equals_scipy_binomial_test(base_only, new_only):
    # 30 images both get right, 4 both get wrong, then the discordant pairs.
    both, neither = 30, 4
    base = [True] * both + [False] * neither + [True] * base_only + [False] * new_only
    new = [True] * both + [False] * neither + [False] * base_only + [True] * new_only

    result = mcnemar_exact(base, new)

    assert (result.base_only, result.new_only) == (base_only, new_only)
    discordant = base_only + new_only
    expected = stats.binomtest(base_only, discordant, 0.5).pvalue if discordant else 1.0
    assert result.pvalue == pytest.approx(expected, rel=1e-12)


def test_mcnemar_on_a_hand_computed_table():
    # 0 against 6 discordant pairs: p = 2 * 0.5**6 exactly.
    result = mcnemar_exact([False] * 6 + [True] * 10, [True] * 16)
    assert result.pvalue == pytest.approx(2 * 0.5**6, rel=1e-12)


def test_paired_interval_is_narrower_than_the_unpaired_one():
    # Two models that agree on most images: their difference is far better known than
    # either accuracy.
    rng = np.random.default_rng(8)
    labels, base = simulated_classifier(rng, 200, 0.8)
    new = base.copy()
    new[:6] = labels[:6]    # a few images fixed

    paired = paired_difference("test_accuracy", labels, base, new)

    assert paired.difference == pytest.approx(np.mean(new == labels) - np.mean(base == labels))
    assert paired.interval[0] <= paired.difference <= paired.interval[1]
    single = metric_interval("test_accuracy", labels, base)
    assert np.diff(paired.interval)[0] < np.diff(single)[0] / 2
    assert paired_difference("macro_f1", labels, base, base).interval == [0.0, 0.0]
