"""Scratch workspaces (`python -m retrain demo --dest DIR`) never replace a user's folder."""

import pytest
from conftest import REPO

from retrain.errors import UserError
from retrain.workspace import SCRATCH_MARKER, create_workspace


def test_a_scratch_workspace_is_replaced_but_a_users_folder_is_not(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(UserError, match="photos: folder exists and is not a scratch workspace"):
        create_workspace(photos, source=REPO)
    assert [p.name for p in photos.iterdir()] == ["holiday.jpg"]

    scratch = create_workspace(tmp_path / "demo", source=REPO)
    assert (scratch / SCRATCH_MARKER).exists() and (scratch / "dvc.yaml").exists()
    (scratch / "leftover.txt").write_text("from the last demo")
    again = create_workspace(tmp_path / "demo", source=REPO)
    assert not (again / "leftover.txt").exists() and (again / ".git").is_dir()
