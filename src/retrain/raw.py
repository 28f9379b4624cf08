"""`data/raw`: the fetch stage's extracted copy of the archive, checked rather than tracked.

Why DVC does not track `data/raw`: a dataset is one archive, named by `data.url` and pinned by
`data.sha256`, and extraction is deterministic, so the folder adds nothing DVC must store.
Tracked, it cost what the data costs again: DVC's cache held a second copy of every image, and
every `dvc repro` or `dvc status` looked up each file (7 to 8 s for 100,000 images, even with
nothing to do). So `data/raw` is in `.dvcignore` and `.gitignore`; what DVC tracks is
`data/layout.json` (fetch's output), which records the archive's sha256 and a digest of every
extracted file's path and content; `split` depends on it, and every later stage on the
manifests, which carry each image's sha256.

What keeps the folder honest is the record fetch writes beside the images
(`data/raw/.fetched.json`: each file's size, modification time and sha256). Every stage that
reads images calls `ensure_raw` first:
- the folder is missing, or holds another archive's extraction (a fresh clone after
  `dvc pull`, a `dvc exp run --queue` workspace, a switched branch): it is extracted again
  from the archive (`data.url`, from the download cache when it is there) and must give
  exactly what `data/layout.json` recorded;
- a file was changed, added or removed by hand since: the stage stops, naming it. Nothing the
  user changed is overwritten; `dvc repro -f fetch` restores the archive's content, and a
  new archive (`data.url`, `data.sha256`) makes the change part of the data.
A stat check finds candidates (size or modification time differs) and only those are hashed,
so the check costs a directory walk, not a read of every image.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from retrain.atomic import write_json
from retrain.errors import DataError
from retrain.fetch import fetch_dataset, file_sha256
from retrain.params import load_params

RECORD = ".fetched.json"


def _walk(raw_dir: Path) -> dict[str, os.stat_result]:
    """Every file under `raw_dir` but the record, by `/`-separated relative path."""
    found = {}
    for folder, _, names in os.walk(raw_dir):
        for name in names:
            path = Path(folder, name)
            relative = path.relative_to(raw_dir).as_posix()
            if relative != RECORD:
                found[relative] = path.stat()
    return found


def record(raw_dir: str | Path, archive_sha256: str) -> dict:
    """Write the record of what `raw_dir` holds now, extracted from the archive with digest
    `archive_sha256`; return its summary (`content`, for data/layout.json)."""
    raw_dir = Path(raw_dir)
    files = {relative: [st.st_size, st.st_mtime_ns, file_sha256(raw_dir / relative)]
             for relative, st in sorted(_walk(raw_dir).items())}
    kept = {"archive_sha256": archive_sha256, "files": files}
    write_json(raw_dir / RECORD, kept)
    return summary(kept)


def summary(kept: dict) -> dict:
    """What data/layout.json stores: changes exactly when a file's path or bytes change."""
    listing = hashlib.sha256()
    for relative, (_, _, digest) in sorted(kept["files"].items()):
        listing.update(f"{relative}\0{digest}\n".encode())
    return {"archive_sha256": kept["archive_sha256"], "files": len(kept["files"]),
            "bytes": sum(size for size, _, _ in kept["files"].values()),
            "content_sha256": listing.hexdigest()}


def read_record(raw_dir: Path) -> dict | None:
    try:
        return json.loads((raw_dir / RECORD).read_text())
    except (OSError, ValueError):
        return None


def changed_files(raw_dir: Path, kept: dict) -> list[str]:
    """Files added, removed or with other bytes than the record says, sorted."""
    found = _walk(raw_dir)
    files = kept["files"]
    changed = sorted(set(found) ^ set(files))
    for relative in sorted(set(found) & set(files)):
        size, mtime_ns, digest = files[relative]
        st = found[relative]
        if (st.st_size, st.st_mtime_ns) != (size, mtime_ns) and (
                st.st_size != size or file_sha256(raw_dir / relative) != digest):
            changed.append(relative)
    return sorted(changed)


def ensure_raw(raw_dir: str | Path, layout_path: str | Path | None, stage: str) -> None:
    """Make sure `raw_dir` holds exactly what fetch recorded in `layout_path`: extract the
    archive again where the folder is missing or from another archive, stop (DataError)
    where a file was changed by hand. Without `layout_path` (a stage run by hand on a folder
    of class folders) the folder is taken as it is."""
    if layout_path is None:
        return
    raw_dir, layout_path = Path(raw_dir), Path(layout_path)
    try:
        expected = json.loads(layout_path.read_text())["content"]
    except (OSError, ValueError, KeyError):
        raise DataError(f"{layout_path}: missing or not written by this version of the fetch "
                        "stage (run `dvc repro fetch`)") from None
    kept = read_record(raw_dir)
    if kept is None or summary(kept) != expected:
        kept = _extract_again(raw_dir, expected, stage)
    changed = changed_files(raw_dir, kept)
    if changed:
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise DataError(
            f"{raw_dir / changed[0]}{more}: changed since fetch extracted the archive. "
            f"{raw_dir} is fetch's copy of data.url and is not tracked file by file: put the "
            "change in a new archive (data.url, data.sha256), or run `dvc repro -f fetch` to "
            "restore the archive's content")


def _extract_again(raw_dir: Path, expected: dict, stage: str) -> dict:
    why = "missing" if not raw_dir.exists() else "not what fetch recorded"
    print(f"{stage}: {raw_dir} is {why}: extracting the archive again "
          f"(data.url, sha256 {expected['archive_sha256'][:12]}...)", flush=True)
    data = load_params()["data"]
    if data["sha256"].lower() != expected["archive_sha256"]:
        raise DataError(f"data.sha256 ({data['sha256'][:12]}...) is not the archive fetch "
                        f"extracted ({expected['archive_sha256'][:12]}...): run `dvc repro`")
    extract_data(data, raw_dir)
    kept = read_record(raw_dir)
    if kept is None or summary(kept) != expected:
        raise DataError(f"{raw_dir}: extracting data.url again gave other files than "
                        "data/layout.json records (another version of the fetch code?): "
                        "run `dvc repro -f fetch`")
    return kept


def extract_data(data: dict, raw_dir: str | Path):
    """Fetch and extract the archive the `data` params name into `raw_dir` and record what
    it holds; return (dataset folder, layout reading, summary)."""

    dataset, reading = fetch_dataset(
        data["url"],
        data["sha256"],
        raw_dir,
        timeout_s=data["timeout_s"],
        retries=data["retries"],
        max_members=data["max_members"],
        max_extracted_bytes=data["max_extracted_mb"] * 1e6,
        layout=data["layout"],
        unlabeled=data["unlabeled"],
    )
    return dataset, reading, record(raw_dir, data["sha256"].lower())
