"""One decoder: the serving graph turns an image file into the pixels the training loader gives.

Every kind of file the loader accepts is written with Pillow, then decoded by the loader
(`read_rgb`, `load_image`) and in the graph (`decode_rgb`, the SavedModel's image-bytes
signature). At the file's own size the pixels are equal: both sides run the same libraries'
arithmetic (libjpeg's accurate integer DCT, libpng, giflib, libwebp) and the same rules
(16-bit channels keep their high byte, transparency goes onto white). JPEG is allowed one
level: TensorFlow and Pillow each bundle their own libjpeg-turbo, whose colour conversion
and chroma upsampling may round differently between versions. Resized, one level too:
Pillow resamples with fixed-point integer weights, TensorFlow in float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from retrain.images import load_image, read_rgb
from retrain.serving import decode_image_bytes, decode_rgb

SIDE = 24
RNG = np.random.default_rng(0)
# 4x4 blocks of random colours: sharp edges for the resize, flat areas JPEG keeps.
RGB = np.kron(RNG.integers(0, 256, (6, 6, 3)), np.ones((4, 4, 1))).astype(np.uint8)
ALPHA = np.kron(RNG.integers(0, 256, (6, 6)), np.ones((4, 4))).astype(np.uint8)
GREY = RGB[..., 0]


def palette_image(colours: int = 16, transparent_index: int | None = None) -> Image.Image:
    """A palette image; the top-left block uses `transparent_index` (to be made transparent)."""
    image = Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE, colors=colours)
    if transparent_index is None:
        return image
    indices = np.asarray(image).copy()
    indices[:8, :8] = transparent_index
    edited = Image.fromarray(indices, "P")
    edited.putpalette(image.getpalette())
    return edited


def animated_gif(path: Path) -> None:
    first = palette_image(8, transparent_index=2)
    second = Image.fromarray(255 - RGB).convert("P")
    first.save(path, save_all=True, append_images=[second], transparency=2, duration=100)


def sixteen_bit(values: np.ndarray) -> Image.Image:
    return Image.fromarray(values.astype(np.uint16))


DARK_16 = GREY.astype(np.uint16)  # every value below 256: a dark 16-bit frame
BRIGHT_16 = GREY.astype(np.uint16) * 257 + RGB[..., 1]  # low bytes that are not the high

# Each row: file name, how Pillow writes it. Every format the loader accepts, every mode.
FILES = {
    "rgb.jpg": lambda p: Image.fromarray(RGB).save(p, quality=90),
    "progressive.jpg": lambda p: Image.fromarray(RGB).save(p, quality=90, progressive=True),
    "grey.jpg": lambda p: Image.fromarray(GREY).save(p, quality=90),
    "cmyk.jpg": lambda p: Image.fromarray(RGB).convert("CMYK").save(p, quality=90),
    "multi_picture.jpg": lambda p: Image.fromarray(RGB).save(  # MPO: a depth map attached
        p, format="MPO", save_all=True, append_images=[Image.fromarray(GREY)], quality=90),
    "rgb.png": lambda p: Image.fromarray(RGB).save(p),
    "rgba.png": lambda p: Image.fromarray(np.dstack([RGB, ALPHA])).save(p),
    "grey.png": lambda p: Image.fromarray(GREY).save(p),
    "grey_alpha.png": lambda p: Image.fromarray(np.dstack([GREY, ALPHA]), "LA").save(p),
    "one_bit.png": lambda p: Image.fromarray(GREY > 128).save(p),
    "palette.png": lambda p: palette_image().save(p),
    "palette_4_bit.png": lambda p: palette_image().save(p, bits=4),
    "palette_transparent.png": lambda p: palette_image(transparent_index=3).save(
        p, transparency=3),
    "rgb_transparent_colour.png": lambda p: Image.fromarray(RGB).save(
        p, transparency=tuple(int(v) for v in RGB[0, 0])),
    "grey_transparent_level.png": lambda p: Image.fromarray(GREY).save(
        p, transparency=int(GREY[0, 0])),
    "sixteen_bit_dark.png": lambda p: sixteen_bit(DARK_16).save(p),
    "sixteen_bit_bright.png": lambda p: sixteen_bit(BRIGHT_16).save(p),
    "sixteen_bit_transparent.png": lambda p: sixteen_bit(BRIGHT_16).save(
        p, transparency=int(BRIGHT_16[0, 0])),
    "palette.gif": lambda p: palette_image().save(p),
    "transparent.gif": lambda p: palette_image(transparent_index=3).save(p, transparency=3),
    "transparent_local_table.gif": lambda p: palette_image(transparent_index=3).save(
        p, transparency=3, include_color_table=True),
    "grey_transparent.gif": lambda p: Image.fromarray(GREY).save(
        p, transparency=int(GREY[0, 0])),
    "animated_transparent.gif": animated_gif,
    "rgb.bmp": lambda p: Image.fromarray(RGB).save(p),
    "grey.bmp": lambda p: Image.fromarray(GREY).save(p),
    "palette.bmp": lambda p: palette_image().save(p),
    "lossy.webp": lambda p: Image.fromarray(RGB).save(p, quality=90),
    "lossless.webp": lambda p: Image.fromarray(RGB).save(p, lossless=True),
    "alpha.webp": lambda p: Image.fromarray(np.dstack([RGB, ALPHA])).save(p, lossless=True),
}


def tolerance(name: str) -> int:
    return 1 if name.endswith(".jpg") else 0


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("formats")
    for name, write in FILES.items():
        write(folder / name)
    return {name: folder / name for name in FILES}


def level_difference(actual: np.ndarray, expected: np.ndarray) -> int:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype == np.uint8
    return int(np.abs(actual.astype(int) - expected.astype(int)).max())


@pytest.mark.parametrize("name", FILES)
def test_the_graph_decodes_the_loaders_pixels(files, name):
    path = files[name]
    expected = np.asarray(read_rgb(path))
    decoded = decode_rgb(tf.constant(path.read_bytes())).numpy()
    assert level_difference(decoded, expected) <= tolerance(name), name


def test_transparent_and_sixteen_bit_files_are_what_the_comparison_is_about(files):
    """The files above hold what they claim, so a pass means something: transparent pixels
    (white in the loader's pixels), 16-bit values whose low byte is not the high."""
    for name in ("transparent.gif", "transparent_local_table.gif", "animated_transparent.gif",
                 "palette_transparent.png", "grey_transparent.gif"):
        with Image.open(files[name]) as image:
            assert "transparency" in image.info, name
        assert (np.asarray(read_rgb(files[name]))[:4, :4] == 255).all(), name
    with Image.open(files["sixteen_bit_bright.png"]) as image:
        assert image.mode.startswith("I") and np.asarray(image).max() > 255
    assert (np.asarray(read_rgb(files["sixteen_bit_dark.png"])) == 0).all()  # values < 256


def test_resized_pixels_differ_by_at_most_one_level(files):
    """Shrunk from 24 to 16 px: the resampling arithmetic (fixed point against float32)
    may round a pixel the other way, never further."""
    for name, path in files.items():
        expected = load_image(path, 16)
        decoded = decode_image_bytes(tf.constant(path.read_bytes()), 16).numpy()
        assert level_difference(decoded, expected) <= 1, name


def test_the_saved_image_bytes_signature_gives_the_loaders_pixels(files, tmp_path):
    """Through the SavedModel TF Serving loads: a model that returns its input pixels,
    exported by `export_serving`, fed every file in one batch."""
    import keras

    from retrain.serving import BYTES_SIGNATURE, export_serving

    pixels = keras.Input((SIDE, SIDE, 3), name="pixels")
    echo = keras.Model(pixels, keras.layers.Reshape((SIDE * SIDE * 3,))(pixels))
    export_serving(echo, tmp_path / "serving")
    signature = tf.saved_model.load(str(tmp_path / "serving")).signatures[BYTES_SIGNATURE]
    names = list(files)
    served = signature(image_bytes=tf.constant([files[name].read_bytes() for name in names]))
    served = next(iter(served.values())).numpy().reshape(len(names), SIDE, SIDE, 3)
    for name, image in zip(names, served):
        assert np.array_equal(image, np.round(image)), name
        expected = load_image(files[name], SIDE)
        assert level_difference(image.astype(np.uint8), expected) <= tolerance(name), name


def exif_block(orientation: int, byte_order: str) -> bytes:
    """An APP1 Exif block whose first directory holds Make, Model and then Orientation."""
    if byte_order == "II":  # Pillow writes little-endian
        exif = Image.Exif()
        exif[0x010F], exif[0x0110], exif[0x0112] = "Maker", "Model", orientation
        return exif.tobytes()
    import struct

    entry = struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)  # SHORT, left-aligned
    return b"Exif\x00\x00MM\x00\x2a" + struct.pack(">IH", 8, 1) + entry + bytes(4)


@pytest.mark.parametrize("byte_order", ["II", "MM"])
@pytest.mark.parametrize("orientation", range(0, 10))
def test_the_graph_turns_a_jpeg_upright_by_its_exif_orientation(tmp_path, orientation,
                                                                 byte_order):
    """Orientations 1 to 8 in either byte order, as `ImageOps.exif_transpose` turns them;
    0 and 9 are not orientations and leave the image as stored."""
    path = tmp_path / "phone.jpg"
    Image.fromarray(RGB[:16]).save(path, quality=90, exif=exif_block(orientation, byte_order))
    expected = np.asarray(read_rgb(path))
    assert expected.shape == ((24, 16, 3) if orientation in (5, 6, 7, 8) else (16, 24, 3))
    decoded = decode_rgb(tf.constant(path.read_bytes())).numpy()
    assert level_difference(decoded, expected) <= 1


def test_png_exif_orientation_is_the_named_exception(tmp_path):
    """The loader also turns a PNG by its eXIf chunk; the graph does not (rare outside
    JPEG): the card and README say so."""
    from retrain.card import SERVING_DECODING

    path = tmp_path / "turned.png"
    Image.fromarray(RGB[:16]).save(path, exif=exif_block(6, "II"))
    assert read_rgb(path).size == (16, 24)
    assert tuple(decode_rgb(tf.constant(path.read_bytes())).shape) == (16, 24, 3)
    assert "EXIF orientation of PNG and WebP files" in SERVING_DECODING


@pytest.mark.parametrize("name, write", [
    ("one_bit.bmp", lambda p: Image.fromarray(GREY > 128).save(p)),
    ("animated.webp", lambda p: Image.fromarray(RGB).save(
        p, save_all=True, append_images=[Image.fromarray(255 - RGB)], lossless=True)),
])
def test_what_the_graph_cannot_decode_is_refused_not_guessed(tmp_path, name, write):
    """The loader reads these (the first frame of an animation); TensorFlow has no decoder
    for them, so the signature fails with an error (named in the card and README) instead
    of serving other pixels, and an animated WebP does not crash the server."""
    path = tmp_path / name
    write(path)
    assert read_rgb(path).size == (SIDE, SIDE)
    with pytest.raises(tf.errors.InvalidArgumentError):
        decode_rgb(tf.constant(path.read_bytes()))


def test_the_model_card_names_where_the_signature_differs():
    from retrain.card import SERVING_DECODING

    for exception in ("EXIF orientation of PNG and WebP", "1- and 4-bit BMPs", "animated WebP"):
        assert exception in SERVING_DECODING
