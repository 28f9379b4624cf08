"""Synthetic class-folder datasets: procedurally drawn JPEGs a CPU model learns in seconds.

Each class is a (shape, colour) pair drawn at a random place and size over a noisy
background, so classes are separable even by features of a randomly initialised network.
The tarball uses the official flower layout (one top folder with class folders and a
LICENSE.txt) and is byte-identical for the same arguments.

    python -m retrain synth out.tgz --classes 5 --per-class 40 --size 96 --seed 0
"""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from retrain.atomic import atomic_path

SHAPES = ("disc", "square", "triangle", "cross", "ring", "bars")
COLOURS = (
    (220, 40, 40), (40, 160, 60), (40, 80, 220), (230, 200, 30),
    (160, 60, 200), (30, 190, 200), (240, 130, 20), (120, 120, 120),
)

def class_names(classes: int) -> list[str]:
    return [f"class_{i:03d}" for i in range(classes)]

def draw_image(class_index: int, size: int, rng: np.random.Generator) -> Image.Image:
    shape = SHAPES[class_index % len(SHAPES)]
    colour = COLOURS[(class_index // len(SHAPES) + class_index) % len(COLOURS)]
    noise = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    img = Image.fromarray(noise + np.uint8(90))
    draw = ImageDraw.Draw(img)
    radius = rng.uniform(0.2, 0.35) * size
    cx, cy = rng.uniform(radius, size - radius, size=2)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    jitter = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in colour)
    if shape == "disc":
        draw.ellipse(box, fill=jitter)
    elif shape == "square":
        draw.rectangle(box, fill=jitter)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)],
                     fill=jitter)
    elif shape == "cross":
        width = radius / 3
        draw.rectangle((cx - width, cy - radius, cx + width, cy + radius), fill=jitter)
        draw.rectangle((cx - radius, cy - width, cx + radius, cy + width), fill=jitter)
    elif shape == "ring":
        draw.ellipse(box, outline=jitter, width=max(2, int(radius / 3)))
    else:
        for offset in np.linspace(-radius, radius, 4):
            draw.rectangle((cx + offset - radius / 8, cy - radius, cx + offset + radius / 8,
                            cy + radius), fill=jitter)
    return img

def jpeg_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()

def _add_file(tar: tarfile.TarFile, name: str, data: bytes, is_dir: bool = False) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 0  # fixed metadata keeps the tarball byte-identical across runs
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if is_dir:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
    else:
        info.mode = 0o644
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

def write_dataset(
    dest: str | Path,
    classes: int = 5,
    per_class: int | list[int] = 40,
    size: int = 96,
    seed: int = 0,
    top_folder: str | None = "synthetic_photos",
) -> Path:
    """Write a gzipped tarball of class folders to `dest` and return its path."""
    counts = per_class if isinstance(per_class, list) else [per_class] * classes
    if len(counts) != classes:
        raise ValueError("per_class must give one count per class")
    prefix = f"{top_folder}/" if top_folder else ""
    rng = np.random.default_rng(seed)
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        # mtime=0 in the gzip header too, for byte-identical output.

        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w") as tar:
            if top_folder:
                _add_file(tar, top_folder, b"", is_dir=True)
                _add_file(tar, prefix + "LICENSE.txt", b"Generated images, public domain.\n")
            for index, (name, count) in enumerate(zip(class_names(classes), counts)):
                _add_file(tar, prefix + name, b"", is_dir=True)
                for i in range(count):
                    data = jpeg_bytes(draw_image(index, size, rng))
                    _add_file(tar, f"{prefix}{name}/{name}_{i:04d}.jpg", data)
    return dest
