"""Stage `fetch`: download the archive named by `data.url`, check its sha256, extract it."""

import argparse
from pathlib import Path

from retrain.archive import UNLABELED, class_folders
from retrain.errors import exits_cleanly
from retrain.fetch import fetch_dataset
from retrain.params import load_params


@exits_cleanly
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path,
                        help="folder to write: <out>/<dataset>/<class>/<images>")
    args = parser.parse_args()
    data = load_params()["data"]
    dataset = fetch_dataset(
        data["url"],
        data["sha256"],
        args.out,
        timeout_s=data["timeout_s"],
        retries=data["retries"],
        max_members=data["max_members"],
        max_extracted_bytes=data["max_extracted_mb"] * 1e6,
    )
    print(f"fetch: {dataset.name}: {len(class_folders(dataset))} class folders in {dataset}")
    if (dataset / UNLABELED).is_dir():
        print(f"fetch: images outside every class folder are set aside in {dataset / UNLABELED} "
              "(split lists them in excluded.csv)")


if __name__ == "__main__":
    main()
