"""CI cannot pass by skipping what matters: `.ci/run` makes the tests that need ../shared
fail when it is missing, and the workflow runs `.ci/run` on every push and pull request."""

import os
import subprocess

import pytest
import yaml
from conftest import REPO, REQUIRE_SHARED, shared_file_or_skip


def test_missing_shared_data_skips_in_a_plain_clone(tmp_path, monkeypatch):
    monkeypatch.delenv(REQUIRE_SHARED, raising=False)
    with pytest.raises(pytest.skip.Exception, match="not present"):
        shared_file_or_skip(tmp_path / "absent.tgz", "real photos")


def test_missing_shared_data_fails_under_ci_run(tmp_path, monkeypatch):
    monkeypatch.setenv(REQUIRE_SHARED, "1")
    with pytest.raises(pytest.fail.Exception, match=r"absent.tgz \(real photos\) not present"):
        shared_file_or_skip(tmp_path / "absent.tgz", "real photos")
    present = tmp_path / "present.tgz"
    present.write_bytes(b"")
    assert shared_file_or_skip(present, "real photos") == present


def test_ci_run_runs_make_test_requiring_shared_data(tmp_path):
    """`.ci/run` with a stand-in `make` that reports how it was called."""
    name = REQUIRE_SHARED
    (tmp_path / "make").write_text(f'#!/bin/sh\necho "$PWD make $* {name}=${{{name}:-unset}}"\n')
    (tmp_path / "make").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    env.pop(REQUIRE_SHARED, None)
    result = subprocess.run([str(REPO / ".ci" / "run")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"{REPO} make test {REQUIRE_SHARED}=1"


def test_tests_workflow_runs_ci_run_on_pushes_and_pull_requests():
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "tests.yml").read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as True
    assert "push" in triggers and "pull_request" in triggers
    steps = [step for job in workflow["jobs"].values() for step in job["steps"]]
    assert any(step.get("run", "").strip() == ".ci/run" for step in steps)
    readme = (REPO / "README.md").read_text()
    assert "make test" in readme and "make test" in (REPO / ".ci" / "run").read_text()
