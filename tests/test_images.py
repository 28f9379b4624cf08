"""The one image loader against the files people actually have."""

import io

import numpy as np
import pytest
from PIL import Image

from retrain.errors import DataError
from retrain.images import MAX_PIXELS, load_image, read_rgb


def gradient(width=40, height=20) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)
    pixels = np.stack([np.tile(x, (height, 1))] * 3, axis=-1)
    pixels[..., 1] = 100
    return Image.fromarray(pixels)


def save(img: Image.Image, path, **kwargs):
    img.save(path, **kwargs)
    return path


# Each row: file name, how to write it. A new format is one line.
FORMATS = [
    ("photo.jpg", lambda img, p: save(img, p, format="JPEG", quality=95)),
    ("photo.png", lambda img, p: save(img, p, format="PNG")),
    ("photo.gif", lambda img, p: save(img, p, format="GIF")),
    ("photo.bmp", lambda img, p: save(img, p, format="BMP")),
    ("photo.webp", lambda img, p: save(img, p, format="WEBP", lossless=True)),
    ("grey.png", lambda img, p: save(img.convert("L"), p, format="PNG")),
    ("cmyk.jpg", lambda img, p: save(img.convert("CMYK"), p, format="JPEG", quality=95)),
    ("alpha.png", lambda img, p: save(img.convert("RGBA"), p, format="PNG")),
    ("palette.png", lambda img, p: save(img.convert("P"), p, format="PNG")),
    ("naïve name with spaces.jpg", lambda img, p: save(img, p, format="JPEG")),
]


@pytest.mark.parametrize("name, write", FORMATS, ids=[f[0] for f in FORMATS])
def test_formats_decode_to_8_bit_rgb(tmp_path, name, write):
    path = write(gradient(), tmp_path / name)
    pixels = load_image(path, 16)
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
    assert pixels[:, -1].mean() > pixels[:, 0].mean() + 80  # the gradient survived


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    img = np.asarray(read_rgb(path))
    assert img.max() == 255 and img.min() == 0 and len(np.unique(img[..., 0])) > 30


def test_sixteen_bit_grey_keeps_the_high_byte_whatever_else_the_image_holds(tmp_path):
    """The same 16-bit value gives the same pixel in a dark frame and in a bright one: its
    high byte, as libpng, TensorFlow (the serving graph) and Pillow's 16-bit RGB give it."""
    dark = np.array([[200, 1000], [255, 0]], np.uint16)
    bright = np.array([[200, 1000], [255, 65535]], np.uint16)
    pixels = {}
    for name, values in (("dark", dark), ("bright", bright)):
        Image.fromarray(values).save(tmp_path / f"{name}.png")
        pixels[name] = np.asarray(read_rgb(tmp_path / f"{name}.png"))[..., 0]
    np.testing.assert_array_equal(pixels["dark"], dark >> 8)
    np.testing.assert_array_equal(pixels["bright"], bright >> 8)


def test_exif_orientation_is_applied(tmp_path):
    img = gradient(40, 20)  # wide
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes())
    assert read_rgb(path).size == (20, 40)  # shown tall, as a viewer shows it


@pytest.mark.parametrize("name, data, reason", [
    ("empty.jpg", b"", "not an image"),
    ("text.jpg", b"hello, I am text", "not an image"),
])
def test_unreadable_files_name_the_file(tmp_path, name, data, reason):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError, match=f"{name}: {reason}"):
        read_rgb(path)


def test_truncated_jpeg_is_refused(tmp_path):
    buffer = io.BytesIO()
    gradient(200, 200).save(buffer, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[:600])
    with pytest.raises(DataError, match="cut.jpg"):
        read_rgb(path)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    side = int(MAX_PIXELS ** 0.5) + 10
    path = tmp_path / "bomb.png"
    # A huge but trivially compressible image: small file, enormous pixel count.
    Image.new("1", (side, side)).save(path, format="PNG")
    with pytest.raises(DataError, match="exceeds the .*-pixel limit"):
        read_rgb(path)


def test_unsupported_format_is_worded_the_same_by_name_and_by_content(tmp_path):
    """`split` judges a file by its name, `predict` (through load_image) by its content: a TIFF
    gets the same reason from both, from the loader's list of formats."""
    from retrain.images import image_name_problem, unsupported_format

    path = tmp_path / "scan.tiff"
    Image.new("RGB", (8, 8)).save(path, format="TIFF")
    with pytest.raises(DataError) as info:
        load_image(path, 8)
    by_content = str(info.value).split(": ", 1)[1]
    assert image_name_problem(path) == by_content == unsupported_format("TIFF")
    assert "JPEG, PNG, GIF, BMP, WEBP" in by_content
    assert image_name_problem(tmp_path / "notes.txt") == "not an image file name"
