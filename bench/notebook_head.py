"""The notebook way to train the head: the frozen base inside `model.fit`, on the images.

Every epoch decodes every image and pushes it through the frozen base again (tf.data decode
pipeline, as in the Keras transfer-learning tutorial). Same network, splits, epochs, batch
size, learning rate and dropout as the pipeline's train_head stage, read from a workspace.

With `--finetune`, the tutorial's second part follows: unfreeze the base from
`finetune.from_layer` (BatchNorm stays frozen, `retrain.finetune.unfreeze_from`), recompile
at `head.learning_rate * finetune.lr_factor` and fit `finetune.epochs` more on the same
images (no augmentation: the notebook way does less work than the pipeline's finetune).

    python bench/notebook_head.py --workspace WS [--finetune]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--finetune", action="store_true",
                        help="then unfreeze from finetune.from_layer and fit finetune.epochs")
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
    train, val = dataset("train", True), dataset("val", False)
    history = model.fit(train, validation_data=val, epochs=head["epochs"], verbose=2)
    print(f"notebook head: {head['epochs']} epochs, val_accuracy "
          f"{history.history['val_accuracy'][-1]:.4f}, "
          f"{time.perf_counter() - start:.1f} s including imports")
    if args.finetune:
        fine_tune(model, base, train, val, params)
        print(f"notebook head + finetune: {time.perf_counter() - start:.1f} s including imports")


def fine_tune(model, base, train, val, params: dict) -> None:
    import keras

    from retrain.finetune import unfreeze_from

    recipe = params["finetune"]
    unfreeze_from(base, recipe["from_layer"], recipe["train_batchnorm"])
    model.compile(optimizer=keras.optimizers.Adam(params["head"]["learning_rate"]
                                                  * recipe["lr_factor"]),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(train, validation_data=val, epochs=recipe["epochs"], verbose=2)
    print(f"notebook finetune: {recipe['epochs']} epochs from layer {recipe['from_layer']}, "
          f"{len(model.trainable_weights)} trainable tensors, val_accuracy "
          f"{history.history['val_accuracy'][-1]:.4f}")


if __name__ == "__main__":
    main()
