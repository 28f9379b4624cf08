"""Stage `evaluate`: test metrics and per-image predictions for the head and the full model."""

import retrain.interrupts  # noqa: F401, E402  # isort: skip  (first: Ctrl-C exits 130)
import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from retrain.atomic import atomic_path, write_json
from retrain.errors import DataError, exits_cleanly
from retrain.headline import model_rows, write_rows
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
    parser.add_argument("--features", required=True)
    parser.add_argument("--head", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--replicates", required=True,
                        help="finetune's replicates folder: replicates.json and the weights "
                             "of replicates 1..K-1 (replicate 0 is --model)")
    parser.add_argument("--metrics", required=True,
                        help="folder for the headline rows: one per model (JSON files; "
                        "what DVC shows, retrain.headline)")
    parser.add_argument("--details", required=True,
                        help="every figure (JSON): loss, per-class precision, recall, F1")
    parser.add_argument("--predictions", required=True, help="fine-tuned model's predictions")
    parser.add_argument("--head-predictions", required=True)
    parser.add_argument("--near-duplicates", required=True,
                        help="the audit's near-duplicate groups (CSV: group, path, sha256, "
                             "split): test images with a twin in train or val")
    args = parser.parse_args()
    params = load_params()
    ensure_raw(args.raw, args.layout, "evaluate")
    classes = read_classes(args.manifests)
    test = read_split(args.manifests, "test")
    features = np.load(Path(args.features) / "test.npy")
    if len(features) != len(test):
        raise DataError(f"{args.features}/test.npy does not match the test manifest: "
                        "re-run the extract stage")

    import keras

    import retrain.base  # noqa: F401  registers the Preprocess layer for loading
    from retrain.cache import user_cache_dir
    from retrain.evaluate import (
        classification_metrics,
        leak_free_accuracy,
        leaked_test_images,
        predict_images,
        predictions_table,
        replicate_figures,
        summary_lines,
    )
    from retrain.images import cached_image_array, image_rows

    labels = test["label_index"].to_numpy()
    head_probabilities = keras.models.load_model(args.head).predict(features, verbose=0)
    model = keras.models.load_model(args.model)
    # Positioned reads, not the memory map: a pass through the map keeps every page it read
    # resident (1.5 GB for 10,000 test images at 224 px).
    images = image_rows(cached_image_array([Path(args.raw) / p for p in test["path"]],
                                           test["sha256"], params["model"]["image_size"],
                                           user_cache_dir("images")))
    model_probabilities = predict_images(model, images)
    replicates = json.loads((Path(args.replicates) / "replicates.json").read_text())
    other_replicates = []
    for replicate in replicates[1:]:  # the same architecture, each replicate's weights
        model.load_weights(Path(args.replicates) / replicate["weights"])
        other_replicates.append(predict_images(model, images))

    leaked = leaked_test_images(pd.read_csv(args.near_duplicates, dtype=str))
    results = {}
    for name, probabilities, dest in (
        ("head", head_probabilities, args.head_predictions),
        ("finetuned", model_probabilities, args.predictions),
    ):
        results[name] = classification_metrics(probabilities, labels, classes)
        results[name] |= leak_free_accuracy(probabilities, labels, test["path"], leaked)
        table = predictions_table(test["path"], test["sha256"], probabilities, labels, classes,
                                  other_replicates if name == "finetuned" else ())
        with atomic_path(dest) as tmp:
            table.to_csv(tmp, index=False, lineterminator="\n")
    results["finetuned"]["replicates"] = replicate_figures(
        [model_probabilities, *other_replicates], labels, [r["seed"] for r in replicates])
    write_json(args.details, results)
    write_rows(args.metrics, model_rows(results))
    print("\n".join(summary_lines(results, len(test))))
    if len(replicates) > 1:
        spread = results["finetuned"]["replicates"]
        print(f"evaluate: {len(replicates)} fine-tuning replicates (seeds "
              f"{', '.join(str(r['seed']) for r in replicates)}): test accuracy mean "
              f"{spread['test_accuracy_mean']:.4f}, sd {spread['test_accuracy_sd']:.4f}; "
              f"macro F1 mean {spread['macro_f1_mean']:.4f}, sd {spread['macro_f1_sd']:.4f} "
              "(sd over replicates: the training noise on these test images)")
    if leaked:
        print(f"evaluate: without the {len(leaked)} test images that have a near-duplicate in "
              f"train or val ({args.near_duplicates}): test accuracy head "
              f"{results['head']['leak_free_test_accuracy']}, fine-tuned "
              f"{results['finetuned']['leak_free_test_accuracy']}")


if __name__ == "__main__":
    main()
