"""Outputs appear whole or not at all: write under a temporary name, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from retrain.errors import UserError


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(dest: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `dest`; on success it replaces `dest`, on error it vanishes.
    A file (`directory=False`) may replace a file, never a folder.

    The sibling lives in the same folder, so the final rename never crosses file systems.
    A stage killed mid-write leaves only a hidden `.tmp-*` name, never a valid-looking output.
    """
    dest = Path(dest)
    if not directory and dest.is_dir() and not dest.is_symlink():
        # A file output never replaces a folder: `--out reports` meant `reports/x.md`.
        raise UserError(f"{dest}: is a folder; name a file to write")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f".tmp-{dest.name}-*"):  # left by a killed earlier run
        remove(stale)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    if directory:  # mkdtemp makes 0700 folders; an output folder gets the usual permissions
        os.chmod(tmp, 0o777 & ~_umask())
    target = tmp if directory else tmp / dest.name
    try:
        yield target
        if dest.exists() or dest.is_symlink():
            remove(dest)
        os.replace(target, dest)
    finally:
        if tmp.exists():
            remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(dest: str | Path, data: Any) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text(dest: str | Path, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)
