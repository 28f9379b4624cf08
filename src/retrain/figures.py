"""The render stage's figures: one function per PNG, each taking arrays or tables and a path.

Figures are built with `matplotlib.figure.Figure` directly, never through pyplot: that
draws with the Agg canvas whatever backend a user has configured, needs no display, and
keeps no global registry of open figures, so nothing is left open between figures. Each
PNG is written under a temporary name and renamed (retrain.atomic).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import Normalize, PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from retrain.atomic import atomic_path
from retrain.errors import DataError

DPI = 100
CELL_INCHES = 2.4          # one image of a grid
GRID_COLUMNS = 4
SAMPLE_COLUMNS = 5
CORRECT, WRONG = "#1a7f37", "#c62828"
HEAT_ALPHA = 0.45
CURVE_METRICS = ("loss", "accuracy")
SPLIT_STYLES = {"train": {"color": "#1f77b4", "linestyle": "-"},
                "val": {"color": "#ff7f0e", "linestyle": "--"}}
PHASE_LABELS = {"head": "head", "finetune": "fine-tuning"}


# ---------------------------------------------------------------- inputs and selection

def read_curves(live_dir: str | Path) -> pd.DataFrame:
    """A dvclive folder's per-epoch curves: columns step, then {train,val}_{loss,accuracy}
    for those present (dvclive writes plots/metrics/<split>/<metric>.tsv)."""
    live_dir = Path(live_dir)
    if not live_dir.is_dir():
        raise DataError(f"{live_dir}: dvclive folder not found (run the training stages first)")
    merged = None
    for split in SPLIT_STYLES:
        for metric in CURVE_METRICS:
            path = live_dir / "plots" / "metrics" / split / f"{metric}.tsv"
            if not path.exists():
                continue
            table = pd.read_csv(path, sep="\t")
            if "step" not in table or metric not in table:
                raise DataError(f"{path}: expected columns step and {metric}")
            table = table[["step", metric]].rename(columns={metric: f"{split}_{metric}"})
            merged = table if merged is None else merged.merge(table, on="step", how="outer")
    if merged is None:
        raise DataError(f"{live_dir}: no curves under plots/metrics/{{train,val}}/")
    return merged.sort_values("step").reset_index(drop=True)


def read_predictions(path: str | Path, classes: Sequence[str]) -> pd.DataFrame:
    """The evaluate stage's per-image table (path, sha256, actual, predicted,
    prob_<class>...)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: predictions not found (run the evaluate stage first)")
    table = pd.read_csv(path, dtype={"path": str, "actual": str, "predicted": str},
                        keep_default_na=False)
    missing = {"path", "actual", "predicted"} - set(table.columns)
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    unknown = sorted((set(table["actual"]) | set(table["predicted"])) - set(classes))
    if unknown:
        raise DataError(f"{path}: class(es) not in the manifests' class list: "
                        f"{', '.join(unknown[:5])} (re-run the evaluate stage)")
    return table


def seeded_choice(indices: Sequence[int], count: int, seed: int) -> np.ndarray:
    """Up to `count` of `indices`, chosen without replacement, in their original order."""
    indices = np.asarray(indices)
    if len(indices) <= count:
        return indices
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(indices, size=count, replace=False))


def round_robin_by_class(labels: Sequence[int], count: int, seed: int) -> np.ndarray:
    """Up to `count` indices taking one seeded image per class in turn, so every class shows
    (with as many classes as grid columns, each column holds one class)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    queues = [list(rng.permutation(np.flatnonzero(labels == label)))
              for label in np.unique(labels)]
    chosen: list[int] = []
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(int(queue.pop(0)))
    return np.asarray(chosen, dtype=np.int64)


# ---------------------------------------------------------------- writing

def _save(fig: Figure, dest: str | Path) -> Path:
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        # No "Software" stamp: the same inputs give byte-identical PNGs.
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    fig.clear()
    return dest


def _message_figure(text: str, dest: str | Path, title: str = "") -> Path:
    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    if title:
        fig.suptitle(title, fontsize=13)
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=13, wrap=True)
    return _save(fig, dest)


def _image_grid(count: int, columns: int, title_lines: int, suptitle: str,
                colorbar: bool = False) -> tuple[Figure, np.ndarray]:
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    width = columns * CELL_INCHES + (0.9 if colorbar else 0.0)
    height = rows * (CELL_INCHES + 0.18 * title_lines + 0.1) + 0.5
    fig = Figure(figsize=(max(width, 4.0), height), layout="constrained")
    fig.suptitle(suptitle, fontsize=13)
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    return fig, axes


def _short(name: str, limit: int = 22) -> str:
    """A class name cut to fit above one grid image without running into its neighbour."""
    name = str(name)
    return name if len(name) <= limit else name[: limit - 1] + "\u2026"


def _title_font(titles: Sequence[str], largest: float) -> float:
    """The largest font (down to 7 pt) at which every title line fits one grid cell."""
    longest = max((len(line) for title in titles for line in title.splitlines()), default=1)
    return float(np.clip(CELL_INCHES * 72 / (0.62 * longest), 7, largest))


def _outcome_title(actual: str, predicted: str, confidence: float | None,
                   actual_word: str, predicted_word: str) -> str:
    share = "" if confidence is None or np.isnan(confidence) else f" ({confidence:.0%})"
    return f"{actual_word}: {_short(actual)}\n{predicted_word}: {_short(predicted)}{share}"


# ---------------------------------------------------------------- figures

def confusion_matrix_figure(actual: Sequence[str], predicted: Sequence[str],
                            classes: Sequence[str], dest: str | Path, *,
                            clip: float = 0.0, title: str = "Confusion matrix",
                            accuracy_interval: Sequence[float] | None = None) -> Path:
    """Counts and row-normalised matrices side by side, each with its colour bar.

    `accuracy_interval` ([low, high], a 95% bootstrap interval over the test images) is
    shown next to the accuracy in the title.

    Readable from 2 to hundreds of classes: the figure grows with the class count up to a
    cap; beyond 30 classes per-cell numbers are hidden, and tick labels are thinned so they
    never overlap. `clip` > 0 caps the count colour scale (e.g. at 5) so that the few
    off-diagonal confusions stay visible next to a large diagonal.
    """
    classes = list(classes)
    n = len(classes)
    index = {name: i for i, name in enumerate(classes)}
    try:
        rows = np.array([index[a] for a in actual], dtype=np.int64)
        cols = np.array([index[p] for p in predicted], dtype=np.int64)
    except KeyError as exc:
        raise DataError(f"confusion matrix: class {exc.args[0]!r} is not in the class "
                        "list") from None
    counts = np.zeros((n, n), dtype=np.int64)
    np.add.at(counts, (rows, cols), 1)
    support = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(support > 0, counts / np.maximum(support, 1), np.nan)

    side = float(np.clip(2.5 + 0.32 * n, 4.5, 14.0))   # inches per matrix
    label_chars = max(len(name) for name in classes)
    margin = min(0.075 * label_chars + 0.6, 2.6)        # room for tick labels
    fig = Figure(figsize=(2 * side + 2 * margin + 2.2, side + margin + 0.9),
                 layout="constrained")
    total = int(counts.sum())
    accuracy = np.trace(counts) / total if total else float("nan")
    headline = f"{title}: {total} images, accuracy {accuracy:.1%}"
    if accuracy_interval is not None:
        low, high = accuracy_interval
        headline += (f"\n95% bootstrap interval over the test images: "
                     f"{low:.1%} to {high:.1%}")
    fig.suptitle(headline, fontsize=14)
    ax_counts, ax_norm = fig.subplots(1, 2)

    vmax = float(clip) if clip > 0 else max(1.0, float(counts.max()))
    clipped = clip > 0 and counts.max() > clip
    show_numbers = n <= 30
    # Without numbers, a lone confusion must still show as a visible cell: a square-root
    # colour scale lifts small values off the white of the zeros.
    scale = Normalize if show_numbers else (lambda vmin, vmax: PowerNorm(0.5, vmin, vmax))
    norms = (scale(vmin=0, vmax=vmax), scale(vmin=0, vmax=1))
    blues = colormaps["Blues"].with_extremes(bad="#dddddd")
    bar_size = {"shrink": 0.8, "aspect": 20 if n <= 30 else 40}
    image = ax_counts.imshow(counts, cmap=blues, norm=norms[0], interpolation="nearest")
    bar = fig.colorbar(image, ax=ax_counts, extend="max" if clipped else "neither", **bar_size)
    bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    bar.set_label("images" + (f" (colour clipped at {clip:g})" if clip > 0 else ""))
    ax_counts.set_title("Counts", fontsize=12)
    image = ax_norm.imshow(normalised, cmap=blues, norm=norms[1], interpolation="nearest")
    bar = fig.colorbar(image, ax=ax_norm, **bar_size)
    bar.set_label("fraction of the true class (recall on the diagonal)")
    ax_norm.set_title("Normalised by true class", fontsize=12)

    # Tick labels: the largest font in [7, 10] pt that fits every label, else 7 pt on
    # every k-th class.
    pitch = side * 72 / n                     # points between neighbouring cells
    font = float(np.clip(pitch / 1.4, 7, 10))
    step = max(1, math.ceil(1.4 * font / pitch))
    ticks = np.arange(0, n, step)
    cell_font = float(np.clip(pitch / 3.2, 6, 11))
    for ax, matrix, fmt, norm in ((ax_counts, counts, "{:d}", norms[0]),
                                  (ax_norm, normalised, "{:.2f}", norms[1])):
        ax.set_xticks(ticks, [classes[i] for i in ticks], fontsize=font,
                      rotation=90 if n > 12 or label_chars > 10 else 45,
                      ha="center" if n > 12 or label_chars > 10 else "right",
                      rotation_mode="anchor" if n <= 12 and label_chars <= 10 else "default")
        ax.set_yticks(ticks, [classes[i] for i in ticks], fontsize=font)
        ax.set_xlabel("predicted class", fontsize=11)
        ax.set_ylabel("true class", fontsize=11)
        if step > 1:
            ax.tick_params(length=2)
        if not show_numbers:
            continue
        for (i, j), value in np.ndenumerate(matrix):
            if np.isnan(value) or (value == 0 and n > 12):  # zeros would only add clutter
                continue
            dark = norm(value) > 0.55
            ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=cell_font,
                    color="white" if dark else "#222222")
    if step > 1:
        fig.text(0.5, 0.002, f"{n} classes: one in {step} labelled, colour on a square-root "
                 "scale", ha="center", va="bottom", fontsize=10, color="#555555")
    return _save(fig, dest)


def cam_figure(images: np.ndarray, heatmaps: np.ndarray, actual: Sequence[str],
               predicted: Sequence[str], confidence: Sequence[float], dest: str | Path, *,
               title: str, empty_message: str, method: str = "cam") -> Path:
    """Heat maps of the predicted class over the photos, titled true/predicted/probability.

    With no images (say, no misclassified test image) the PNG says `empty_message`.
    """
    if len(images) == 0:
        return _message_figure(empty_message, dest, title)
    if heatmaps.shape[:3] != images.shape[:3]:
        raise ValueError(f"heat maps {heatmaps.shape} do not match images {images.shape}")
    titles = [_outcome_title(true, pred, share, "true", "predicted")
              for true, pred, share in zip(actual, predicted, confidence, strict=True)]
    font = _title_font(titles, 10)
    fig, axes = _image_grid(len(images), GRID_COLUMNS, 2, title, colorbar=True)
    for ax, image, heat, text, true, pred in zip(axes.flat, images, heatmaps, titles, actual,
                                                 predicted, strict=False):
        ax.imshow(image)
        # Same pixel grid as the photo, so the map sits exactly on what it explains.
        overlay = ax.imshow(heat, cmap="jet", alpha=HEAT_ALPHA, vmin=0, vmax=1,
                            extent=(-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5))
        ax.set_title(text, fontsize=font, color=CORRECT if true == pred else WRONG)
    bar = fig.colorbar(overlay, ax=axes, shrink=0.6, aspect=30)
    bar.set_label(("Grad-CAM" if method == "gradcam" else "CAM") + " of the predicted class "
                  "(normalised)")
    return _save(fig, dest)


def feature_channels_figure(image: np.ndarray, feature_map: np.ndarray, dest: str | Path, *,
                            channels: int = 12, title: str = "") -> Path:
    """The image and `channels` of the backbone's output channels for it, on one scale.

    The channels shown are those that vary most across the image: they say where something
    is. (The most active ones are mostly saturated everywhere, MobileNetV2 ending in ReLU6.)
    """
    flat = feature_map.reshape(-1, feature_map.shape[-1])
    spread = flat.std(axis=0)
    chosen = np.argsort(-spread, kind="stable")[:channels]
    columns = 4
    rows = math.ceil(len(chosen) / columns)
    fig = Figure(figsize=(4.2 + columns * 2.3, max(4.0, rows * 2.4) + 0.6),
                 layout="constrained")
    fig.suptitle(title or f"{len(chosen)} of {feature_map.shape[-1]} backbone output channels "
                 f"({feature_map.shape[0]}x{feature_map.shape[1]})", fontsize=13)
    left, right = fig.subfigures(1, 2, width_ratios=[3.4, columns * 2.3 + 0.8])
    ax = left.subplots()
    ax.imshow(image)
    ax.set_title("input image", fontsize=11)
    ax.set_axis_off()
    axes = right.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    low = min(0.0, float(flat[:, chosen].min())) if len(chosen) else 0.0
    high = max(float(flat[:, chosen].max()) if len(chosen) else 0.0, low + 1e-6)
    for ax, channel in zip(axes.flat, chosen, strict=False):
        shown = ax.imshow(feature_map[..., channel], cmap="viridis", vmin=low, vmax=high,
                          interpolation="nearest")
        ax.set_title(f"channel {channel}", fontsize=10)
    if len(chosen):
        right.colorbar(shown, ax=axes, shrink=0.7, aspect=30).set_label("activation")
    return _save(fig, dest)


def learning_curves_figure(phases: Sequence[tuple[str, pd.DataFrame]],
                           dest: str | Path) -> Path:
    """Loss and accuracy, train and validation, phase after phase on one epoch axis.

    `phases` are (name, table from `read_curves`); dvclive step s is epoch s + 1. A dashed
    line and shading mark where each later phase (fine-tuning) starts.
    """
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    fig.suptitle("Learning curves: head, then fine-tuning", fontsize=13)
    axes = fig.subplots(1, len(CURVE_METRICS))
    starts = []
    for ax, metric in zip(axes, CURVE_METRICS, strict=True):
        for phase_index, (name, table) in enumerate(phases):
            epochs = table["step"].to_numpy() + 1
            for split, style in SPLIT_STYLES.items():
                column = f"{split}_{metric}"
                if column not in table:
                    continue
                values = table[column].to_numpy(dtype=float)
                keep = ~np.isnan(values)
                label = f"{split} ({PHASE_LABELS.get(name, name)})"
                marker = "o" if phase_index == 0 else "s"
                ax.plot(epochs[keep], values[keep], marker=marker, markersize=4, label=label,
                        alpha=1.0 if phase_index else 0.75, **style)
            if ax is axes[0] and phase_index and len(epochs):
                starts.append((name, float(epochs.min()) - 0.5))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(metric.capitalize(), fontsize=12)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if metric == "accuracy":
            ax.set_ylim(max(-0.02, ax.get_ylim()[0]), min(1.02, max(ax.get_ylim()[1], 0.1)))
    last_epoch = max((t["step"].max() + 1 for _, t in phases if len(t)), default=1)
    for ax in axes:
        for name, start in starts:
            ax.axvline(start, color="#555555", linestyle=":", linewidth=1.5)
            ax.axvspan(start, last_epoch + 0.5, color="#888888", alpha=0.08, linewidth=0)
            # Inside the plot area, so it never collides with the axes title.
            ax.text(start, 0.98, f" {PHASE_LABELS.get(name, name)} \u2192",
                    transform=ax.get_xaxis_transform(), ha="left", va="top", fontsize=9,
                    color="#444444")
        ax.legend(fontsize=9, loc="best")
    return _save(fig, dest)


def samples_figure(images: np.ndarray, labels: Sequence[str], dest: str | Path, *,
                   columns: int = SAMPLE_COLUMNS, title: str = "Training images") -> Path:
    """A grid of images titled with their class names."""
    if len(images) == 0:
        return _message_figure("No images to show", dest, title)
    titles = [_short(label, 36) for label in labels]
    font = _title_font(titles, 11)
    fig, axes = _image_grid(len(images), columns, 1, title)
    for ax, image, text in zip(axes.flat, images, titles, strict=False):
        ax.imshow(image)
        ax.set_title(text, fontsize=font)
    return _save(fig, dest)


def predictions_figure(images: np.ndarray, actual: Sequence[str], predicted: Sequence[str],
                       dest: str | Path, *, confidence: Sequence[float] | None = None,
                       title: str = "Test images: label and prediction") -> Path:
    """Test images titled 'label: ... / prediction: ...' (green when right, red when wrong)."""
    if len(images) == 0:
        return _message_figure("No test images to show", dest, title)
    confidence = [None] * len(images) if confidence is None else confidence
    titles = [_outcome_title(true, pred, share, "label", "prediction")
              for true, pred, share in zip(actual, predicted, confidence, strict=True)]
    font = _title_font(titles, 10)
    fig, axes = _image_grid(len(images), GRID_COLUMNS, 2, title)
    for ax, image, text, true, pred in zip(axes.flat, images, titles, actual, predicted,
                                           strict=False):
        ax.imshow(image)
        ax.set_title(text, fontsize=font, color=CORRECT if true == pred else WRONG)
    return _save(fig, dest)


def label_issues_figure(images: np.ndarray, given: Sequence[str], suggested: Sequence[str],
                        quality: Sequence[float], dest: str | Path, *,
                        title: str = "Label issue candidates (lowest label quality first)"
                        ) -> Path:
    """Images titled 'given -> suggested' and their label quality (cleanlab's score)."""
    if len(images) == 0:
        return _message_figure("No labeled images to show", dest, title)
    titles = [f"{_short(old)} -> {_short(new)}\nquality {score:.3f}"
              for old, new, score in zip(given, suggested, quality, strict=True)]
    font = _title_font(titles, 10)
    fig, axes = _image_grid(len(images), GRID_COLUMNS, 2, title)
    for ax, image, text, old, new in zip(axes.flat, images, titles, given, suggested,
                                         strict=False):
        ax.imshow(image)
        ax.set_title(text, fontsize=font, color=WRONG if old != new else "#222222")
    return _save(fig, dest)


def near_duplicates_figure(groups: Sequence[tuple[np.ndarray, Sequence[str]]],
                           dest: str | Path, *,
                           title: str = "Near-duplicate groups across splits") -> Path:
    """One row per group, its images side by side, each titled with its split and name."""
    if not groups:
        return _message_figure("No near-duplicate group crosses splits", dest, title)
    columns = max(len(images) for images, _ in groups)
    fig = Figure(figsize=(max(columns * CELL_INCHES, 4.0),
                          len(groups) * (CELL_INCHES + 0.5) + 0.5), layout="constrained")
    fig.suptitle(title, fontsize=13)
    axes = fig.subplots(len(groups), columns, squeeze=False)
    for row, (images, captions) in zip(axes, groups, strict=True):
        font = _title_font(captions, 10)
        for ax in row:
            ax.set_axis_off()
        for ax, image, caption in zip(row, images, captions, strict=False):
            ax.imshow(image)
            ax.set_title(caption, fontsize=font)
    return _save(fig, dest)
