"""Stage `audit`: label issues, near-duplicates (leaks across splits) and outliers, found on
the cached features, with galleries to look at."""

import retrain.interrupts  # noqa: F401, E402  # isort: skip  (first: Ctrl-C exits 130)
import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from retrain.atomic import atomic_path, write_json
from retrain.errors import exits_cleanly
from retrain.headline import AUDIT_ROWS, OFF, audit_rows, off_rows, write_rows
from retrain.params import load_params
from retrain.raw import ensure_raw

TABLES = ("label_issues", "near_duplicates", "outliers")
COLUMNS = {
    "label_issues": ["path", "sha256", "split", "label", "suggested_label", "label_quality",
                     "flagged"],
    "near_duplicates": ["group", "path", "sha256", "split"],
    "outliers": ["path", "sha256", "split", "label", "ood_score", "flagged"],
}
GALLERY_PIXELS = 160
GROUP_IMAGES = 6  # members of a near-duplicate group shown side by side
# crossval.folds: 0 turns cross-validation off, not the audit, which then uses this many.
DEFAULT_FOLDS = 5


def write_table(frame: pd.DataFrame, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")


def load_images(raw: str, paths) -> np.ndarray:
    from retrain.images import load_image

    return np.stack([load_image(Path(raw) / p, GALLERY_PIXELS) for p in paths]) \
        if len(paths) else np.zeros((0, GALLERY_PIXELS, GALLERY_PIXELS, 3), np.uint8)


def draw_galleries(raw: str, results: dict, gallery_size: int, out: Path) -> None:
    from retrain.figures import label_issues_figure, near_duplicates_figure

    top = results["label_issues"].head(gallery_size)
    label_issues_figure(load_images(raw, top["path"]), top["label"], top["suggested_label"],
                        top["label_quality"], out / "label_issues.png")
    groups = results["near_duplicates"]
    crossing = groups.groupby("group")["split"].transform("nunique") > 1
    # Only the groups the gallery shows are decoded: a leaky dataset has thousands.
    first = list(groups[crossing].groupby("group").head(GROUP_IMAGES).groupby("group"))
    shown = [(load_images(raw, members["path"]),
              [f"{split}: {Path(path).name}" for split, path in
               zip(members["split"], members["path"], strict=True)])
             for _, members in first[:gallery_size]]
    near_duplicates_figure(shown, out / "near_duplicates.png")


@exits_cleanly
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw", required=True, help="images, for the galleries")
    parser.add_argument("--layout", help="data/layout.json: what --raw must hold, checked "
                        "and restored from the archive if missing (retrain.raw)")
    parser.add_argument("--features", required=True)
    parser.add_argument("--manifests", required=True)
    parser.add_argument("--out", required=True, help="folder for the CSVs and galleries")
    parser.add_argument("--metrics", required=True, help="folder for the headline rows: one "
                        "per finding (JSON files; what DVC shows, retrain.headline)")
    parser.add_argument("--details", required=True, help="every count (JSON)")
    args = parser.parse_args()
    params = load_params()
    ensure_raw(args.raw, args.layout, "audit")
    settings, out = params["audit"], Path(args.out)
    if not settings["enabled"]:
        # Declared outputs still exist: empty tables and galleries saying there is nothing.
        empty = {name: pd.DataFrame(columns=COLUMNS[name]) for name in TABLES}
        for name, frame in empty.items():
            write_table(frame, out / f"{name}.csv")
        draw_galleries(args.raw, empty, settings["gallery_size"], out)
        write_json(args.details, OFF)
        write_rows(args.metrics, off_rows(AUDIT_ROWS))
        print("audit: off (audit.enabled is false)")
        return

    from retrain.audit import audit, read_inputs

    start = time.perf_counter()
    inputs = read_inputs(args.features, args.manifests)
    folds = params["crossval"]["folds"] or DEFAULT_FOLDS
    results = audit(inputs, settings, folds=folds, seed=params["crossval"]["seed"])
    for name in TABLES:
        write_table(results[name], out / f"{name}.csv")
    draw_galleries(args.raw, results, settings["gallery_size"], out)
    counts = results["metrics"]
    write_json(args.details, counts)
    write_rows(args.metrics, audit_rows(counts))
    print(f"audit: {counts['images']} images: {counts['label_issues']} label issues "
          f"(labels agree with a classifier that never saw them on "
          f"{(counts['label_agreement'] or 0):.1%}), "
          f"{counts['near_duplicate_groups']} near-duplicate groups "
          f"({counts['cross_split_groups']} across splits, {counts['leaked_test_images']} "
          f"test images leaked), {counts['outliers']} outliers"
          + (f" (neighbours sought among the {counts['outlier_reference_images']:,} images "
             "whose sha256 sorts first)"
             if counts["outlier_reference_images"] < counts["images"] else "")
          + "; "
          f"{time.perf_counter() - start:.1f} s (see {out}/)")


if __name__ == "__main__":
    main()
