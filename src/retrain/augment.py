"""Training-time augmentation, drawn per image and epoch, or from a bounded set of views.

What image `i` looks like in epoch `e` (flipped or not, its brightness shift and contrast
factor) and where it falls in that epoch's order depend only on `(seed, e, i)`, never on
which batch it lands in or on which engine computes the network. The order may follow a
seed of its own (`order_seed`): fine-tuning replicates see the same views, each in its own
order (`retrain.finetune`). So the two fine-tuning
paths (`retrain.finetune`) train on the very same views, and a view can be recognised when
it comes back.

The transforms are those of Keras' RandomFlip("horizontal"), RandomBrightness and
RandomContrast on [0, 255] pixels, in that order, each clipped to [0, 255].

With `views: V` (> 0) each image has V views, drawn once: epoch `e` shows view `e mod V` of
every image (in an order still drawn per epoch). A view that comes back passes the frozen
part of a fine-tuned model once, not once per epoch (`retrain.finetune`); V = 0 draws new
views every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Independent streams per quantity, so a draw for image i does not depend on the set size.
_ORDER, _FLIP, _BRIGHTNESS, _CONTRAST = range(4)


@dataclass(frozen=True)
class Augmentation:
    flip: bool = False
    brightness: float = 0.0  # max shift, as a fraction of the pixel range
    contrast: float = 0.0  # max relative change of each channel's deviation from its mean
    views: int = 0  # views per image, drawn once and shown in turn; 0: new ones every epoch

    @classmethod
    def from_params(cls, augment: dict) -> Augmentation:
        return cls(bool(augment["flip"]), float(augment["brightness"]),
                   float(augment["contrast"]), int(augment["views"]))

    @property
    def continuous(self) -> bool:
        """True when views are drawn from continuous ranges (brightness, contrast): a view
        then comes back only as the same draw (`draw`), never by chance."""
        return bool(self.brightness or self.contrast)

    def draw(self, epoch: int) -> int:
        """Which draw of views epoch `epoch` shows."""
        return epoch % self.views if self.views else epoch

    def draws(self, epochs: int) -> int:
        """How many distinct draws `epochs` epochs show."""
        return min(self.views, epochs) if self.views else epochs


@dataclass(frozen=True)
class EpochViews:
    """One epoch's order of the images and what each image's view is."""

    order: np.ndarray  # image indices, in the order the epoch visits them
    flip: np.ndarray  # per image: mirrored left-right
    shift: np.ndarray  # per image: added to every pixel, in [0, 255] units
    factor: np.ndarray  # per image: contrast factor
    draw: int = 0  # which draw of views (`Augmentation.draw`): views recur with it

    def view_keys(self, indices: np.ndarray) -> np.ndarray:
        """An id per view that recurs across epochs (only without continuous draws)."""
        return 2 * indices + self.flip[indices]

    def pixels(self, images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """Float32 views of `images[indices]` (uint8, [0, 255])."""
        raw = np.asarray(images[indices])  # a copy: a memmap is never written
        flip = self.flip[indices]
        raw[flip] = raw[flip, :, ::-1]  # on uint8: a quarter of the bytes
        batch = raw.astype(np.float32)
        shift = self.shift[indices].astype(np.float32)
        if shift.any():
            batch += shift[:, None, None, None]
            np.clip(batch, 0, 255, out=batch)
        factor = self.factor[indices].astype(np.float32)[:, None, None, None]
        if (factor != 1).any():
            # (x - mean) * f + mean, as x * f + mean * (1 - f). The per-channel mean as a
            # product with ones: numpy's strided mean over two axes is ~20x slower.
            pixels = batch.reshape(len(batch), -1, batch.shape[-1])
            ones = np.ones((1, pixels.shape[1]), np.float32)
            mean = (ones @ pixels / pixels.shape[1])[:, :, None, :]
            batch *= factor
            batch += mean * (1 - factor)
            np.clip(batch, 0, 255, out=batch)
        return batch


def epoch_views(seed: int, epoch: int, count: int, augmentation: Augmentation,
                order_seed: int | None = None) -> EpochViews:
    """Epoch `epoch`'s views drawn with `seed`, visited in an order drawn with `order_seed`
    (default: `seed`)."""
    draw = augmentation.draw(epoch)

    def stream(kind: int, stream_seed: int = seed, index: int = draw) -> np.random.Generator:
        return np.random.default_rng([stream_seed, index, kind])

    order = stream(_ORDER, seed if order_seed is None else order_seed, epoch).permutation(count)
    flip = (stream(_FLIP).random(count) < 0.5) if augmentation.flip \
        else np.zeros(count, bool)
    b, c = augmentation.brightness, augmentation.contrast
    shift = stream(_BRIGHTNESS).uniform(-b, b, count) * 255.0 if b else np.zeros(count)
    factor = stream(_CONTRAST).uniform(1 - c, 1 + c, count) if c else np.ones(count)
    return EpochViews(order, flip, shift, factor, draw)
