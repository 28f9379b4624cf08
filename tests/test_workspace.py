"""Scratch workspaces (`python -m retrain demo --dest DIR`) never replace a user's folder;
profiles merge their params into params.yaml without losing what the user wrote."""

import shutil

import pytest
import yaml
from conftest import REPO

from retrain.errors import ParamsError, UserError
from retrain.params import load_params
from retrain.workspace import SCRATCH_MARKER, apply_profile, create_workspace


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


@pytest.fixture
def profile_workspace(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    return tmp_path


def test_profile_merges_its_params_and_keeps_the_comments(profile_workspace):
    params_file = profile_workspace / "params.yaml"
    long_path = "/shared/classifiers/" + "a-long-folder-name/" * 6 + "imagenet.keras"
    before = params_file.read_text().replace("  model: imagenet", f'  model: "{long_path}"')
    assert long_path in before
    (profile_workspace / "params.yaml").write_text("# my notes on this run\n" + before)
    apply_profile(profile_workspace, "small")

    after = params_file.read_text()
    comments = [line.strip() for line in ("# my notes on this run\n" + before).splitlines()
                if line.strip().startswith("#")]
    assert comments and all(comment in after for comment in comments)
    # Quoted, on one line with its comment: untouched.
    assert any(line.startswith(f'  model: "{long_path}"  ') for line in after.splitlines())
    params = load_params(params_file)
    profile = yaml.safe_load((REPO / "profiles" / "small.yaml").read_text())
    assert params["model"] == profile["params"]["model"]
    assert params["head"]["epochs"] == profile["params"]["head"]["epochs"]
    assert params["head"]["dropout"] == yaml.safe_load(before)["head"]["dropout"]  # kept
    assert (profile_workspace / params["data"]["url"]).is_file()


def test_profile_refuses_a_broken_params_file_and_leaves_it(profile_workspace):
    params_file = profile_workspace / "params.yaml"
    params_file.write_text("seed: [1,\n")
    with pytest.raises(ParamsError, match=r"params.yaml: not valid YAML \(line 2: "):
        apply_profile(profile_workspace, "small")
    assert params_file.read_text() == "seed: [1,\n"
