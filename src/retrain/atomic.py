"""Outputs appear whole or not at all: write under a temporary name, then rename."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from retrain.errors import UserError, stop_if_interrupted


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(dest: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path for `dest`; on success it replaces `dest`, on error it vanishes.
    A file (`directory=False`) may replace a file, never a folder.

    The temporary folder lives in the staging area of `dest` (see `staging_area`), on the
    same file system, so the final rename is atomic, and not beside the output: a stage
    killed mid-write (SIGKILL, no cleanup runs) leaves its leftover where DVC never looks,
    and the next write of any stage reclaims it.
    """
    dest = Path(dest)
    if not directory and dest.is_dir() and not dest.is_symlink():
        # A file output never replaces a folder: `--out reports` meant `reports/x.md`.
        raise UserError(f"{dest}: is a folder; name a file to write")
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f"{TMP_PREFIX}{dest.name}-"
    reclaim_leftovers(dest.parent, prefix)  # beside the output: older versions put them there
    area = staging_area(dest.parent)
    if area != dest.parent.resolve() and area not in _reclaimed:
        reclaim_leftovers(area)  # the whole area once per process: every stage writes
        _reclaimed.add(area)
    with _owned_temporary(area, prefix) as tmp:
        target = tmp if directory else tmp / dest.name
        yield target
        stop_if_interrupted()  # after Ctrl-C, nothing takes the output's name
        if dest.exists() or dest.is_symlink():
            remove(dest)
        os.replace(target, dest)


TMP_PREFIX = ".tmp-"
LOCK_SUFFIX = ".lock"
ORPHAN_AGE_S = 2.0  # a lock file alone this long has no live owner (see _orphan_lock)
STAGING = Path(".dvc") / "tmp" / "retrain"  # inside a DVC project: git- and DVC-ignored
_reclaimed: set[Path] = set()  # staging areas this process has already swept


def staging_area(folder: Path) -> Path:
    """Where temporary work for an output in `folder` goes: `.dvc/tmp/retrain` of the DVC
    project holding `folder` when it is on the same file system (a rename across file systems
    is a copy, not atomic), else `folder` itself."""
    folder = Path(folder).resolve()
    project = next((p for p in (folder, *folder.parents) if (p / ".dvc").is_dir()), None)
    if project is None:
        return folder
    area = project / STAGING
    area.mkdir(parents=True, exist_ok=True)
    return area if area.stat().st_dev == folder.stat().st_dev else folder


@contextlib.contextmanager
def _owned_temporary(area: Path, prefix: str) -> Iterator[Path]:
    """A fresh temporary folder in `area`, marked as this process's by a lock held on its
    `.lock` file until the end. The OS drops the lock when the process dies, however it dies,
    which is how `reclaim_leftovers` tells a leftover from another stage's live work."""
    tmp = area / f"{prefix}{secrets.token_hex(8)}"
    lock_path = Path(f"{tmp}{LOCK_SUFFIX}")
    lock = FileLock(lock_path, timeout=0)
    lock.acquire()  # a fresh name: nobody else can hold it
    try:
        tmp.mkdir()  # only once the lock is held: a temporary folder is never unowned
        yield tmp
    finally:
        if tmp.exists():
            remove(tmp)
        lock.release()
        lock_path.unlink(missing_ok=True)


def reclaim_leftovers(area: str | Path, prefix: str = TMP_PREFIX) -> list[Path]:
    """Remove temporary folders in `area` whose owner is gone (killed stages); return them.

    Several stages may write at once (`dvc exp run --queue`, `dvc queue start -j 2`), so a
    folder is removed only when its lock can be taken, that is, when no live process holds it.
    A lock file left without its folder by a killed owner goes too (`_orphan_lock`).
    """
    reclaimed = []
    for path in sorted(Path(area).glob(f"{glob.escape(prefix)}*")):
        if path.is_dir():
            tmp = path
        elif _orphan_lock(path):
            tmp = path.with_name(path.name.removesuffix(LOCK_SUFFIX))
        else:  # a live folder's lock file, or not ours
            continue
        lock = FileLock(f"{tmp}{LOCK_SUFFIX}", timeout=0)
        try:
            lock.acquire()
        except Timeout:
            continue  # another stage is writing it
        try:
            if tmp.exists():
                remove(tmp)
                reclaimed.append(tmp)
        finally:
            lock.release()
            Path(f"{tmp}{LOCK_SUFFIX}").unlink(missing_ok=True)
    return reclaimed


def _orphan_lock(path: Path) -> bool:
    """A lock file without its folder, older than ORPHAN_AGE_S: its owner was killed after
    taking the lock and before making the folder, or after removing the folder and before
    removing the lock. (A younger one may be a live owner's, between those two steps.)"""
    if not path.name.endswith(LOCK_SUFFIX) or path.with_name(
            path.name.removesuffix(LOCK_SUFFIX)).exists():
        return False
    try:
        return time.time() - path.stat().st_mtime > ORPHAN_AGE_S
    except FileNotFoundError:
        return False


def write_json(dest: str | Path, data: Any) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text(dest: str | Path, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)
