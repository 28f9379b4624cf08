"""The pull-request workflow's shell steps: valid bash, and the choice between the real data
and the small profile made as documented."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "pull_request.yml"


def steps() -> dict[str, dict]:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    return {step.get("name", step.get("uses")): step
            for job in workflow["jobs"].values() for step in job["steps"]}


@pytest.mark.parametrize("name", [name for name, step in steps().items() if "run" in step])
def test_every_run_step_is_valid_bash(name):
    done = subprocess.run(["bash", "-n"], input=steps()[name]["run"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    return repo


def choose_data(repo: Path, tmp_path: Path, remote: str | None, **secrets: str) -> str:
    """Run the workflow's "Choose the data" step; the mode it outputs."""
    config = repo / ".dvc" / "config"
    config.write_text("" if remote is None else
                      f"[core]\n    remote = storage\n['remote \"storage\"']\n    url = {remote}\n")
    (repo / ".dvc" / "config.local").unlink(missing_ok=True)
    output = tmp_path / "github_output"
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GITHUB_OUTPUT": str(output),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_CONFIG_LOCAL": "", "AWS_ACCESS_KEY_ID": "", **secrets}
    subprocess.run(["bash", "-e", "-c", steps()["Choose the data"]["run"]], cwd=repo, env=env,
                   check=True)
    return output.read_text().strip()


@pytest.mark.parametrize("remote, secrets, mode", [
    (None, {}, "small"),
    (None, {"AWS_ACCESS_KEY_ID": "AKIA"}, "small"),             # credentials, no remote
    ("s3://bucket/retrain", {}, "small"),                      # a remote, no credentials
    ("s3://bucket/retrain", {"AWS_ACCESS_KEY_ID": "AKIA"}, "real"),
    ("/mnt/team/dvc-cache", {"DVC_CONFIG_LOCAL": "# keys"}, "real"),
])
def test_real_data_only_with_a_remote_and_its_credentials(dvc_repo, tmp_path, remote, secrets,
                                                          mode):
    assert choose_data(dvc_repo, tmp_path, remote, **secrets) == f"mode={mode}"


def test_credentials_from_the_secret_land_in_the_git_ignored_local_config(dvc_repo, tmp_path):
    choose_data(dvc_repo, tmp_path, "/mnt/team/dvc-cache",
                DVC_CONFIG_LOCAL="['remote \"storage\"']\n    user = ci")
    assert "user = ci" in (dvc_repo / ".dvc" / "config.local").read_text()
    ignored = subprocess.run(["git", "check-ignore", "-q", ".dvc/config.local"], cwd=dvc_repo)
    assert ignored.returncode == 0
