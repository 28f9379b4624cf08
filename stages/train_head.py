"""Stage `train_head`: train Dropout -> Dense on the cached features."""

import retrain.interrupts  # noqa: F401, E402  # isort: skip  (first: Ctrl-C exits 130)
import argparse

from retrain.atomic import atomic_path, write_json
from retrain.errors import exits_cleanly
from retrain.manifests import load_split_arrays, read_classes
from retrain.params import load_params


@exits_cleanly
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--features", required=True)
    parser.add_argument("--manifests", required=True)
    parser.add_argument("--model", required=True, help="head model to write (.keras)")
    parser.add_argument("--live", required=True, help="dvclive folder for the curves")
    parser.add_argument("--details", required=True,
                        help="JSON to write: epochs run, the best epoch's loss and accuracy")
    args = parser.parse_args()
    params = load_params()
    head_params = params["head"]
    classes = read_classes(args.manifests)
    train = load_split_arrays(args.features, args.manifests, "train")
    val = load_split_arrays(args.features, args.manifests, "val")

    from dvclive import Live

    from retrain.head import build_head, train_head
    from retrain.reproducibility import make_deterministic
    from retrain.training import CurveLogger, balanced_class_weights, history_summary

    make_deterministic(params["seed"])
    head = build_head(train[0].shape[1], len(classes), head_params["dropout"], params["seed"])
    weights = balanced_class_weights(train[1], len(classes)) if head_params["class_weights"] \
        else None
    with atomic_path(args.live, directory=True) as live_dir, \
            Live(str(live_dir), dvcyaml=None, save_dvc_exp=False) as live:
        history = train_head(
            head, train, val, learning_rate=head_params["learning_rate"],
            epochs=head_params["epochs"], batch_size=head_params["batch_size"],
            class_weight=weights, patience=head_params["early_stopping_patience"],
            callbacks=[CurveLogger(live)])
    with atomic_path(args.model) as tmp:
        head.save(tmp)
    summary = history_summary(history)
    write_json(args.details, summary)
    print(f"train_head: val_accuracy {summary.get('val_accuracy', float('nan')):.4f} "
          f"after {summary['epochs_run']} epochs (best epoch {summary['best_epoch']})")


if __name__ == "__main__":
    main()
