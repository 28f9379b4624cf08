"""Stage `export`: LiteRT models of the fine-tuned classifier, each measured on held-out images
(agreement with Keras on validation + test, accuracy on test; at most
`export.held_out_images` of them)."""

import retrain.interrupts  # noqa: F401, E402  # isort: skip  (first: Ctrl-C exits 130)
import argparse
from pathlib import Path

from retrain.atomic import atomic_path, write_json
from retrain.errors import UserError, exits_cleanly
from retrain.headline import format_rows, write_rows
from retrain.manifests import read_classes, read_split
from retrain.params import load_params
from retrain.raw import ensure_raw


@exits_cleanly
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw", required=True)
    parser.add_argument("--layout", help="data/layout.json: what --raw must hold, checked "
                        "and restored from the archive if missing (retrain.raw)")
    parser.add_argument("--manifests", required=True)
    parser.add_argument("--model", required=True, help="fine-tuned model (.keras)")
    parser.add_argument("--out", required=True, help="folder for the .tflite files")
    parser.add_argument("--metrics", required=True,
                        help="folder for the headline rows: one per format (JSON files; "
                        "what DVC shows, retrain.headline)")
    parser.add_argument("--details", required=True, help="every figure per format (JSON)")
    args = parser.parse_args()
    params = load_params()
    ensure_raw(args.raw, args.layout, "export")
    export, size, seed = params["export"], params["model"]["image_size"], params["seed"]
    classes = read_classes(args.manifests)
    train, val, test = (read_split(args.manifests, split) for split in ("train", "val", "test"))

    import keras
    import numpy as np

    import retrain.base  # noqa: F401  registers the Preprocess layer for loading
    from retrain.cache import user_cache_dir
    from retrain.evaluate import predict_images
    from retrain.export import (
        export_formats,
        latency_rounds_ms,
        measure,
        measured_rows,
        representative_rows,
    )
    from retrain.images import cached_image_array, image_rows, load_image
    from retrain.litert import litert_available

    if not litert_available():
        raise UserError("export needs the LiteRT interpreter: pip install ai-edge-litert")
    raw = Path(args.raw)
    # Agreement with Keras needs no labels: any image the model did not train on counts.
    held_out = measured_rows(val, test, export["held_out_images"])
    held_out_total = len(val) + len(test)
    measured_on = f"{len(held_out)} held-out images" + (
        f" (of {held_out_total}: those whose sha256 sorts first)"
        if len(held_out) < held_out_total else "")
    model = keras.models.load_model(args.model)
    calibration = representative_rows(train, export["representative_images"], seed)
    representative = np.stack([load_image(raw / p, size) for p in calibration["path"]])
    # Read by positioned reads, not through the memory map: each format's pass over every
    # held-out image would otherwise keep the whole file resident (4.2 GB at 28,000 images).
    images = image_rows(cached_image_array([raw / p for p in held_out["path"]],
                                           held_out["sha256"], size, user_cache_dir("images")))
    labels = held_out["label_index"].to_numpy()
    test_rows = (held_out["split"] == "test").to_numpy()
    keras_probabilities = predict_images(model, images)

    results = {}
    with atomic_path(args.out, directory=True) as out_dir:
        paths = export_formats(model, export["formats"], representative, out_dir,
                               export["int8_float_layers"], export["int8_size_budget"])
        latencies = latency_rounds_ms(paths, images[:1])
        for name, path in paths.items():
            results[name] = measure(path, images, labels, classes, keras_probabilities,
                                    test_rows)
            results[name]["latency_ms"] = float(np.median(latencies[name]))
            results[name]["held_out_images"] = held_out_total
            print(f"export: {name} {path.name}: agreement {results[name]['agreement']:.4f} "
                  f"on {measured_on}, "
                  f"accuracy {results[name]['accuracy']:.4f}, "
                  f"{results[name]['size_bytes'] / 1e6:.1f} MB, "
                  f"{results[name]['latency_ms']:.2f} ms per image")
            if results[name].get("float_layers"):
                print(f"export: {name} computes its first {results[name]['float_layers']} "
                      f"layers in float (through {results[name]['float_layers_through']}; "
                      "export.int8_float_layers), the rest in int8")
    write_json(args.details, results)
    write_rows(args.metrics, format_rows(results))


if __name__ == "__main__":
    main()
