"""Stage `crossval`: the head recipe on repeated stratified folds of train+val features."""

import retrain.interrupts  # noqa: F401, E402  # isort: skip  (first: Ctrl-C exits 130)
import argparse
import time

import numpy as np

from retrain.atomic import write_json
from retrain.errors import exits_cleanly
from retrain.headline import OFF, crossval_row
from retrain.manifests import load_split_arrays, read_classes, read_split
from retrain.params import load_params


@exits_cleanly
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--features", required=True)
    parser.add_argument("--manifests", required=True)
    parser.add_argument("--metrics", required=True, help="the headline row: accuracy and macro F1 "
                        "means over the folds, accuracy's sd (JSON; what DVC shows)")
    parser.add_argument("--details", required=True, help="every figure, per fold (JSON)")
    args = parser.parse_args()
    params = load_params()
    crossval = params["crossval"]
    if not crossval["folds"] or not crossval["repeats"]:
        # The output stays declared, and says why it holds no figures.
        write_json(args.details, {**OFF, **crossval})
        write_json(args.metrics, OFF)
        print("crossval: off (crossval.folds or crossval.repeats is 0)")
        return
    classes = read_classes(args.manifests)
    splits = ("train", "val")  # never test
    arrays = [load_split_arrays(args.features, args.manifests, split) for split in splits]
    features = np.concatenate([a[0] for a in arrays])
    labels = np.concatenate([a[1] for a in arrays])
    digests = np.concatenate([read_split(args.manifests, s)["sha256"].to_numpy()
                              for s in splits])

    from retrain.crossval import cross_validate_head

    start = time.perf_counter()
    summary = cross_validate_head(features, labels, digests, len(classes), params["head"],
                                  folds=crossval["folds"], repeats=crossval["repeats"],
                                  seed=crossval["seed"])
    write_json(args.details, summary)
    write_json(args.metrics, crossval_row(summary))
    print(f"crossval: {crossval['folds']} folds x {crossval['repeats']} repeats of "
          f"{len(labels)} train+val images: val_accuracy {summary['val_accuracy_mean']:.4f} "
          f"(sd {summary['val_accuracy_sd']:.4f} across folds), macro_f1 "
          f"{summary['macro_f1_mean']:.4f} (sd {summary['macro_f1_sd']:.4f}); "
          f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
