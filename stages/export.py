"""Stage `export`: LiteRT models of the fine-tuned classifier, each measured on the test split."""

import argparse
from pathlib import Path

from retrain.atomic import atomic_path, write_json
from retrain.errors import UserError, exits_cleanly
from retrain.manifests import read_classes, read_split
from retrain.params import load_params


@exits_cleanly
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw", required=True)
    parser.add_argument("--manifests", required=True)
    parser.add_argument("--model", required=True, help="fine-tuned model (.keras)")
    parser.add_argument("--out", required=True, help="folder for the .tflite files")
    parser.add_argument("--metrics", required=True)
    args = parser.parse_args()
    params = load_params()
    export, size, seed = params["export"], params["model"]["image_size"], params["seed"]
    classes = read_classes(args.manifests)
    train, test = read_split(args.manifests, "train"), read_split(args.manifests, "test")

    import keras
    import numpy as np

    import retrain.base  # noqa: F401  registers the Preprocess layer for loading
    from retrain.cache import user_cache_dir
    from retrain.evaluate import predict_images
    from retrain.export import export_formats, measure, representative_rows
    from retrain.images import cached_image_array, load_image
    from retrain.litert import litert_available

    if not litert_available():
        raise UserError("export needs the LiteRT interpreter: pip install ai-edge-litert")
    raw = Path(args.raw)
    model = keras.models.load_model(args.model)
    calibration = representative_rows(train, export["representative_images"], seed)
    representative = np.stack([load_image(raw / p, size) for p in calibration["path"]])
    images = cached_image_array([raw / p for p in test["path"]], test["sha256"], size,
                                user_cache_dir("images"))
    labels = test["label_index"].to_numpy()
    keras_probabilities = predict_images(model, images)

    results = {}
    with atomic_path(args.out, directory=True) as out_dir:
        for name, path in export_formats(model, export["formats"], representative,
                                         out_dir).items():
            results[name] = measure(path, images, labels, classes, keras_probabilities)
            print(f"export: {name} {path.name}: agreement {results[name]['agreement']:.4f}, "
                  f"accuracy {results[name]['accuracy']:.4f}, "
                  f"{results[name]['size_bytes'] / 1e6:.1f} MB, "
                  f"{results[name]['latency_ms']:.2f} ms per image")
    write_json(args.metrics, results)


if __name__ == "__main__":
    main()
