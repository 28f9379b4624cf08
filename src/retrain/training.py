"""What the head and fine-tuning stages share: class weights and per-epoch curves."""

from __future__ import annotations

import time

import keras
import numpy as np
from dvclive import Live
from sklearn.utils.class_weight import compute_class_weight

CURVE_METRICS = ("loss", "accuracy")


def balanced_class_weights(labels: np.ndarray, classes: int) -> dict[int, float]:
    """Weights n_samples / (n_classes * n_c) for the classes present (scikit-learn's rule)."""
    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    by_class = dict(zip(present.tolist(), weights.tolist()))
    return {c: by_class.get(c, 1.0) for c in range(classes)}


class CurveLogger(keras.callbacks.Callback):
    """Log train/val loss and accuracy per epoch with dvclive, on a shared epoch axis.

    Fine-tuning starts its steps where the head stopped (`first_step`), so both phases
    read as one curve.
    """

    def __init__(self, live: Live, first_step: int = 0):
        super().__init__()
        self.live = live
        self.live.step = first_step

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        for name in CURVE_METRICS:
            if name in logs:
                self.live.log_metric(f"train/{name}", float(logs[name]))
            if f"val_{name}" in logs:
                self.live.log_metric(f"val/{name}", float(logs[f"val_{name}"]))
        self.live.next_step()


class TrainingThroughput(keras.callbacks.Callback):
    """Training images per second, from the training part of each epoch (validation left out).

    The first epoch pays for tracing (and XLA compilation on a GPU), so it counts only when
    it is the only one.
    """

    def __init__(self, images_per_epoch: int):
        super().__init__()
        self.images_per_epoch = images_per_epoch
        self.seconds: list[float] = []
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_test_begin(self, logs=None):  # validation starts: the training part is over
        self._stop()

    def on_epoch_end(self, epoch, logs=None):
        self._stop()

    def _stop(self):
        if self._start is not None:
            self.seconds.append(time.perf_counter() - self._start)
            self._start = None

    def images_per_second(self) -> float:
        steady = self.seconds[1:] or self.seconds
        if not steady:
            return 0.0
        return round(self.images_per_epoch * len(steady) / sum(steady), 2)


def history_summary(history: keras.callbacks.History, monitor: str = "val_loss") -> dict:
    """Final and best epoch figures of a fit, for the stage's metrics file."""
    logs = history.history
    best = int(np.argmin(logs[monitor])) if monitor in logs else len(logs["loss"]) - 1
    return {
        "epochs_run": len(logs["loss"]),
        "best_epoch": best + 1,
        **{(key if key.startswith("val_") else f"train_{key}"): round(float(values[best]), 6)
           for key, values in logs.items() if key != "learning_rate"},
    }
