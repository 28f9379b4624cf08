"""Stage `fetch`: download the archive named by `data.url`, check its sha256, extract it, and
print and store how its folders were read (data.layout) and what the extraction holds."""

import retrain.interrupts  # noqa: F401, E402  # isort: skip  (first: Ctrl-C exits 130)
import argparse
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from retrain.atomic import write_json
from retrain.errors import exits_cleanly
from retrain.layout import describe
from retrain.params import load_params
from retrain.raw import extract_data


@exits_cleanly
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path,
                        help="folder to write: <out>/<dataset>/<class>/<images>")
    parser.add_argument("--layout", required=True, type=Path,
                        help="JSON file to write: how the archive's folders were read")
    args = parser.parse_args()
    data = load_params()["data"]
    dataset, reading, content = extract_data(data, args.out)
    # DVC tracks this file, not the folder (retrain.raw): `content` makes it change exactly
    # when an extracted file does.
    write_json(args.layout, {**reading.as_json(), "content": content})
    archive_name = PurePosixPath(urlsplit(data["url"]).path).name or "the archive"
    for line in describe(reading, archive_name):
        print(f"fetch: {line}")
    print(f"fetch: {dataset.name}: {len(reading.classes)} classes in {dataset}; the reading "
          f"is in {args.layout}")


if __name__ == "__main__":
    main()
