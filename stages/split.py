"""Stage `split`: list, check and split the images into train/val/test manifests."""

import retrain.interrupts  # noqa: F401, E402  # isort: skip  (first: Ctrl-C exits 130)
import argparse
import sys

from retrain.atomic import write_json
from retrain.errors import exits_cleanly
from retrain.headline import data_rows, write_rows
from retrain.manifests import build_manifests, data_metrics, read_user_edits, write_manifests
from retrain.params import load_params
from retrain.prefilter import check_prefilter_params, make_prefilter
from retrain.raw import ensure_raw


@exits_cleanly
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw", required=True, help="folder written by the fetch stage")
    parser.add_argument("--layout", help="data/layout.json: what --raw must hold, checked "
                        "and restored from the archive if missing (retrain.raw)")
    parser.add_argument("--out", required=True, help="manifest folder to write")
    parser.add_argument("--metrics", required=True,
                        help="folder for the headline rows: images included and excluded "
                        "(JSON files; what DVC shows, retrain.headline)")
    parser.add_argument("--details", required=True,
                        help="every count to write (JSON): images per class and split, "
                             "exclusions by reason")
    parser.add_argument("--exclude", help="images to leave out: a path or sha256 per line")
    parser.add_argument("--relabel", help="labels to replace: 'sha256,class' per line")
    args = parser.parse_args()
    params = load_params()
    ensure_raw(args.raw, args.layout, "split")
    split = params["split"]
    check_prefilter_params(params["prefilter"])
    user_edits = read_user_edits(args.exclude, args.relabel)  # a bad line stops us here
    if params["prefilter"]["enabled"]:
        from retrain.reproducibility import make_deterministic

        make_deterministic(split["seed"])
    manifests = build_manifests(
        args.raw,
        val_fraction=split["val_fraction"],
        test_fraction=split["test_fraction"],
        seed=split["seed"],
        method=split["method"],
        min_images_per_class=split["min_images_per_class"],
        top_classes=split["top_classes"],
        prefilter=make_prefilter(params["prefilter"]),
        user_edits=user_edits,
        group_near_duplicates=split["group_near_duplicates"],
        near_duplicate_bits=split["near_duplicate_bits"],
    )
    write_manifests(manifests, args.out)
    metrics = data_metrics(manifests)
    write_json(args.details, metrics)
    write_rows(args.metrics, data_rows(metrics))
    sizes = ", ".join(f"{name} {metrics['images'][name]['total']}" for name in manifests.splits)
    print(f"split: {len(manifests.classes)} classes; {sizes}; "
          f"excluded {metrics['excluded']['total']} (see {args.out}/excluded.csv)")
    for note in manifests.top_ups:
        print(f"split: note: {note} (every class needs an image in every split)",
              file=sys.stderr)
    if manifests.empty_classes:
        print(f"split: warning: {len(manifests.empty_classes)} class folder(s) hold no usable "
              f"image and are left out: {', '.join(manifests.empty_classes)}", file=sys.stderr)


if __name__ == "__main__":
    main()
