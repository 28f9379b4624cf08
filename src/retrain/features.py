"""Frozen-backbone features: one pass over the images, pooled features cached on disk.

Every head experiment then trains in seconds on the cached arrays instead of pushing each
image through the base again on every epoch.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from retrain.atomic import atomic_path
from retrain.base import build_base
from retrain.images import iter_image_batches


def pooled_model(base: keras.Model) -> keras.Model:
    """Base followed by global average pooling: the features the head is trained on."""
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(base.output)
    return keras.Model(base.input, pooled, name="feature_extractor")


def base_summary(base: keras.Model) -> dict:
    trainable = sum(int(np.prod(w.shape)) for w in base.trainable_weights)
    frozen = sum(int(np.prod(w.shape)) for w in base.non_trainable_weights)
    return {
        "feature_map_shape": [int(d) for d in base.output.shape[1:]],
        "feature_size": int(base.output.shape[-1]),
        "base_params": {"total": trainable + frozen, "trainable": trainable,
                        "non_trainable": frozen},
    }


class KerasEngine:
    """Runs the extractor as a compiled tf.function (faster than `model.predict`)."""

    name = "keras"

    def __init__(self, extractor: keras.Model):
        self.feature_size = int(extractor.output.shape[-1])
        self._call = tf.function(lambda x: extractor(x, training=False), jit_compile=False,
                                 reduce_retracing=True)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._call(tf.constant(batch)).numpy()


def make_engine(name: str, extractor: keras.Model, model_params: dict,
                probe_images: np.ndarray | None = None):
    """`auto` prefers LiteRT on a CPU-only machine and Keras when a GPU is present.
    `probe_images`: a few real images (uint8 pixels) a LiteRT conversion is checked on."""
    if name == "auto":
        name = "keras" if tf.config.list_physical_devices("GPU") else "litert"
    if name == "litert":
        from retrain.litert import LiteRTEngine, litert_available

        if litert_available():
            return LiteRTEngine(extractor, model_params, probe_images=probe_images)
        print("extract: ai-edge-litert is not installed here; using the keras engine",
              file=sys.stderr)
    return KerasEngine(extractor)


@dataclass
class ExtractionStats:
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def extract_to_file(engine, paths: Sequence[str | Path], size: int, batch_size: int,
                    dest: str | Path, desc: str = "extract") -> ExtractionStats:
    """Write features of `paths`, in order, to the .npy file `dest` (atomically).

    Batches stream from the decoder threads into a memory-mapped output file, so memory
    stays bounded whatever the number of images.
    """
    start = time.perf_counter()
    with atomic_path(dest) as tmp:
        out = None
        row = 0
        batches = iter_image_batches(paths, size, batch_size)
        for batch in tqdm(batches, total=-(-len(paths) // batch_size), desc=desc, unit="batch",
                          disable=None):
            features = engine(batch)
            if out is None:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                                shape=(len(paths), features.shape[-1]))
            out[row : row + len(features)] = features
            row += len(features)
        if out is None:  # an empty split still gets a valid (0, features) file
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                            shape=(0, engine.feature_size))
        out.flush()
        del out
    return ExtractionStats(len(paths), time.perf_counter() - start)


def build_extractor(model_params: dict, seed: int = 0) -> tuple[keras.Model, keras.Model]:
    base = build_base(model_params, seed)
    return base, pooled_model(base)
