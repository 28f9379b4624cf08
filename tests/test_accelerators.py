"""Precision policy and multi-device training, all checked on a CPU.

Several replicas are tested on two logical CPU devices (tests/two_replicas.py, run in its own
process); mixed precision runs float16 kernels on the CPU, slowly but with the same
numerics as a GPU's policy: float16 layers, float32 variables, a float32 softmax, loss scaling.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from scipy.stats import binomtest

from retrain.accelerators import (
    FLOAT32,
    MIXED,
    Accelerator,
    choose_precision,
    float32_copy,
    select_accelerator,
)

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize("setting, capabilities, expected", [
    ("auto", [], FLOAT32),                  # a CPU
    ("auto", [(7, 0)], MIXED),              # V100: float16 tensor cores
    ("auto", [(9, 0), (9, 0)], MIXED),
    ("auto", [(6, 1)], FLOAT32),            # P40: float16 without tensor cores
    ("auto", [(8, 0), (6, 1)], FLOAT32),    # one old GPU slows every replica
    ("auto", [None], FLOAT32),              # capability unknown
    ("mixed", [], MIXED),
    ("float32", [(9, 0)], FLOAT32),
])
def test_precision_follows_the_setting_and_the_gpus(setting, capabilities, expected):
    assert choose_precision(setting, capabilities) == expected


def test_a_cpu_machine_trains_float32_on_one_replica(capsys):
    accelerator = select_accelerator({"precision": "auto", "gpus": 0})
    assert accelerator.summary() == {"device": "CPU", "precision": FLOAT32, "replicas": 1}
    select_accelerator({"precision": "auto", "gpus": 2})
    assert "accelerator.gpus: 2 asked, 0 visible" in capsys.readouterr().err


def test_scope_sets_the_policy_and_restores_it():
    before = keras.config.dtype_policy().name
    with Accelerator((), MIXED, "CPU").scope():
        assert keras.config.dtype_policy().name == MIXED
    assert keras.config.dtype_policy().name == before == FLOAT32


@pytest.mark.slow
def test_two_replicas_give_the_loss_and_gradients_of_one_device():
    result = subprocess.run([sys.executable, str(TESTS / "two_replicas.py")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(result.stdout.strip().splitlines()[-1])
    one, two = runs["one"], runs["two"]
    assert (one["replicas_in_sync"], two["replicas_in_sync"]) == (1, 2)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert len(one["gradients"]) == len(two["gradients"]) == 6  # 2 conv + dense, kernel + bias
    for single, replicated in zip(one["gradients"], two["gradients"]):
        single, replicated = np.asarray(single), np.asarray(replicated)
        assert np.abs(single).max() > 1e-4  # a real gradient, not a vanished one
        # Each replica sees half the batch; Keras scales its loss by 1/2 and the gradients
        # are summed, so the step is the mean over the global batch, as on one device.
        np.testing.assert_allclose(replicated, single, rtol=1e-4, atol=1e-6)


def noisy_shapes(count: int, classes: int, noise: float, seed: int):
    """Generated shape images whose labels are wrong for a `noise` fraction: accuracy then
    stays well below 1 and the binomial interval below has something to measure."""
    from retrain.synthetic import draw_image

    rng = np.random.default_rng(seed)
    truth = np.arange(count) % classes
    images = np.stack([np.asarray(draw_image(int(c), 32, rng)) for c in truth])
    flipped = rng.random(count) < noise
    labels = np.where(flipped, rng.integers(0, classes, count), truth)
    return images, labels.astype(np.int64)


def train_tiny(precision: str, train, test) -> tuple[keras.Model, np.ndarray]:
    from two_replicas import tiny_conv_base

    from retrain.finetune import Recipe, Split, assemble_model, fine_tune
    from retrain.head import build_head
    from retrain.reproducibility import make_deterministic

    make_deterministic(0)
    with Accelerator((), precision, "CPU").scope():
        base = tiny_conv_base()
        model = assemble_model(base, build_head(base.output.shape[-1], 4, 0.0, seed=0))
        fine_tune(model, Split(*train), Split(train[0][:32], train[1][:32]),
                  Recipe(learning_rate=1e-2, epochs=3, batch_size=32, seed=0), path="full")
        assert type(model.optimizer).__name__ == (
            "LossScaleOptimizer" if precision == MIXED else "Adam")
    return model, np.asarray(model.predict(test[0], verbose=0))


@pytest.mark.slow
def test_mixed_precision_keeps_float32_outputs_and_the_accuracy_of_float32():
    images, labels = noisy_shapes(800, classes=4, noise=0.3, seed=0)
    train, test = (images[:400], labels[:400]), (images[400:], labels[400:])
    reference, reference_probabilities = train_tiny(FLOAT32, train, test)
    mixed, probabilities = train_tiny(MIXED, train, test)

    assert mixed.get_layer("backbone").get_layer("conv_2").compute_dtype == "float16"
    assert mixed.output.dtype == probabilities.dtype == "float32"
    assert all(w.dtype == "float32" for w in mixed.weights)  # float32 master weights

    n = len(test[1])
    hits = int((reference_probabilities.argmax(1) == test[1]).sum())
    mixed_accuracy = float((probabilities.argmax(1) == test[1]).mean())
    # Clopper-Pearson 95% interval of the float32 model's test accuracy: where another
    # model of the same true accuracy would land in 95% of test sets of this size.
    interval = binomtest(hits, n).proportion_ci(confidence_level=0.95, method="exact")
    assert interval.low > 1 / 4, "float32 model did not learn: the comparison means nothing"
    assert interval.high < 1, "accuracy saturated: the comparison means nothing"
    assert interval.low <= mixed_accuracy <= interval.high, (
        f"mixed precision accuracy {mixed_accuracy:.3f} outside float32's 95% interval "
        f"[{interval.low:.3f}, {interval.high:.3f}] ({hits}/{n})")

    # What the stage saves: every layer back in float32, the same probabilities.
    portable = float32_copy(mixed)
    assert {layer.compute_dtype for layer in portable.get_layer("backbone").layers} == {
        "float32"}
    np.testing.assert_allclose(portable.predict(test[0], verbose=0), probabilities, atol=2e-2)
