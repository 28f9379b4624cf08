"""Where reusable downloads and decoded images live: outside the workspace, shared by runs.

`$RETRAIN_CACHE` if set, else `~/.cache/retrain`. Entries are named by content hashes, so
a stale entry can never be mistaken for a fresh one, and deleting the folder is always safe.

Decoded images are 2.5x the size of the JPEGs they come from (150 kB per image at 224 px),
and every new set of images (an image excluded, relabelled or added) makes a new file: at
100,000 images one data version's files take about 16 GB. So their folder is kept within a
budget (`$RETRAIN_IMAGE_CACHE_GB`, default 20), the least recently used files deleted
first; a deleted file is decoded again when a run needs it. A process (each stage `dvc
repro` runs is one) never deletes the files it uses itself, so one that needs more than the
budget leaves the folder above it until a later process writes a new file.
"""

import math
import os
import sys
from pathlib import Path

from retrain.errors import UserError

DEFAULT_IMAGE_CACHE_GB = 20.0
IMAGE_CACHE_BUDGET_VARIABLE = "RETRAIN_IMAGE_CACHE_GB"

# Files this process has used (absolute paths): its own make_room leaves them alone, so a
# stage that decodes its training images and then its validation images keeps both. A
# notebook running stages in one kernel keeps every file it used until it restarts.
_used_by_this_process: set[str] = set()


def user_cache_dir(kind: str) -> Path:
    root = Path(os.environ.get("RETRAIN_CACHE") or Path.home() / ".cache" / "retrain")
    path = root / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def image_cache_budget_bytes() -> int:
    """The decoded-image folder's budget in bytes, from $RETRAIN_IMAGE_CACHE_GB."""
    text = os.environ.get(IMAGE_CACHE_BUDGET_VARIABLE, "").strip()
    if not text:
        return int(DEFAULT_IMAGE_CACHE_GB * 1e9)
    try:
        budget = float(text) * 1e9
    except ValueError:
        budget = -1.0
    if not (budget >= 0 and math.isfinite(budget)):
        raise UserError(f"{IMAGE_CACHE_BUDGET_VARIABLE}={text!r}: expected a size in GB, "
                        "a number from 0 (keep only the files the running stage uses) to "
                        "1e299")
    return int(budget)


def mark_used(path: Path) -> None:
    """Record that `path` was used now (its modification time orders eviction) and that
    this process uses it (its own `make_room` will not delete it)."""
    _used_by_this_process.add(os.path.abspath(path))
    try:
        os.utime(path)
    except OSError:  # read-only cache or file gone: eviction order matters little then
        pass


def make_room(directory: Path, pattern: str, needed_bytes: int, budget_bytes: int) -> list[Path]:
    """Delete the least recently used files matching `pattern` in `directory` until they
    and `needed_bytes` more fit in `budget_bytes` (or none is left but this process's own,
    `mark_used`); the deleted files.

    Safe while another process reads a deleted file: on POSIX an open file lives on (and
    keeps its disk space) until it is closed. A file that cannot be deleted (Windows, while
    open elsewhere) is skipped."""
    entries, total = [], 0
    for path in directory.glob(pattern):
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        total += stat.st_size  # this process's own files count, though none is deleted
        if os.path.abspath(path) not in _used_by_this_process:
            entries.append((stat.st_mtime, path.name, path, stat.st_size))
    entries.sort()
    deleted = []
    for _, _, path, size in entries:
        if total + needed_bytes <= budget_bytes:
            break
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            continue
        total -= size
        deleted.append((path, size))
    if deleted:
        print(f"note: removed {len(deleted)} decoded-image file(s) from {directory}, the least "
              f"recently used ({sum(size for _, size in deleted) / 1e9:.1f} GB), to keep it "
              f"within {IMAGE_CACHE_BUDGET_VARIABLE}={budget_bytes / 1e9:g}",
              file=sys.stderr)
    return [path for path, _ in deleted]
