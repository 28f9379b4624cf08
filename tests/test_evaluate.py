"""Test metrics: scikit-learn's figures under any class names, intervals next to them."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from retrain.evaluate import (
    classification_metrics,
    predictions_table,
    replicate_figures,
    summary_lines,
)


def one_hot(predicted, n_classes):
    return np.eye(n_classes, dtype=np.float32)[predicted] * 0.9 + 0.1 / n_classes


@pytest.mark.parametrize("name", ["accuracy", "macro avg", "weighted avg", "micro avg"])
def test_a_class_named_like_a_report_row_keeps_its_own_figures(name):
    classes = ["cats", name, "dogs"]
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 2])
    predicted = np.array([0, 1, 1, 1, 0, 2, 2, 1])

    metrics = classification_metrics(one_hot(predicted, 3), labels, classes)

    # class 1: predicted 4 times, 2 of them right; 3 test images.
    assert metrics["per_class"][name] == {"precision": 0.5, "recall": pytest.approx(2 / 3),
                                          "f1": pytest.approx(4 / 7), "support": 3}
    assert metrics["test_accuracy"] == pytest.approx(5 / 8)


def test_a_class_without_test_images_stays_out_of_the_macro_averages():
    # Class 2 ("rare") has no test image but is predicted once: its F1 is 0 by definition,
    # which says nothing about the model and must not halve the macro F1.
    classes = ["cats", "dogs", "rare"]
    labels = np.array([0, 0, 0, 1, 1, 1])
    predicted = np.array([0, 0, 2, 1, 1, 1])

    metrics = classification_metrics(one_hot(predicted, 3), labels, classes)

    expected = f1_score(labels, predicted, labels=[0, 1], average="macro")
    assert metrics["macro_f1"] == pytest.approx(expected)
    assert metrics["macro_f1"] > f1_score(labels, predicted, labels=[0, 1, 2], average="macro")
    assert metrics["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert metrics["per_class"]["rare"]["support"] == 0
    low, high = metrics["macro_f1_ci95"]
    assert low <= metrics["macro_f1"] <= high


def test_every_headline_metric_has_an_interval_and_the_printout_says_what_it_means():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 50)
    predicted = np.where(rng.random(50) < 0.8, labels, (labels + 1) % 4)
    metrics = classification_metrics(one_hot(predicted, 4), labels, list("abcd"))

    for key in ("test_accuracy", "macro_f1", "balanced_accuracy"):
        low, high = metrics[f"{key}_ci95"]
        assert 0 <= low < metrics[key] < high <= 1
        # the same bounds as plain numbers, the form `dvc exp show` can display
        assert [metrics[f"{key}_ci95_low"], metrics[f"{key}_ci95_high"]] == [low, high]
    lines = summary_lines({"head": metrics, "finetuned": metrics}, 50)
    assert "95% bootstrap interval over the test images" in lines[0]
    # a confidence interval for the model's metric, not a range for another test draw
    assert "metric on all images like these" in lines[0] and "another draw" not in lines[0]
    low, high = metrics["test_accuracy_ci95"]
    assert f"accuracy {metrics['test_accuracy']:.4f} [{low:.4f}, {high:.4f}]" in lines[1]
    assert lines[2].startswith("  finetuned  accuracy")


def test_a_zero_width_interval_is_explained_in_the_printout():
    labels = np.arange(10) % 2
    perfect = classification_metrics(one_hot(labels, 2), labels, ["a", "b"])

    assert perfect["test_accuracy_ci95"] == [1.0, 1.0]
    lines = summary_lines({"head": perfect}, 10)
    assert "zero width" in lines[-1] and "up to about 30%" in lines[-1]
    predicted = labels.copy()
    predicted[:3] = 1 - predicted[:3]
    imperfect = classification_metrics(one_hot(predicted, 2), labels, ["a", "b"])
    assert len(summary_lines({"head": imperfect}, 10)) == 2   # no note without the need


def test_predictions_table_carries_each_images_sha256_beside_its_path():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    table = predictions_table(["a/1.jpg", "b/2.jpg", "b/3.jpg"], ["d1", "d2", "d3"],
                              probabilities, np.array([0, 1, 1]), ["a", "b"])

    assert list(table.columns) == ["path", "sha256", "actual", "predicted", "prob_a", "prob_b"]
    assert list(table["sha256"]) == ["d1", "d2", "d3"]
    assert list(table["predicted"]) == ["a", "b", "a"]


def test_each_replicate_has_its_figures_and_their_mean_and_sd_over_replicates():
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 1])
    predicted = [labels.copy(), np.array([0, 1, 1, 1, 2, 2, 0, 1]),
                 np.array([1, 1, 1, 0, 2, 2, 2, 1])]
    figures = replicate_figures([one_hot(p, 3) for p in predicted], labels, [42, 9, 5])
    accuracies = [1.0, 0.75, 0.625]
    assert figures["count"] == 3
    assert [r["seed"] for r in figures["per_replicate"]] == [42, 9, 5]
    assert [r["test_accuracy"] for r in figures["per_replicate"]] == accuracies
    assert figures["per_replicate"][1]["macro_f1"] == pytest.approx(
        f1_score(labels, predicted[1], average="macro"))
    assert figures["test_accuracy_mean"] == pytest.approx(np.mean(accuracies))
    assert figures["test_accuracy_sd"] == pytest.approx(np.std(accuracies, ddof=1))
    one = replicate_figures([one_hot(predicted[0], 3)], labels, [42])
    assert one["count"] == 1 and one["test_accuracy_sd"] is None


def test_predictions_table_adds_each_further_replicates_predicted_class():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8]])
    other = np.array([[0.3, 0.7], [0.2, 0.8]])
    table = predictions_table(["a/1.jpg", "b/2.jpg"], ["d1", "d2"], probabilities,
                              np.array([0, 1]), ["a", "b"], [other, probabilities])
    assert list(table["predicted"]) == ["a", "b"]
    assert list(table["predicted_replicate_1"]) == ["b", "b"]
    assert list(table["predicted_replicate_2"]) == ["a", "b"]


def test_leaked_test_images_are_those_grouped_with_train_or_val():
    from retrain.evaluate import leaked_test_images

    groups = pd.DataFrame({
        "group": [1, 1, 2, 2, 3, 3, 4, 4],
        "path": ["a_train", "a_test", "b_val", "b_test", "c_test", "c_test2", "d_train",
                 "d_val"],
        "split": ["train", "test", "val", "test", "test", "test", "train", "val"]})
    # a group within test alone, or within train and val, leaks nothing into test
    assert leaked_test_images(groups) == {"a_test", "b_test"}
    assert leaked_test_images(groups.iloc[:0]) == set()


def test_leak_free_accuracy_leaves_the_leaked_images_out():
    from retrain.evaluate import leak_free_accuracy

    labels = np.array([0, 1, 0, 1, 0, 1])
    probabilities = np.eye(2)[[0, 1, 1, 1, 0, 0]]  # rows 2 and 5 wrong
    paths = pd.Series([f"{i}.jpg" for i in range(6)])
    clean = leak_free_accuracy(probabilities, labels, paths, {"0.jpg", "1.jpg"})
    assert clean["leak_free_test_accuracy"] == 0.5  # rows 2-5: two of four right
    assert clean["leak_free_test_images"] == 4
    low, high = clean["leak_free_test_accuracy_ci95"]
    assert 0 <= low <= 0.5 <= high <= 1
    every = leak_free_accuracy(probabilities, labels, paths, set(paths))
    assert every["leak_free_test_accuracy"] is None and every["leak_free_test_images"] == 0
