"""Stage `render`: confusion matrix, CAM overlays, feature channels, curves, sample grids."""

import retrain.interrupts  # noqa: F401, E402  # isort: skip  (first: Ctrl-C exits 130)
import argparse
from pathlib import Path

import numpy as np

from retrain.atomic import atomic_path
from retrain.errors import DataError, exits_cleanly
from retrain.figures import (
    confusion_matrix_figure,
    read_curves,
    read_predictions,
    round_robin_by_class,
    seeded_choice,
)
from retrain.manifests import read_classes, read_split
from retrain.params import load_params
from retrain.raw import ensure_raw
from retrain.uncertainty import metric_interval

SAMPLE_IMAGES = 20
PREDICTION_IMAGES = 16


def predicted_confidence(predictions) -> np.ndarray:
    """Each row's probability of its predicted class (NaN where the table has none)."""
    return np.array([row.get(f"prob_{row['predicted']}", np.nan)
                     for row in predictions.to_dict("records")], dtype=float)


def accuracy_interval(actual, predicted, classes) -> list[float] | None:
    """The same 95% bootstrap interval evaluate.json holds, from the predictions table."""
    index = {name: i for i, name in enumerate(classes)}
    return metric_interval("test_accuracy", [index[a] for a in actual],
                           [index[p] for p in predicted])


def load_images(raw: str, paths, size: int) -> np.ndarray:
    from retrain.images import load_image

    if len(paths) == 0:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack([load_image(Path(raw) / p, size) for p in paths])


@exits_cleanly
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw", required=True)
    parser.add_argument("--layout", help="data/layout.json: what --raw must hold, checked "
                        "and restored from the archive if missing (retrain.raw)")
    parser.add_argument("--manifests", required=True)
    parser.add_argument("--model", required=True, help="fine-tuned model (.keras)")
    parser.add_argument("--predictions", required=True, help="evaluate's predictions.csv")
    parser.add_argument("--curves", required=True, nargs="+",
                        help="dvclive folders, in training order (head, then fine-tuning)")
    parser.add_argument("--out", required=True, help="folder of PNGs to write")
    args = parser.parse_args()
    params = load_params()
    ensure_raw(args.raw, args.layout, "render")
    render, size, seed = params["render"], params["model"]["image_size"], params["seed"]
    classes = read_classes(args.manifests)
    train = read_split(args.manifests, "train")
    predictions = read_predictions(args.predictions, classes)
    if predictions.empty:
        raise DataError(f"{args.predictions}: no test predictions to show")
    curves = [(Path(folder).name, read_curves(folder)) for folder in args.curves]
    if not Path(args.model).is_file():
        raise DataError(f"{args.model}: model not found (run the finetune stage first)")

    import keras

    import retrain.base  # noqa: F401  registers the Preprocess layer for loading
    from retrain.cam import cam_for_images, feature_map_model
    from retrain.figures import (
        cam_figure,
        feature_channels_figure,
        learning_curves_figure,
        predictions_figure,
        samples_figure,
    )

    model = keras.models.load_model(args.model)
    if tuple(model.input_shape[1:3]) != (size, size):
        raise DataError(f"{args.model} takes {model.input_shape[1]} px images but "
                        f"model.image_size is {size}: re-run the pipeline")
    actual, predicted = predictions["actual"].to_numpy(), predictions["predicted"].to_numpy()
    confidence = predicted_confidence(predictions)

    with atomic_path(args.out, directory=True) as out:
        confusion_matrix_figure(actual, predicted, classes, out / "confusion_matrix.png",
                                clip=render["confusion_clip"],
                                title="Confusion matrix, fine-tuned model, test split",
                                accuracy_interval=accuracy_interval(actual, predicted, classes))
        learning_curves_figure(curves, out / "learning_curves.png")

        chosen = round_robin_by_class(train["label_index"], SAMPLE_IMAGES, seed)
        samples_figure(load_images(args.raw, train["path"].to_numpy()[chosen], size),
                       train["label"].to_numpy()[chosen], out / "samples.png",
                       columns=min(len(classes), 5) if len(classes) >= 3 else 4)

        chosen = seeded_choice(np.arange(len(predictions)), PREDICTION_IMAGES, seed)
        predictions_figure(load_images(args.raw, predictions["path"].to_numpy()[chosen], size),
                           actual[chosen], predicted[chosen], out / "predictions.png",
                           confidence=confidence[chosen])

        method = render["cam_method"]
        label = "Grad-CAM" if method == "gradcam" else "CAM"
        first_image = None
        for name, rows, empty in (
            ("correct", np.flatnonzero(actual == predicted),
             "No correctly classified test images"),
            ("misclassified", np.flatnonzero(actual != predicted),
             f"No misclassified test images: all {len(predictions)} are right"),
        ):
            chosen = seeded_choice(rows, render["cam_samples"], seed)
            images = load_images(args.raw, predictions["path"].to_numpy()[chosen], size)
            result = cam_for_images(model, images, method)
            cam_figure(images, result.heatmaps, actual[chosen],
                       np.asarray(classes)[result.classes], result.confidence,
                       out / f"cam_{name}.png", method=method, empty_message=empty,
                       title=f"{label} of the predicted class, {name} test images")
            if first_image is None and len(images):
                first_image = (images[0], predictions["path"].iloc[chosen[0]])

        image, path = first_image
        feature_map, _ = feature_map_model(model)(image[None].astype("float32"), training=False)
        feature_channels_figure(image, keras.ops.convert_to_numpy(feature_map)[0],
                                out / "feature_channels.png",
                                title=f"Backbone output channels for {Path(path).name}: the 12 "
                                      f"of {feature_map.shape[-1]} that vary most across it")
    print(f"render: 7 figures in {args.out}")


if __name__ == "__main__":
    main()
