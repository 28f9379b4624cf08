"""The full model and its fine-tuning.

    raw pixels -> preprocess -> backbone (inference mode, also under fit) -> pool -> dropout
    -> dense

The dense layer starts from the trained head, so before fine-tuning the full model gives
the same probabilities on an image as the head on that image's cached features.

Two exact paths train it, on the same augmented views (`retrain.augment`) in the same
batches:

- `cached` (when layers below `finetune.from_layer` and BatchNorm are frozen): the frozen
  lower part (`retrain.frozen_part`) runs once per view under the fast inference engine
  (LiteRT on a CPU, about 2x TensorFlow), and only the upper part trains, on its outputs.
  By default each epoch draws new views, so training views stream from the engine to the
  optimizer; views that come back (validation images, training images without continuous
  augmentation, a bounded set of views per image with `finetune.augment.views`) are kept
  in a temporary file within a budget.
- `full`: every step runs the whole model on the pixels (`train_batchnorm`, `from_layer` 0,
  or `finetune.path: full`).

Replicates (`finetune.replicates`) are K models fine-tuned from the same head on the same
split, each with its own training seed (`replicate_seeds`): its order of the images in each
epoch and its dropout masks. They share the augmented views (drawn with the run's seed), so
on the cached path the frozen part computes each view once and its outputs feed every
replicate's upper part; what the replicates' spread leaves out is the noise of which
brightness, contrast and flip each image got.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from queue import Full, Queue

import keras
import numpy as np
import tensorflow as tf

from retrain.augment import Augmentation, epoch_views
from retrain.base import BACKBONE, set_inference_mode
from retrain.cache import user_cache_dir
from retrain.errors import ParamsError, first_line
from retrain.frozen_part import FrozenCut, cut_frozen_part
from retrain.head import CLASSIFIER, StopOnInterrupt, compile_classifier
from retrain.quiet import native_chatter_hidden


def assemble_model(base: keras.Model, head: keras.Model) -> keras.Model:
    """Stack the trained head on the base's pooled features, sharing the head's weights."""
    x = keras.layers.GlobalAveragePooling2D(name="pool")(base.output)
    x = keras.layers.Dropout(head.get_layer("dropout").rate, name="dropout")(x)
    # float32 even under a mixed-precision policy: a float16 softmax rounds small
    # probabilities to 0 and the loss to inf (the Keras mixed-precision guide's advice).
    classifier = keras.layers.Dense(head.get_layer(CLASSIFIER).units, activation="softmax",
                                    dtype="float32", name=CLASSIFIER)
    probabilities = classifier(x)
    classifier.set_weights(head.get_layer(CLASSIFIER).get_weights())
    return keras.Model(base.input, probabilities, name="classifier_model")


def unfreeze_from(model: keras.Model, from_layer: int, train_batchnorm: bool = False) -> None:
    """Make backbone layers `from_layer` and up trainable; keep BatchNorm frozen by default.

    Keras 3 runs a trainable BatchNormalization layer in training mode even inside a base
    called with `training=False` (keras-team/keras#20285), which would overwrite the
    ImageNet moving statistics with those of a few small batches; the same flag would
    turn on the Dropout layers inside the base (EfficientNet's stochastic depth), which
    the cached path's frozen part never runs. So the base stays in inference mode
    (`set_inference_mode`) and its BatchNorm layers frozen. Only training from random
    weights (`train_batchnorm`, the from-scratch baseline) wants training mode: frozen
    random statistics would make the network meaningless.
    """
    backbone = model.get_layer(BACKBONE)
    set_inference_mode(backbone, not train_batchnorm)
    depth = len(backbone.layers)
    if from_layer >= depth:
        raise ParamsError(f"finetune.from_layer: {from_layer} is beyond the backbone's "
                          f"{depth} layers (0..{depth - 1})")
    model.trainable = True
    for index, layer in enumerate(backbone.layers):
        layer.trainable = index >= from_layer
        if isinstance(layer, keras.layers.BatchNormalization) and not train_batchnorm:
            layer.trainable = False


def count_params(model: keras.Model) -> dict:
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    frozen = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    return {"total": trainable + frozen, "trainable": trainable, "non_trainable": frozen}


@dataclass
class Split:
    images: np.ndarray  # uint8 (N, size, size, 3): decoded images (`images.image_rows`)
    labels: np.ndarray  # int64 (N,)


@dataclass
class Recipe:
    learning_rate: float
    epochs: int
    batch_size: int
    seed: int  # each epoch's order of the images (and, through Keras, the dropout masks)
    augmentation: Augmentation = field(default_factory=Augmentation)
    class_weight: dict | None = None
    view_seed: int | None = None  # the augmented views' draws; None: `seed`

    @property
    def views(self) -> int:
        return self.seed if self.view_seed is None else self.view_seed


def replicate_weights_name(index: int) -> str:
    """Replicate `index`'s weights file in the finetune stage's replicates folder."""
    return f"replicate_{index}.weights.h5"


def replicate_seeds(seed: int, count: int) -> list[int]:
    """Training seeds of `count` replicates: `seed` itself first (so one replicate trains
    exactly as a run without replicates), then seeds drawn from `SeedSequence([seed, k])`:
    reproducible, distinct, and unrelated to `seed + k` (a neighbouring run's seed)."""
    seeds, k = [seed], 1
    while len(seeds) < count:
        drawn = int(np.random.SeedSequence([seed, k]).generate_state(1)[0] >> 1)  # < 2**31
        if drawn not in seeds:
            seeds.append(drawn)
        k += 1
    return seeds


@dataclass
class Outcome:
    history: keras.callbacks.History
    path: str  # "cached" or "full"
    details: dict = field(default_factory=dict)  # why full; or what was cut, how, and kept


def fine_tune(model: keras.Model, train: Split, val: Split, recipe: Recipe, *,
              path: str = "auto", train_batchnorm: bool = False, make_engine=None,
              cache_bytes: int = 2 << 30, callbacks: list | None = None) -> Outcome:
    """Fine-tune `model` (assembled and unfrozen) on the images, by the fastest exact path.

    `cached`: the frozen lower part runs once per view under `make_engine(lower_model)`
    (`lower_part_engine`: LiteRT on a CPU; default Keras) and only the upper part trains,
    on its outputs. `full`: every step runs the whole model on the pixels. Both train on
    the same views in the same batches. `cache_bytes` bounds the outputs kept on disk.
    """
    [outcome] = fine_tune_replicates([model], train, val, [recipe], path=path,
                                     train_batchnorm=train_batchnorm, make_engine=make_engine,
                                     cache_bytes=cache_bytes, callbacks=lambda _: callbacks)
    return outcome


def fine_tune_replicates(models: Iterable[keras.Model], train: Split, val: Split,
                         recipes: list[Recipe], *, path: str = "auto",
                         train_batchnorm: bool = False, make_engine=None,
                         cache_bytes: int = 2 << 30,
                         callbacks: Callable[[int], list | None] | None = None
                         ) -> Iterator[Outcome]:
    """Fine-tune replicate k, `models[k]`, with `recipes[k]`, one after another (`models`
    may build each when asked), yielding each one's Outcome when it is trained.

    The recipes differ in their `seed` only: the replicates train on the same views, so on
    the cached path the frozen part's outputs of a view are computed once and read by every
    replicate (kept on disk within `cache_bytes`; beyond it each replicate recomputes them).
    `callbacks(k)` gives replicate k's callbacks.
    """
    if len({(r.views, r.epochs, r.augmentation) for r in recipes}) > 1:
        raise ValueError("replicates share their views: one view seed, epochs, augmentation")
    reason = "finetune.path: full"
    if path == "auto":
        reason = ("finetune.train_batchnorm: BatchNorm layers learn their statistics"
                  if train_batchnorm  # the from-scratch baseline: BatchNorm in training mode
                  else "nothing but preprocessing is frozen below finetune.from_layer")
    if make_engine is None:
        from retrain.features import KerasEngine as make_engine
    with ExitStack() as cleanup:
        shared = None
        for index, (model, recipe) in enumerate(zip(models, recipes, strict=True)):
            extra = callbacks(index) if callbacks else None
            cut = cut_frozen_part(model) if path == "auto" and not train_batchnorm else None
            if cut is None:
                history = _fit(model, full_path_batches(train, val, recipe), recipe, extra)
                yield Outcome(history, "full", {"reason": reason})
                continue
            if shared is None:  # the lower parts of all replicates are the same function
                shared = FrozenOutputs.compute(cut, train, val, recipes, make_engine,
                                               cache_bytes, cleanup)
            history = _fit(cut.upper, cached_path_batches(cut, train, val, recipe, shared),
                           recipe, extra)
            yield Outcome(history, "cached", dict(shared.details))


def _fit(model: keras.Model, batches: tuple, recipe: Recipe,
         callbacks: list | None) -> keras.callbacks.History:
    train, val, steps = batches
    compile_classifier(model, recipe.learning_rate)
    # One dataset runs through every epoch (its order and views are drawn per epoch), so
    # fit takes `steps` batches from it per epoch.
    with native_chatter_hidden():  # tf.data's determinism rewrite prints an `E` line
        return model.fit(train, validation_data=val, epochs=recipe.epochs,
                         steps_per_epoch=steps, class_weight=recipe.class_weight,
                         callbacks=[*(callbacks or []), StopOnInterrupt()],
                         shuffle=False, verbose=2)  # the order is drawn per epoch


def training_batches(split: Split, recipe: Recipe, inputs: Callable) -> Iterator:
    """(inputs(views, indices), labels) per batch, epoch after epoch, in each epoch's order.

    A batch's indices are sorted: reads from the image file go forward.
    """
    for epoch in range(recipe.epochs):
        views = epoch_views(recipe.views, epoch, len(split.labels), recipe.augmentation,
                            order_seed=recipe.seed)
        for start in range(0, len(split.labels), recipe.batch_size):
            indices = np.sort(views.order[start : start + recipe.batch_size])
            yield inputs(views, indices), split.labels[indices]


def validation_batches(split: Split, batch_size: int, inputs: Callable) -> Iterator:
    for start in range(0, len(split.labels), batch_size):
        indices = np.arange(start, min(start + batch_size, len(split.labels)))
        yield inputs(indices), split.labels[indices]


def read_ahead(batches: Iterator, depth: int = 3) -> Iterator:
    """The items of `batches`, produced in a thread of their own up to `depth` ahead.

    tf.data runs a generator inside the training step's input op, so the frozen part's
    engine and the optimiser step would take turns (measured: no overlap at all); in a
    thread of its own, the engine (which releases the GIL) computes the next batches while
    TensorFlow trains on this one.
    """
    done = object()
    queue: Queue = Queue(depth)
    failure: list[BaseException] = []
    stop = threading.Event()

    def produce():
        try:
            for item in batches:
                while not stop.is_set():
                    try:
                        queue.put(item, timeout=0.1)
                        break
                    except Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            failure.append(exc)
        queue.put(done)

    worker = threading.Thread(target=produce, name="retrain-read-ahead", daemon=True)
    worker.start()
    try:
        while (item := queue.get()) is not done:
            yield item
        if failure:
            raise failure[0]
    finally:
        stop.set()


def _dataset(batches: Callable[[], Iterator], count: int, x_spec) -> tf.data.Dataset:
    """`count` batches from a generator, the next ones prepared while the model trains."""
    signature = (x_spec, tf.TensorSpec((None,), tf.int64))
    dataset = tf.data.Dataset.from_generator(lambda: read_ahead(batches()),
                                             output_signature=signature)
    return dataset.apply(tf.data.experimental.assert_cardinality(count))


def _steps(split: Split, batch_size: int) -> int:
    return -(-len(split.labels) // batch_size)


def full_path_batches(train: Split, val: Split, recipe: Recipe) -> tuple:
    """Pixels of the views through the whole model: today's recipe, every layer every step."""
    spec = tf.TensorSpec((None, *train.images.shape[1:]), tf.float32)

    def train_pixels(views, indices):
        return views.pixels(train.images, indices)

    def val_pixels(indices):
        return np.asarray(val.images[indices], np.float32)

    return (_dataset(lambda: training_batches(train, recipe, train_pixels),
                     recipe.epochs * _steps(train, recipe.batch_size), spec),
            _dataset(lambda: validation_batches(val, recipe.batch_size, val_pixels),
                     _steps(val, recipe.batch_size), spec),
            _steps(train, recipe.batch_size))


class KeptRows:
    """Float32 rows in an unlinked temporary file (a killed run leaves nothing behind),
    written and read with positioned I/O: through the page cache, never mapped into the
    process, so they add nothing to its resident memory (a memmap where `os.pread` is
    missing)."""

    def __init__(self, rows: int, width: int, directory=None):
        self._file = tempfile.TemporaryFile(prefix="retrain-activations-", dir=directory)
        self._file.truncate(rows * width * 4)  # sparse until written
        self._fd, self._row_bytes, self.width = self._file.fileno(), width * 4, width
        self._map = None if hasattr(os, "pread") else \
            np.memmap(self._file, np.float32, "r+", shape=(rows, width))

    def write(self, keys: np.ndarray, values: np.ndarray) -> None:
        if self._map is not None:
            self._map[keys] = values
            return
        for key, value in zip(keys, np.ascontiguousarray(values, np.float32)):
            os.pwrite(self._fd, value.tobytes(), int(key) * self._row_bytes)

    def read(self, keys: np.ndarray) -> np.ndarray:
        if self._map is not None:
            return np.asarray(self._map[keys])
        out = np.empty((len(keys), self.width), np.float32)
        for row, key in zip(out, keys):
            row[:] = np.frombuffer(os.pread(self._fd, self._row_bytes,
                                            int(key) * self._row_bytes), np.float32)
        return out

    def close(self) -> None:
        self._map = None
        self._file.close()


class LowerOutputs:
    """The lower part's outputs for one split's views, by the engine; those that come back
    (each validation image every epoch; training views without continuous augmentation)
    are kept (`KeptRows`), computed the first time they are needed."""

    def __init__(self, engine, width: int, kept_rows: int = 0, directory=None):
        self.engine = engine
        self.kept = KeptRows(kept_rows, width, directory) if kept_rows else None
        self.done = np.zeros(kept_rows, bool)

    def __call__(self, pixels: Callable[[np.ndarray], np.ndarray], indices: np.ndarray,
                 keys: np.ndarray) -> np.ndarray:
        """Outputs for the batch `indices` (`keys` name their views; `pixels(indices)`
        gives the views' pixels)."""
        if self.kept is None:
            return self.engine(pixels(indices))
        new = ~self.done[keys]
        if new.any():
            self.kept.write(keys[new], self.engine(pixels(indices[new])))
            self.done[keys[new]] = True
        return self.kept.read(keys)

    def close(self) -> None:
        if self.kept is not None:
            self.kept.close()


@dataclass
class FrozenOutputs:
    """The frozen part's outputs for the training views and the validation images, shared
    by the replicates; which of them are kept on disk, and under which key a view is."""

    train: LowerOutputs
    val: LowerOutputs
    by_draw: bool  # continuous views, kept per (draw, image) where a draw recurs
    details: dict

    @classmethod
    def compute(cls, cut: FrozenCut, train: Split, val: Split, recipes: list[Recipe],
                make_engine, cache_bytes: int, cleanup: ExitStack) -> FrozenOutputs:
        recipe, row_bytes = recipes[0], cut.width * 4
        val_rows = len(val.labels) if len(val.labels) * row_bytes <= cache_bytes else 0
        # Without continuous augmentation a training image has at most two views (flipped
        # or not), which recur every epoch: keep them when they fit beside the validation
        # set. With it, a draw of views recurs in a later epoch (`augment.views` below
        # `epochs`) or in the next replicate: keep every draw's.
        by_draw, draws = recipe.augmentation.continuous, recipe.augmentation.draws(recipe.epochs)
        recurring = 2 * len(train.labels) if not by_draw else \
            draws * len(train.labels) if len(recipes) > 1 or draws < recipe.epochs else 0
        train_rows = recurring if (val_rows + recurring) * row_bytes <= cache_bytes else 0
        directory = user_cache_dir("activations")
        # Separate engines: fit validates while the training dataset prefetches in its thread.
        engine = make_engine(cut.lower)
        train_outputs = cleanup.enter_context(closing(
            LowerOutputs(engine, cut.width, train_rows, directory)))
        val_outputs = cleanup.enter_context(closing(
            LowerOutputs(make_engine(cut.lower) if not val_rows else engine, cut.width,
                         val_rows, directory)))
        if val_rows:  # computed up front, while no training batch needs the engine
            for start in range(0, len(val.labels), 256):
                indices = np.arange(start, min(start + 256, len(val.labels)))
                val_outputs(lambda i: np.asarray(val.images[i], np.float32), indices, indices)
        details = {"cut": cut.names, "cut_values_per_image": cut.width,
                   "engine": getattr(engine, "name", type(engine).__name__),
                   "kept_mb": round((val_rows + train_rows) * row_bytes / 2**20, 3),
                   "replicates_share_frozen_outputs": len(recipes) > 1 and bool(train_rows)}
        return cls(train_outputs, val_outputs, by_draw, details)

    def train_keys(self, views, indices: np.ndarray, count: int) -> np.ndarray:
        return views.draw * count + indices if self.by_draw else views.view_keys(indices)


def cached_path_batches(cut: FrozenCut, train: Split, val: Split, recipe: Recipe,
                        outputs: FrozenOutputs) -> tuple:
    """The upper part's inputs for the same views `full_path_batches` draws."""

    def train_inputs(views, indices):
        flat = outputs.train(lambda i: views.pixels(train.images, i), indices,
                             outputs.train_keys(views, indices, len(train.labels)))
        return cut.split(flat)

    def val_inputs(indices):
        return cut.split(outputs.val(lambda i: np.asarray(val.images[i], np.float32),
                                     indices, indices))

    spec = tuple(tf.TensorSpec((None, *shape), tf.float32) for shape in cut.shapes)
    return (_dataset(lambda: training_batches(train, recipe, train_inputs),
                     recipe.epochs * _steps(train, recipe.batch_size), spec),
            _dataset(lambda: validation_batches(val, recipe.batch_size, val_inputs),
                     _steps(val, recipe.batch_size), spec),
            _steps(train, recipe.batch_size))


def lower_part_engine(model_params: dict) -> Callable[[keras.Model], object]:
    """What runs the frozen lower part: LiteRT on a CPU (as `extract` does), else Keras."""

    def make(lower: keras.Model):
        from retrain.features import KerasEngine, make_engine
        from retrain.litert import ConversionError

        try:
            return make_engine("auto", lower, model_params)
        except ConversionError as exc:
            print(f"finetune: {first_line(exc)}; the frozen part runs under Keras",
                  file=sys.stderr)
            return KerasEngine(lower)

    return make
