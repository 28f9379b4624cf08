"""atomic_path: where temporary work lives, and how a killed writer's leftover is reclaimed
without touching the live work of a stage running beside it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from retrain.atomic import STAGING, atomic_path, write_json

# A writer process: opens atomic_path for `dest` (a folder), writes into it, then either
# dies by SIGKILL (no cleanup code runs) or waits for a line on stdin and finishes.
WRITER = textwrap.dedent("""
    import os, signal, sys
    from retrain.atomic import atomic_path
    dest, then = sys.argv[1], sys.argv[2]
    with atomic_path(dest, directory=True) as tmp:
        (tmp / "part.bin").write_bytes(b"x" * 100_000)
        print("writing", flush=True)
        if then == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.stdin.readline()
""")


def start_writer(project: Path, dest: str, then: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", WRITER, dest, then], cwd=project,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "writing\n"
    return process


def killed_writer(project: Path, dest: str) -> None:
    process = start_writer(project, dest, "die")
    assert process.wait() == -9


@pytest.fixture
def project(tmp_path) -> Path:
    """A folder DVC would call a project: it holds `.dvc/`."""
    (tmp_path / ".dvc").mkdir()
    return tmp_path


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_killed_writer_leaves_nothing_beside_its_output(project):
    killed_writer(project, "data/raw")
    assert entries(project / "data") == []  # nothing DVC or a user could take for data
    left = [name for name in entries(project / STAGING) if not name.endswith(".lock")]
    assert len(left) == 1 and left[0].startswith(".tmp-raw-")


def test_next_write_reclaims_dead_leftovers_and_spares_live_work(project, monkeypatch):
    live = start_writer(project, "data/features", "wait")  # a stage still writing
    try:
        killed_writer(project, "data/raw")  # its own sweep spared the live stage's work
        def temporaries():
            return [n for n in entries(project / STAGING) if not n.endswith(".lock")]

        assert [name.split("-")[1] for name in temporaries()] == ["features", "raw"]
        monkeypatch.chdir(project)
        write_json("metrics/other.json", {"any": "stage"})  # another output, another stage
        assert [name.split("-")[1] for name in temporaries()] == ["features"]
    finally:
        live.communicate("go\n")
    assert live.returncode == 0
    assert entries(project / "data" / "features") == ["part.bin"]  # finished whole
    assert entries(project / STAGING) == []


def test_a_lock_file_left_without_its_folder_is_reclaimed_unless_held(project, monkeypatch):
    """A writer killed between taking its lock and making its folder leaves the lock file
    alone; the next sweep removes it once it is older than a live writer's lock file is
    when still unlocked, and never while someone holds it."""
    import os
    import time

    from filelock import FileLock

    from retrain.atomic import ORPHAN_AGE_S, reclaim_leftovers

    area = project / STAGING
    area.mkdir(parents=True)
    orphan, held, young = (area / f".tmp-features-{name}.lock"
                           for name in ("dead", "held", "young"))
    for lock in (orphan, held):
        lock.touch()
        old = time.time() - 10 * ORPHAN_AGE_S
        os.utime(lock, (old, old))
    young.touch()
    holder = FileLock(held, timeout=0)
    holder.acquire()  # a live owner
    try:
        reclaim_leftovers(area)
        assert sorted(entries(area)) == sorted([held.name, young.name])
    finally:
        holder.release()


def test_leftover_beside_an_output_from_an_older_version_is_reclaimed(project):
    old = project / "data" / ".tmp-raw-k3j2h1g0"  # as older versions left them
    (old / "flowers").mkdir(parents=True)
    with atomic_path(project / "data" / "raw", directory=True) as tmp:
        (tmp / "a.txt").write_text("new")
    assert entries(project / "data") == ["raw"]


def test_outside_a_dvc_project_work_stays_beside_the_output(tmp_path):
    with atomic_path(tmp_path / "out" / "x.json") as tmp:
        assert tmp.parent.parent == tmp_path / "out"
        tmp.write_text("{}")
    assert entries(tmp_path / "out") == ["x.json"]
