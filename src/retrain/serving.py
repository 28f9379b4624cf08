"""The TF Serving SavedModel: one signature for pixels, one for encoded image files.

    serving_default, serve   pixels       float32 (N, S, S, 3), raw RGB in [0, 255]
    serve_image_bytes        image_bytes  string (N,): JPEG, PNG, GIF or BMP file bytes

Both return the softmax probabilities (N, classes). A TF Serving REST client sends the
file's bytes base64-encoded (`{"b64": "..."}`), which TF Serving decodes into the string
tensor. The bytes are decoded and resized inside the graph the way `retrain.images.load_image`
does for training: 8-bit RGB (transparent PNG pixels composited onto white), bilinear
resize with antialiasing, rounded to whole pixel values. What cannot match: TensorFlow's
decoders ignore EXIF orientation, so a rotated phone photo reaches the model sideways.
"""

from __future__ import annotations

from pathlib import Path

import keras
import tensorflow as tf

PIXELS_SIGNATURE = "serve"  # also exported as `serving_default`, TF Serving's default
BYTES_SIGNATURE = "serve_image_bytes"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decode_image_bytes(encoded: tf.Tensor, size: int) -> tf.Tensor:
    """One encoded image (a scalar string tensor) -> uint8 (size, size, 3), in the graph."""
    image = tf.cond(
        tf.io.is_jpeg(encoded),
        # ISLOW, libjpeg's default and so Pillow's; TensorFlow's default is the faster IFAST.
        lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.cond(
            tf.equal(tf.strings.substr(encoded, 0, len(PNG_SIGNATURE)), PNG_SIGNATURE),
            lambda: _png_on_white(encoded),
            lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False),
        ),
    )
    image.set_shape((None, None, 3))
    # Pillow's BILINEAR widens its triangle filter when it shrinks an image: antialias=True.
    resized = tf.image.resize(image, (size, size), method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def _png_on_white(encoded: tf.Tensor) -> tf.Tensor:
    """A PNG as 8-bit RGB with any transparency composited onto white, as `load_image` does."""
    rgba = tf.cast(tf.io.decode_png(encoded, channels=4), tf.float32)
    alpha = rgba[..., 3:] / 255.0
    return tf.cast(tf.round(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)), tf.uint8)


def export_serving(model: keras.Model, dest: str | Path) -> None:
    """Write `model` (raw pixels in) as a SavedModel with a pixel and an image-bytes signature."""
    size = int(model.input.shape[1])

    def from_pixels(pixels):
        return model(pixels, training=False)

    def from_image_bytes(image_bytes):
        pixels = tf.map_fn(lambda encoded: decode_image_bytes(encoded, size), image_bytes,
                           fn_output_signature=tf.TensorSpec((size, size, 3), tf.uint8))
        return model(tf.cast(pixels, tf.float32), training=False)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(PIXELS_SIGNATURE, from_pixels, input_signature=[
        tf.TensorSpec((None, size, size, 3), tf.float32, name="pixels")])
    archive.add_endpoint(BYTES_SIGNATURE, from_image_bytes, input_signature=[
        tf.TensorSpec((None,), tf.string, name="image_bytes")])
    archive.write_out(str(dest), verbose=False)
