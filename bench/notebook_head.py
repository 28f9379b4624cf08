"""The notebook way to train the head: the frozen base inside `model.fit`, on the images.

Every epoch decodes every image and pushes it through the frozen base again (tf.data decode
pipeline, as in the Keras transfer-learning tutorial). Same network, splits, epochs, batch
size, learning rate and dropout as the pipeline's train_head stage, read from a workspace.

    python bench/notebook_head.py --workspace WS
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, required=True)
    args = parser.parse_args()
    start = time.perf_counter()

    import keras
    import tensorflow as tf

    from retrain.base import build_base
    from retrain.manifests import read_classes, read_split
    from retrain.params import load_params

    ws = args.workspace
    params = load_params(ws / "params.yaml")
    model_params, head = params["model"], params["head"]
    size = model_params["image_size"]
    keras.utils.set_random_seed(params["seed"])

    def dataset(split: str, shuffle: bool) -> tf.data.Dataset:
        frame = read_split(ws / "data" / "manifests", split)
        paths = [str(ws / "data" / "raw" / p) for p in frame["path"]]
        data = tf.data.Dataset.from_tensor_slices((paths, frame["label_index"].to_numpy()))
        if shuffle:
            data = data.shuffle(len(paths), seed=params["seed"])

        def load(path, label):
            image = tf.io.decode_image(tf.io.read_file(path), channels=3,
                                       expand_animations=False)
            return tf.image.resize(image, (size, size)), label

        return (data.map(load, num_parallel_calls=tf.data.AUTOTUNE)
                .batch(head["batch_size"]).prefetch(tf.data.AUTOTUNE))

    classes = read_classes(ws / "data" / "manifests")
    base = build_base(model_params)  # frozen, preprocessing inside, raw pixels in
    pixels = keras.Input((size, size, 3))
    x = base(pixels, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(head["dropout"])(x)
    outputs = keras.layers.Dense(len(classes), activation="softmax")(x)
    model = keras.Model(pixels, outputs)
    model.compile(optimizer=keras.optimizers.Adam(head["learning_rate"]),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(dataset("train", True), validation_data=dataset("val", False),
                        epochs=head["epochs"], verbose=2)
    print(f"notebook head: {head['epochs']} epochs, val_accuracy "
          f"{history.history['val_accuracy'][-1]:.4f}, "
          f"{time.perf_counter() - start:.1f} s including imports")


if __name__ == "__main__":
    main()
