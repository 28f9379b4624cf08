"""Where reusable downloads and decoded images live: outside the workspace, shared by runs.

`$RETRAIN_CACHE` if set, else `~/.cache/retrain`. Entries are named by content hashes, so
a stale entry can never be mistaken for a fresh one, and deleting the folder is always safe.
"""

import os
from pathlib import Path


def user_cache_dir(kind: str) -> Path:
    root = Path(os.environ.get("RETRAIN_CACHE") or Path.home() / ".cache" / "retrain")
    path = root / kind
    path.mkdir(parents=True, exist_ok=True)
    return path
