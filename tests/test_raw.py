"""`data/raw` is fetch's extracted copy of the archive, checked by the stages that read it
instead of tracked by DVC (retrain.raw). These tests pin what that must not break: a changed
image re-runs split, an unchanged archive fetched again re-runs nothing after fetch, a missing
folder comes back identical, and a hand-edited image stops a stage rather than being used or
overwritten."""

import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO, dvc, set_param, stages_run
from PIL import Image

from retrain.errors import DataError
from retrain.raw import ensure_raw, record

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def split_run(tmp_path_factory) -> Path:
    """A small-profile workspace where fetch and split have run."""
    import subprocess

    from retrain.workspace import create_workspace

    workspace = create_workspace(tmp_path_factory.mktemp("raw") / "ws", source=REPO,
                                 profile="small")
    dvc(workspace, "repro", "split")
    subprocess.run(["git", "add", "-A"], cwd=workspace, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm",
                    "split"], cwd=workspace, check=True)
    return workspace


@pytest.fixture
def ws(split_run, tmp_path) -> Path:
    dest = tmp_path / "ws"
    shutil.copytree(split_run, dest, symlinks=True)
    return dest


def manifest_rows(workspace: Path) -> dict[str, str]:
    """path -> sha256 over the three splits."""
    rows = {}
    for split in ("train", "val", "test"):
        lines = (workspace / "data" / "manifests" / f"{split}.csv").read_text().splitlines()
        header = lines[0].split(",")
        for line in lines[1:]:
            cells = dict(zip(header, line.split(",")))
            rows[cells["path"]] = cells["sha256"]
    return rows


def first_image(workspace: Path) -> Path:
    return sorted((workspace / "data" / "raw").rglob("*.jpg"))[0]


def test_dvc_neither_stores_nor_walks_the_images(ws):
    stages = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    tracked = {entry["path"] for stage in stages.values()
               for entry in stage.get("deps", []) + stage.get("outs", [])}
    assert "data/layout.json" in tracked and not any(p.startswith("data/raw") for p in tracked)
    image_bytes = sum(p.stat().st_size for p in (ws / "data" / "raw").rglob("*.jpg"))
    cache = sum(p.stat().st_size for p in (ws / ".dvc" / "cache").rglob("*") if p.is_file())
    assert cache < image_bytes / 2  # manifests and metrics, no copy of the images
    (ws / "data" / "raw" / "stray.txt").write_text("not DVC's business")
    assert json.loads(dvc(ws, "status", "--json", "fetch", "split").stdout) == {}


def test_an_unchanged_archive_fetched_again_reruns_nothing_after_fetch(ws):
    layout = (ws / "data" / "layout.json").read_bytes()
    assert stages_run(dvc(ws, "repro", "--force", "--single-item", "fetch").stdout) == ["fetch"]
    assert (ws / "data" / "layout.json").read_bytes() == layout
    assert stages_run(dvc(ws, "repro", "split").stdout) == []


def test_a_changed_image_in_a_new_archive_reruns_split(ws):
    image = first_image(ws)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)  # other pixels, same name
    dataset = ws / "data" / "raw" / "synthetic_photos"
    archive = ws / "data" / "generated" / "changed.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(dataset, arcname=dataset.name)
    set_param(ws, "data.url", "data/generated/changed.tgz")
    set_param(ws, "data.sha256", hashlib.sha256(archive.read_bytes()).hexdigest())
    before = manifest_rows(ws)
    assert stages_run(dvc(ws, "repro", "split").stdout) == ["fetch", "split"]
    after = manifest_rows(ws)
    changed = image.relative_to(ws / "data" / "raw").as_posix()
    assert before.keys() == after.keys()
    assert [p for p in after if after[p] != before[p]] == [changed]


def test_a_missing_folder_is_extracted_again_with_identical_manifests(ws):
    before = {p.name: p.read_bytes() for p in (ws / "data" / "manifests").iterdir()}
    shutil.rmtree(ws / "data" / "raw")  # a fresh clone after `dvc pull`, a queued experiment
    result = dvc(ws, "repro", "--force", "--single-item", "split")
    assert "data/raw is missing: extracting the archive again" in result.stdout
    assert {p.name: p.read_bytes() for p in (ws / "data" / "manifests").iterdir()} == before


def test_a_hand_edited_image_stops_the_stage_and_stays_as_edited(ws):
    image = first_image(ws)
    os.utime(sorted((ws / "data" / "raw").rglob("*.jpg"))[1])  # a new time alone is no change
    edited = image.read_bytes() + b"edit"
    image.write_bytes(edited)
    result = dvc(ws, "repro", "--force", "--single-item", "split", check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    message = [line for line in output.splitlines() if line.startswith("error:")]
    assert message and image.name in message[0] and "changed since fetch" in message[0]
    assert "dvc repro -f fetch" in message[0]
    assert image.read_bytes() == edited  # nothing the user changed is overwritten


def test_record_and_check_on_a_plain_folder(tmp_path, class_tree):
    raw = tmp_path / "copy"
    shutil.copytree(class_tree, raw)
    summary = record(raw, "0" * 64)
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"content": summary}))
    ensure_raw(raw, layout, "test")  # as recorded: passes
    ensure_raw(raw / "elsewhere", None, "test")  # no layout: a stage run by hand, no check
    assert summary["files"] == sum(1 for p in raw.rglob("*") if p.is_file()) - 1  # not RECORD
    added = next(p for p in raw.iterdir() if p.is_dir()) / "new.jpg"
    added.write_bytes(b"x")
    with pytest.raises(DataError, match="new.jpg: changed since fetch"):
        ensure_raw(raw, layout, "test")
    added.unlink()
    ensure_raw(raw, layout, "test")
