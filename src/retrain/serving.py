"""The TF Serving SavedModel: one signature for pixels, one for encoded image files.

    serving_default, serve   pixels       float32 (N, S, S, 3), raw RGB in [0, 255]
    serve_image_bytes        image_bytes  string (N,): JPEG, PNG, GIF, BMP or WebP file bytes

Both return the softmax probabilities (N, classes). A TF Serving REST client sends the
file's bytes base64-encoded (`{"b64": "..."}`), which TF Serving decodes into the string
tensor. The bytes are decoded and resized inside the graph to the pixels
`retrain.images.load_image` gives in training: 8-bit RGB (a JPEG turned upright by its EXIF
orientation, 16-bit PNG channels by their high byte, every kind of transparency composited
onto white, a BMP's palette applied), bilinear resize with antialiasing, rounded to whole
pixel values. What does not match: the EXIF orientation of a PNG or WebP file is ignored;
1- and 4-bit BMPs and animated WebP files are refused (TensorFlow does not decode them).
"""

from __future__ import annotations

from pathlib import Path

import keras
import tensorflow as tf

PIXELS_SIGNATURE = "serve"  # also exported as `serving_default`, TF Serving's default
BYTES_SIGNATURE = "serve_image_bytes"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WHITE = b"\xff\xff\xff"
EXIF_SEARCHED_BYTES = 256 * 1024


def decode_image_bytes(encoded: tf.Tensor, size: int) -> tf.Tensor:
    """One encoded image (a scalar string tensor) -> uint8 (size, size, 3), in the graph."""
    image = decode_rgb(encoded)
    # Pillow's BILINEAR widens its triangle filter when it shrinks an image: antialias=True.
    resized = tf.image.resize(image, (size, size), method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
    """An encoded image as uint8 (height, width, 3): the pixels `read_rgb` gives, in the graph.

    Transparency is composited onto white here as in the loader: a model trained on images
    shown on white (as a viewer shows them) must see the same background when served;
    black, where TensorFlow puts a transparent GIF pixel, is not what anyone sees.
    """
    def starts_with(prefix: bytes, at: int = 0):
        return tf.equal(tf.strings.substr(encoded, at, len(prefix)), prefix)

    image = tf.case([
        # ISLOW, libjpeg's default and so Pillow's; TensorFlow's default is the faster IFAST.
        (tf.io.is_jpeg(encoded), lambda: _upright(
            tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
            _jpeg_orientation(encoded))),
        (starts_with(PNG_SIGNATURE), lambda: _png_rgb(encoded)),
        (starts_with(b"GIF8"), lambda: _gif_first_frame(encoded)),
        (starts_with(b"BM"), lambda: _bmp_rgb(encoded)),
        (starts_with(b"RIFF") & starts_with(b"WEBP", 8), lambda: _webp_rgb(encoded)),
    ], default=lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))
    image.set_shape((None, None, 3))
    return image


def _on_white(image: tf.Tensor) -> tf.Tensor:
    """RGBA as 8-bit RGB composited onto white, with `Image.alpha_composite`'s rounding."""
    rgba = tf.cast(image, tf.float32)
    alpha = rgba[..., 3:] / 255.0
    return tf.cast(tf.round(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)), tf.uint8)


class _Bytes:
    """Reads a file's header fields in the graph; 0 past the end of the file (or of its
    first `prefix` bytes, all that is read when the fields sit at the start)."""

    def __init__(self, encoded: tf.Tensor, prefix: int | None = None):
        if prefix is not None:
            encoded = tf.strings.substr(encoded, 0, prefix)
        self.encoded = encoded
        self.values = tf.io.decode_raw(encoded, tf.uint8)
        self.length = tf.size(self.values, out_type=tf.int64)

    def __call__(self, at) -> tf.Tensor:
        at = tf.cast(at, tf.int64)
        inside = tf.gather(self.values, tf.clip_by_value(at, 0, self.length - 1))
        return tf.where(at < self.length, tf.cast(inside, tf.int64), tf.constant(0, tf.int64))

    def little_endian(self, at, width: int) -> tf.Tensor:
        return sum(self(at + i) * 256 ** i for i in range(width))

    def big_endian(self, at, width: int) -> tf.Tensor:
        return sum(self(at + i) * 256 ** (width - 1 - i) for i in range(width))

    def text(self, at, width: int) -> tf.Tensor:
        at = tf.minimum(tf.cast(at, tf.int64), self.length)
        return tf.strings.substr(self.encoded, at, tf.constant(width, tf.int64))


def _replace(encoded: tf.Tensor, at: tf.Tensor, new: bytes) -> tf.Tensor:
    """`encoded` with the bytes at `at` overwritten by `new` (same length)."""
    at = tf.cast(at, tf.int64)
    start, to_the_end = tf.constant(0, tf.int64), tf.constant(-1, tf.int64)
    return tf.strings.join([tf.strings.substr(encoded, start, at), new,
                            tf.strings.substr(encoded, at + len(new), to_the_end)])


def _jpeg_orientation(encoded: tf.Tensor) -> tf.Tensor:
    """The EXIF orientation (1 to 8; 1 when there is none) of a JPEG, read in the graph.

    The marker segments before the scan are walked to the first APP1 holding "Exif"; its
    TIFF header says the byte order, and the first IFD's entries are searched for tag 0x0112.
    Only the first 256 KiB are read: the Exif segment (64 KiB at most) follows the start of
    the file, at most behind a JFIF segment or another application's.
    """
    data = _Bytes(encoded, prefix=EXIF_SEARCHED_BYTES)

    def is_exif(at):
        return (data(at + 1) == 0xE1) & tf.equal(data.text(at + 4, 6), b"Exif\x00\x00")

    def before_exif(at):  # a segment: 0xFF, its marker, its length (2 bytes, big-endian)
        return (at + 4 <= data.length) & (data(at) == 0xFF) & (data(at + 1) != 0xDA) & \
            tf.logical_not(is_exif(at))

    start_of_segments = tf.constant(2, tf.int64)
    segment = tf.while_loop(before_exif, lambda at: [at + 2 + data.big_endian(at + 2, 2)],
                            [start_of_segments])[0]
    no_orientation = tf.constant(0, tf.int64)
    orientation = tf.cond(is_exif(segment), lambda: _tiff_orientation(data, segment + 10),
                          lambda: no_orientation)
    return tf.where((orientation >= 1) & (orientation <= 8), orientation, 1)


def _tiff_orientation(data: _Bytes, tiff) -> tf.Tensor:
    """Tag 0x0112 of the first IFD of the TIFF structure at `tiff` (EXIF's), or 0."""
    big_endian = tf.equal(data.text(tiff, 2), b"MM")

    def number(at, width):
        return tf.where(big_endian, data.big_endian(at, width), data.little_endian(at, width))

    directory = tiff + number(tiff + 4, 4)
    entries = number(directory, 2)

    def next_entry(index, orientation):  # entries: tag, type, count, value; 12 bytes each
        entry = directory + 2 + 12 * index
        return index + 1, tf.where(number(entry, 2) == 0x0112, number(entry + 8, 2), orientation)

    return tf.while_loop(
        lambda index, orientation: (index < entries) & (orientation == 0) &
        (directory + 2 + 12 * index < data.length),
        next_entry, [tf.constant(0, tf.int64), tf.constant(0, tf.int64)])[1]


def _upright(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """`image` turned as its EXIF orientation says, as `ImageOps.exif_transpose` does."""
    def transposed():
        return tf.transpose(image, (1, 0, 2))

    return tf.switch_case(tf.cast(orientation - 1, tf.int32), [
        lambda: image,
        lambda: tf.reverse(image, [1]),  # 2: mirrored
        lambda: tf.reverse(image, [0, 1]),  # 3: upside down
        lambda: tf.reverse(image, [0]),  # 4: mirrored upside down
        transposed,  # 5
        lambda: tf.image.rot90(image, 3),  # 6: stored turned a quarter anticlockwise
        lambda: tf.reverse(transposed(), [0, 1]),  # 7
        lambda: tf.image.rot90(image, 1),  # 8: stored turned a quarter clockwise
    ])


def _png_rgb(encoded: tf.Tensor) -> tf.Tensor:
    """A PNG as 8-bit RGB, any transparency (alpha, or a tRNS colour or palette entry)
    composited onto white. libpng keeps a 16-bit channel's high byte, as Pillow does for RGB
    and `read_rgb` for grey. Only a PNG with transparency is decoded with 4 channels: for 1-,
    2- and 4-bit images without it TensorFlow fills alpha with the bit depth's maximum (1,
    3 or 15), not 255."""
    data = _Bytes(encoded)

    def before_pixels(at):  # chunks: length (4 bytes), type (4), data, CRC (4)
        kind = data.text(at + 4, 4)
        return (at + 8 <= data.length) & tf.not_equal(kind, b"IDAT") & \
            tf.not_equal(kind, b"tRNS")

    first_chunk = tf.constant(len(PNG_SIGNATURE), tf.int64)
    at = tf.while_loop(before_pixels, lambda at: [at + 12 + data.big_endian(at, 4)],
                       [first_chunk])[0]
    colour_type = data(25)  # in IHDR; 4 and 6 carry alpha
    transparent = (colour_type >= 4) | tf.equal(data.text(at + 4, 4), b"tRNS")
    return tf.cond(transparent, lambda: _on_white(tf.io.decode_png(encoded, channels=4)),
                   lambda: tf.io.decode_png(encoded, channels=3))


def _gif_first_frame(encoded: tf.Tensor) -> tf.Tensor:
    """The first frame, its transparent colour (if any) white, as Pillow shows it on white.

    TensorFlow's GIF decoder paints transparent pixels black and returns no alpha, so the
    file is edited instead: the first frame's transparent palette entry becomes white and
    its Graphic Control Extension a comment block of the same length, which leaves the
    pixels of that entry opaque, hence white.
    """
    data = _Bytes(encoded)
    # Header (6 bytes), logical screen descriptor (7), then the optional global colour table.
    global_table = tf.constant(13, tf.int64)
    table_size = 3 * tf.bitwise.left_shift(tf.constant(2, tf.int64), data(10) % 8)
    after_table = global_table + tf.where(data(10) >= 128, table_size, 0)

    def skip_sub_blocks(at):  # data sub-blocks: a size byte, that many bytes; 0 ends them
        return tf.while_loop(lambda p: (p < data.length) & (data(p) != 0),
                             lambda p: [p + data(p) + 1], [at])[0] + 1

    def next_block(at, control):
        first_control = (data(at + 1) == 0xF9) & (control < 0)
        return skip_sub_blocks(at + 2), tf.where(first_control, at, control)

    # Extension blocks (0x21) up to the first image descriptor (0x2C); the first Graphic
    # Control Extension among them is the one giflib (and so TensorFlow) applies.
    image, control = tf.while_loop(lambda at, _: (at < data.length) & (data(at) == 0x21),
                                   next_block, [after_table, tf.constant(-1, tf.int64)])
    table = tf.where(data(image + 9) >= 128, image + 10, global_table)  # local, or global
    entry = table + 3 * data(control + 6)
    transparent = (control >= 0) & (data(image) == 0x2C) & (data(control + 3) % 2 == 1) & \
        (entry + 3 <= data.length)
    edited = tf.cond(transparent,
                     lambda: _replace(_replace(encoded, entry, WHITE), control + 1, b"\xfe"),
                     lambda: encoded)
    return tf.io.decode_gif(edited)[0]


def _bmp_rgb(encoded: tf.Tensor) -> tf.Tensor:
    """A BMP as RGB. TensorFlow returns an 8-bit BMP's palette indices as grey levels; Pillow
    looks them up in the palette (BGRx entries after the header), so the graph does too."""
    data = _Bytes(encoded)

    def palette_colours():
        indices = tf.cast(tf.io.decode_bmp(encoded, channels=0)[..., 0], tf.int64)
        start = 14 + data.little_endian(14, 4)
        used = data.little_endian(46, 4)
        count = tf.where(used > 0, tf.minimum(used, 256), 256)
        palette = tf.reshape(data.values[start:start + 4 * count], (-1, 4))[:, 2::-1]
        return tf.gather(palette, tf.minimum(indices, count - 1))

    return tf.cond(data.little_endian(28, 2) == 8, palette_colours,  # bits per pixel
                   lambda: tf.io.decode_bmp(encoded, channels=3))


def _webp_rgb(encoded: tf.Tensor) -> tf.Tensor:
    """A still WebP as RGB, alpha composited onto white. TensorFlow wants the file's own
    channel count (3 or 4), and without one it crashes the process on an animated file, so
    the count is read from the header: VP8L keeps its alpha bit in byte 24, VP8X in its
    flags (byte 20, which also flags an animation: refused)."""
    data = _Bytes(encoded)
    chunk = data.text(12, 4)
    flags = tf.where(tf.equal(chunk, b"VP8X"), data(20), 0)
    has_alpha = (tf.equal(chunk, b"VP8L") & (tf.bitwise.bitwise_and(data(24), 0x10) > 0)) | \
        (tf.bitwise.bitwise_and(flags, 0x10) > 0)
    animated = tf.bitwise.bitwise_and(flags, 0x02) > 0
    checked = tf.debugging.Assert(tf.logical_not(animated),
                                  ["an animated WebP file is not decoded in the graph"])

    # DecodeImage rather than DecodeWebP (TensorFlow 2.18+): a SavedModel that holds an op
    # the server lacks does not load at all, even for JPEG requests.
    def decode(channels: int) -> tf.Tensor:
        return tf.io.decode_image(encoded, channels=channels, expand_animations=False)

    with tf.control_dependencies([checked]):
        return tf.cond(has_alpha, lambda: _on_white(decode(4)), lambda: decode(3))


def export_serving(model: keras.Model, dest: str | Path) -> None:
    """Write `model` (raw pixels in) as a SavedModel with a pixel and an image-bytes signature.

    The model is traced once: the bytes signature calls the pixel one. And the archive does
    not `track` the model: tracked, each weight is written twice (once per Keras variable,
    once per tf.Variable the traced functions capture; keras-team/keras#23553), doubling
    the folder and its load time. The functions' captured variables are all it needs."""
    size = int(model.input.shape[1])
    from_pixels = tf.function(lambda pixels: model(pixels, training=False), input_signature=[
        tf.TensorSpec((None, size, size, 3), tf.float32, name="pixels")])

    def from_image_bytes(image_bytes):
        pixels = tf.map_fn(lambda encoded: decode_image_bytes(encoded, size), image_bytes,
                           fn_output_signature=tf.TensorSpec((size, size, 3), tf.uint8))
        return from_pixels(tf.cast(pixels, tf.float32))

    archive = keras.export.ExportArchive()
    archive.add_endpoint(PIXELS_SIGNATURE, from_pixels)
    archive.add_endpoint(BYTES_SIGNATURE, from_image_bytes, input_signature=[
        tf.TensorSpec((None,), tf.string, name="image_bytes")])
    archive.write_out(str(dest), verbose=False)
