"""The one image loader. Every stage that reads pixels (split, extract, finetune, evaluate,
render, predict) goes through `load_image`, so a model always sees the same pixels for the
same file.

Pillow decodes JPEG, PNG, GIF (first frame), BMP and WebP: the formats TensorFlow's own
decoders read. EXIF orientation is applied, grayscale/CMYK/16-bit/alpha become 8-bit RGB,
by the same rules as the serving graph's decoder (`retrain.serving.decode_rgb`): 16-bit
channels keep their high byte, transparency is composited onto white.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageOps, UnidentifiedImageError

from retrain.atomic import atomic_path
from retrain.cache import image_cache_budget_bytes, make_room, mark_used
from retrain.errors import DataError, stop_if_interrupted

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")
# Pillow names a JPEG that carries further images (a camera's depth map or stereo pair, in
# an MPF segment) MPO; its first image is an ordinary JPEG, the one every viewer shows.
FORMAT_ALIASES = {"MPO": "JPEG"}
# Bump on any change here that alters decoded pixels (orientation, colour conversion,
# resizing): decoded-image caches are keyed on it, with Pillow's version and the filter.
LOADER_VERSION = 2
# Pillow's modes for a 16-bit grey PNG ("I" in Pillow versions before 10.1).
SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I")
RESAMPLING = Image.Resampling.BILINEAR
# Decompression-bomb guard: larger images are refused before their pixels are decoded.
MAX_PIXELS = 80_000_000


def is_image_name(path: str | Path) -> bool:
    name = Path(path).name
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def unsupported_format(format_name: str) -> str:
    """The one wording for an image format the loader does not read, by name or by content."""
    return f"unsupported image format {format_name} (supported: {', '.join(SUPPORTED_FORMATS)})"


def image_name_problem(path: str | Path) -> str | None:
    """Why a file is not read as an image, judged by its name alone; None when it is."""
    if is_image_name(path):
        return None
    Image.init()  # registers every plugin's extensions
    format_name = Image.registered_extensions().get(Path(path).suffix.lower())
    if format_name in Image.OPEN:  # an image Pillow could open, but not one we train on
        return unsupported_format(format_name)
    return "not an image file name"


def loader_fingerprint() -> str:
    """What decides `load_image`'s pixels besides the file's bytes and the size."""
    return f"loader {LOADER_VERSION}, Pillow {PIL.__version__}, {RESAMPLING.name}"


def read_rgb(path: str | Path) -> Image.Image:
    """Decode a whole image file as upright 8-bit RGB, or raise DataError saying why not."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if FORMAT_ALIASES.get(img.format, img.format) not in SUPPORTED_FORMATS:
                    raise DataError(f"{path}: {unsupported_format(img.format)}")
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise DataError(
                        f"{path}: {width}x{height} exceeds the {MAX_PIXELS:,}-pixel limit"
                    )
                img.load()
                # In place: without an orientation tag a copy would be made for nothing.
                ImageOps.exif_transpose(img, in_place=True)
                return _to_rgb(img)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image Pillow can identify") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise DataError(f"{path}: cannot decode ({exc})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB by the rules the serving graph (`retrain.serving.decode_rgb`) also follows."""
    if img.mode in SIXTEEN_BIT_GREY:
        img = _grey_high_byte(img)
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        # Composite transparency (alpha, or a transparent colour or palette entry) onto
        # white, as a viewer would show it.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")  # no copy when already RGB


def _grey_high_byte(img: Image.Image) -> Image.Image:
    """16-bit grey as 8-bit: the high byte, whatever the image holds.

    The rule libpng (so TensorFlow's decoders), `tf.image.convert_image_dtype` and Pillow
    itself (for 16-bit RGB) apply; a content-dependent scale would give a dark frame and a
    bright one of the same scene different pixels. A transparent grey level (tRNS) is
    matched at 16 bits, before the low byte is dropped.
    """
    values = np.asarray(img).astype(np.uint32)
    grey = Image.fromarray((values >> 8).astype(np.uint8), "L")
    if "transparency" not in img.info:
        return grey
    opaque = np.where(values == img.info["transparency"], 0, 255).astype(np.uint8)
    return Image.merge("LA", (grey, Image.fromarray(opaque, "L")))


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Pixels of `path` as uint8 (size, size, 3), resized bilinearly with antialiasing."""
    img = read_rgb(path)
    if img.size != (size, size):
        img = img.resize((size, size), RESAMPLING)
    return np.asarray(img, dtype=np.uint8)


def iter_image_batches(
    paths: Sequence[str | Path], size: int, batch_size: int, workers: int | None = None
) -> Iterator[np.ndarray]:
    """Yield uint8 batches in order, decoding ahead on a thread pool.

    Pillow releases the GIL while decoding, so threads overlap decoding with the model's
    compute; at most `2 * workers` batches are in flight, so memory stays bounded.
    """
    workers = workers or min(4, os.cpu_count() or 1)

    def load_batch(start: int) -> np.ndarray:
        return np.stack([load_image(p, size) for p in paths[start : start + batch_size]])

    starts = iter(range(0, len(paths), batch_size))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for start in starts:
            pending.append(pool.submit(load_batch, start))
            if len(pending) >= 2 * workers:
                break
        while pending:
            stop_if_interrupted()
            batch = pending.popleft().result()
            next_start = next(starts, None)
            if next_start is not None:
                pending.append(pool.submit(load_batch, next_start))
            yield batch


def cached_image_array(
    paths: Sequence[str | Path], digests: Iterable[str], size: int, cache_dir: str | Path
) -> np.ndarray:
    """All images decoded once at `size`, as a read-only uint8 memmap (N, size, size, 3).

    The cache file is named after the images' sha256 digests, the size and the loader
    (`loader_fingerprint`), so a change to the data, the size, this module's decoding or
    Pillow makes a new one; an existing file is reused without decoding. The folder's files
    are kept within $RETRAIN_IMAGE_CACHE_GB, the least recently used deleted first
    (`retrain.cache.make_room`).
    """
    salt = f"v2:{loader_fingerprint()}:{size}:"
    key = hashlib.sha256(salt.encode() + ",".join(digests).encode()).hexdigest()[:32]
    cache_dir = Path(cache_dir)
    dest = cache_dir / f"images-{size}px-{key}.npy"
    budget = image_cache_budget_bytes()  # a bad value is refused on every run, cached or not
    if dest.exists():
        mark_used(dest)
        try:
            return np.load(dest, mmap_mode="r")
        except FileNotFoundError:  # deleted by another run's make_room just now: decode again
            pass
    # Room first, then the file, so the folder does not outgrow its budget while it is
    # written (files other processes still hold open free their space when closed).
    make_room(cache_dir, "images-*px-*.npy", len(paths) * size * size * 3, budget)
    with atomic_path(dest) as tmp:
        # The .npy header through open_memmap, the rows by plain writes: rows written
        # through a memory map would stay mapped, growing the process by the whole file.
        header = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3)
        )
        offset = header.offset
        del header
        with open(tmp, "r+b") as out:
            out.seek(offset)
            for batch in iter_image_batches(paths, size, batch_size=64):
                out.write(np.ascontiguousarray(batch, np.uint8).tobytes())
    mark_used(dest)
    return np.load(dest, mmap_mode="r")


class ImageRows:
    """Rows of a decoded-image cache (`cached_image_array`'s .npy) by positioned reads.

    Indexing a memmap maps every page it touches into the process, so an epoch over all
    images grows the resident set by the whole file (1.5 GB for 10,000 images at 224 px).
    `os.pread` copies the rows out of the page cache instead: the same speed, and memory
    the kernel can reclaim stays out of the process. Safe from several threads.
    """

    def __init__(self, array: np.memmap):
        self.shape, self.dtype = array.shape, array.dtype
        self._row_bytes = int(np.prod(array.shape[1:])) * array.dtype.itemsize
        self._offset = array.offset
        self._fd = os.open(array.filename, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, indices) -> np.ndarray:
        indices = np.atleast_1d(np.arange(self.shape[0])[indices])
        out = np.empty((len(indices), *self.shape[1:]), self.dtype)
        for row, index in zip(out, indices):
            data = os.pread(self._fd, self._row_bytes, self._offset + int(index) * self._row_bytes)
            row[...] = np.frombuffer(data, self.dtype).reshape(row.shape)
        return out

    def __del__(self):
        if hasattr(self, "_fd"):
            os.close(self._fd)


def image_rows(array: np.memmap) -> ImageRows | np.memmap:
    """`ImageRows` over a cached image array where the OS has `pread` (not Windows).

    The memmap itself where its file was deleted since it was mapped (another process
    keeping the cache within its budget): the mapping still reads the deleted file, though
    the pages it touches then count in this process's resident memory."""
    if not hasattr(os, "pread"):
        return array
    try:
        return ImageRows(array)
    except FileNotFoundError:
        return array


def is_utf8(name: str) -> bool:
    """Whether a file name can be written as UTF-8 (a manifest cell, a DVC record): bytes
    that are not UTF-8 arrive from the file system and from tarfile as surrogates."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def utf8_shown(name: str) -> str:
    """`name` with bytes that are not UTF-8 shown as U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
