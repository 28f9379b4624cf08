"""Recipe-level comparisons: fine-tuning replicates tested against image and training noise,
and cross-validation folds paired with the corrected resampled t-test."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from retrain import uncertainty
from retrain.report import _evidence_words

CLASSES, IMAGES = 5, 300


def simulated_replicates(rng, labels, difficulty, count, shift=0.0):
    """Predictions of `count` models of one recipe: each seed moves the whole model (a
    shift of its skill, sd 0.08) and each image a little; a wrong answer is the next class."""
    predictions = []
    for _ in range(count):
        skill = rng.normal(shift, 0.08)
        right = difficulty + skill + rng.normal(0, 0.6, len(labels)) > -1.2
        predictions.append(np.where(right, labels, (labels + 1) % CLASSES))
    return np.array(predictions)


def test_a_seed_only_change_is_not_flagged_where_one_model_against_another_often_is():
    """Base and new replicates drawn from the same recipe, 20 times: the recipe test never
    calls a change at 0.05; McNemar on one model of each calls some (seed noise)."""
    recipe_flags = model_flags = 0
    for trial in range(20):
        rng = np.random.default_rng(trial)
        labels = rng.integers(0, CLASSES, IMAGES)
        difficulty = rng.normal(0, 1, IMAGES)
        base = simulated_replicates(rng, labels, difficulty, 3)
        new = simulated_replicates(rng, labels, difficulty, 3)
        result = uncertainty.recipe_difference("test_accuracy", labels, base, new)
        assert result.training_noise_measured and result.base_replicates == 3
        recipe_flags += result.pvalue < 0.05
        model_flags += uncertainty.mcnemar_exact(base[0] == labels,
                                                 new[0] == labels).pvalue < 0.05
    assert recipe_flags <= 1
    assert model_flags >= 2  # the problem the recipe test solves is present in the data


def test_a_real_shift_of_the_recipe_is_flagged():
    flagged = 0
    for trial in range(10):
        rng = np.random.default_rng(100 + trial)
        labels = rng.integers(0, CLASSES, IMAGES)
        difficulty = rng.normal(0, 1, IMAGES)
        base = simulated_replicates(rng, labels, difficulty, 3)
        worse = simulated_replicates(rng, labels, difficulty, 3, shift=-0.4)
        result = uncertainty.recipe_difference("macro_f1", labels, base, worse)
        flagged += result.pvalue < 0.05 and result.interval[1] < 0
    assert flagged >= 8


def test_replicate_means_and_the_interval_contain_the_difference():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    base = np.array([labels, np.where(np.arange(8) < 2, (labels + 1) % 3, labels)])
    new = np.array([np.where(np.arange(8) < 4, (labels + 1) % 3, labels)] * 2)
    result = uncertainty.recipe_difference("test_accuracy", labels, base, new)
    assert result.difference == pytest.approx(0.5 - (1 + 0.75) / 2)
    assert result.interval[0] < result.difference < result.interval[1]
    assert result.training_sd == pytest.approx(np.sqrt((np.var([1, 0.75], ddof=1) + 0) / 2))


def test_one_replicate_each_leaves_the_training_noise_unmeasured():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, CLASSES, 50)
    base, new = (simulated_replicates(rng, labels, np.zeros(50), 1) for _ in range(2))
    result = uncertainty.recipe_difference("test_accuracy", labels, base, new)
    assert not result.training_noise_measured and math.isinf(result.df)
    # One replicate on one side only: the other side's spread stands for both.
    three = simulated_replicates(rng, labels, np.zeros(50), 3)
    assert uncertainty.recipe_difference("test_accuracy", labels, base,
                                         three).training_noise_measured


@pytest.mark.parametrize("df", [4, 12, 200])
def test_a_change_of_the_detectable_size_is_caught_80_percent_of_the_time(df):
    """The detectable change against the exact power of the two-sided t test (scipy's
    noncentral t): at that true change the test rejects about 80% of the time."""
    from scipy import stats

    se, significance = 0.03, 0.05
    half = stats.t.ppf(0.975, df) * se
    smallest = uncertainty.detectable_change([-half, half], 0.95, df, significance)
    critical = stats.t.ppf(1 - significance / 2, df)
    power = stats.nct.sf(critical, df, smallest / se) + stats.nct.cdf(-critical, df,
                                                                       smallest / se)
    assert power == pytest.approx(0.8, abs=0.02)
    assert smallest > 2.8 * se  # z(0.975) + z(0.8) = 2.80 at infinite df


def test_more_replicates_detect_smaller_changes():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, CLASSES, IMAGES)
    difficulty = rng.normal(0, 1, IMAGES)
    replicates = simulated_replicates(rng, labels, difficulty, 20)
    few = uncertainty.recipe_difference("test_accuracy", labels, replicates[:2],
                                        replicates[2:4])
    many = uncertainty.recipe_difference("test_accuracy", labels, replicates[:10],
                                         replicates[10:])
    assert many.detectable(0.05) < few.detectable(0.05)
    assert many.detectable(0.05) > abs(many.interval[1] - many.difference)


def t3_cdf(t: float) -> float:
    """Student's t distribution function on 3 degrees of freedom, in closed form."""
    x = t / math.sqrt(3)
    return 0.5 + (x / (1 + x * x) + math.atan(x)) / math.pi


def test_corrected_resampled_t_test_matches_a_hand_computed_table():
    """2 folds x 2 repeats; differences 0.02, -0.01, 0.03, 0.00: mean 0.01, s^2 = 0.001/3,
    corrected variance (1/4 + 1/(2-1)) s^2 = 0.00041667, t = 0.01 / 0.020412 = 0.4899."""
    base = [0.80, 0.82, 0.78, 0.81]
    new = [0.82, 0.81, 0.81, 0.81]
    result = uncertainty.corrected_resampled_ttest(base, new, folds=2)
    assert result.difference == pytest.approx(0.01)
    assert result.t == pytest.approx(0.01 / math.sqrt(1.25 * 0.001 / 3))
    assert result.t == pytest.approx(0.48990, abs=1e-5)
    assert result.df == 3 and result.pairs == 4
    assert result.pvalue == pytest.approx(2 * (1 - t3_cdf(result.t)), rel=1e-9)
    half = (result.interval[1] - result.interval[0]) / 2
    assert half == pytest.approx(3.182446 * math.sqrt(1.25 * 0.001 / 3), rel=1e-5)
    # The uncorrected t-test's variance, s^2 / 4, would give t = 1.095: the correction
    # widens it by sqrt(1.25 / 0.25).
    assert result.t == pytest.approx(1.0954451 / math.sqrt(5), rel=1e-6)


def test_corrected_t_test_needs_two_folds():
    with pytest.raises(ValueError):
        uncertainty.corrected_resampled_ttest([0.8], [0.9], folds=5)


# --- the report's gates -------------------------------------------------------------------

def predictions(labels, replicates) -> pd.DataFrame:
    names = np.array(["a", "b", "c", "d", "e"])
    table = pd.DataFrame({"path": [f"{i}.jpg" for i in range(len(labels))],
                          "sha256": [f"{i:064x}" for i in range(len(labels))],
                          "actual": names[labels], "predicted": names[replicates[0]]})
    for index, other in enumerate(replicates[1:], start=1):
        table[f"predicted_replicate_{index}"] = names[other]
    return table.assign(copy=0)


def gate_on(base, new, level="recipe", significance=0.05):
    from dataclasses import replace

    from retrain.report import GateResult, TestSets, gather_evidence

    sets = TestSets("finetuned", base, new, shared=len(base))
    result = GateResult("metrics/models/finetuned.json:accuracy",
                        "metrics/models/finetuned.json", "higher", 0.01,
                        old=0.9, new=0.85, significance=significance, level=level)
    return replace(result, evidence=gather_evidence(result, sets))


def test_report_judges_a_seed_only_drop_by_the_recipe_and_a_model_gate_by_one_model_each():
    """Replicates of one recipe whose replicate 0s happen to differ a lot: the recipe gate
    passes, the model-level gate on the same tables fails."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, CLASSES, IMAGES)
    difficulty = rng.normal(0, 1, IMAGES)
    for _ in range(50):  # a draw where the two shipped models differ significantly
        base = simulated_replicates(rng, labels, difficulty, 3)
        new = simulated_replicates(rng, labels, difficulty, 3)
        if uncertainty.mcnemar_exact(base[0] == labels, new[0] == labels).pvalue < 0.01 \
                and (new[0] == labels).mean() < (base[0] == labels).mean() - 0.02:
            break
    recipe = gate_on(predictions(labels, base), predictions(labels, new))
    model = gate_on(predictions(labels, base), predictions(labels, new), level="model")
    assert recipe.evidence.recipe.new_replicates == 3
    assert model.status == "regression"
    assert recipe.status == "not significant", recipe.evidence.recipe
    from retrain.report import _verdict

    smallest = recipe.evidence.recipe.detectable(0.05)
    assert f"catches a change of {smallest:.4g} or more 80% of the time" in _verdict([recipe])
    assert "catches a change" not in _verdict([model])


def test_report_flags_a_real_recipe_regression_and_notes_unmeasured_training_noise():
    from retrain.report import _verdict

    rng = np.random.default_rng(5)
    labels = rng.integers(0, CLASSES, IMAGES)
    difficulty = rng.normal(0, 1, IMAGES)
    base = simulated_replicates(rng, labels, difficulty, 3)
    worse = simulated_replicates(rng, labels, difficulty, 3, shift=-0.6)
    failed = gate_on(predictions(labels, base), predictions(labels, worse))
    assert failed.status == "regression"
    assert "recipe test over 3 vs 3 replicates" in _verdict([failed])
    single = gate_on(predictions(labels, base[:1]), predictions(labels, worse[:1]))
    assert not single.evidence.recipe.training_noise_measured
    assert "training noise not measured" in _verdict([single])


def summaries(old, new, seed=(42, 42), folds=(2, 2)) -> tuple[dict, dict]:
    """Two revisions' crossval details (as the stage writes them) with these val_accuracy
    fold scores (2 repeats)."""
    return tuple({"folds": k, "repeats": 2, "seed": s, "folds_digest": f"folds-{s}",
                  "per_fold": {"val_accuracy": scores}}
                 for scores, s, k in zip((old, new), seed, folds, strict=True))


def test_crossval_gate_pairs_the_folds_of_both_revisions():
    from retrain.report import GateResult, fold_evidence

    def details(old, new, seed=(42, 42)):
        return summaries(old, new, seed)

    gate = GateResult("metrics/crossval.json:accuracy", "metrics/crossval.json", "higher", 0.0,
                      old=0.8025, new=0.8125, significance=0.05)
    base, new = [0.80, 0.82, 0.78, 0.81], [0.82, 0.81, 0.81, 0.81]
    evidence = fold_evidence(gate, *details(base, new))
    assert evidence.folds.t == pytest.approx(0.48990, abs=1e-5)
    drop = GateResult("metrics/crossval.json:accuracy", "metrics/crossval.json", "higher", 0.0,
                      old=0.8, new=0.7, significance=0.05,
                      evidence=fold_evidence(gate, *details([0.8, 0.81, 0.79, 0.8],
                                                           [0.7, 0.7, 0.69, 0.71])))
    assert drop.status == "regression"
    assert evidence.folds.same_folds and "paired by fold" in _evidence_words(
        replace(gate, evidence=evidence))


def test_crossval_gate_on_other_folds_pairs_by_position_and_on_other_counts_not_at_all():
    """Another crossval.seed draws other folds: fold j against fold j, the same corrected
    test, and the verdict says the folds differ. Other fold or repeat counts: no test."""
    from retrain.report import GateResult, fold_evidence

    def details(old, new, seed=(42, 7), folds=(2, 2)):
        return summaries(old, new, seed, folds)

    base, new = [0.80, 0.82, 0.78, 0.81], [0.82, 0.81, 0.81, 0.81]
    gate = GateResult("metrics/crossval.json:accuracy", "metrics/crossval.json", "higher", 0.0,
                      old=0.8025, new=0.8125, significance=0.05)
    evidence = fold_evidence(gate, *details(base, new))
    assert evidence.folds.t == pytest.approx(0.48990, abs=1e-5)
    assert not evidence.folds.same_folds
    assert ("other folds (crossval.seed or the images changed), paired by position"
            in _evidence_words(replace(gate, evidence=evidence)))
    assert fold_evidence(gate, *details(base, new, folds=(2, 4))) is None
    assert fold_evidence(gate, *details(base, new[:3])) is None


@pytest.mark.parametrize("level", ["recipe", "model"])
def test_a_crossval_gate_is_judged_by_its_folds_at_either_level(level):
    """The folds are the only test a crossval mean has: `level: model` uses them too."""
    from retrain.report import GateResult, fold_evidence

    details = summaries([0.8, 0.81, 0.79, 0.8], [0.7, 0.7, 0.69, 0.71])
    gate = GateResult("metrics/crossval.json:accuracy", "metrics/crossval.json", "higher", 0.01,
                      old=0.8, new=0.7, significance=0.05, level=level)
    judged = replace(gate, evidence=fold_evidence(gate, *details))
    assert judged.status == "regression"
    noise = summaries([0.8, 0.6, 0.9, 0.7], [0.7, 0.65, 0.8, 0.68])
    assert replace(gate, evidence=fold_evidence(gate, *noise)).status == "not significant"
