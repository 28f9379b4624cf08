"""Every GitHub workflow matches GitHub's workflow schema (checked offline: the schema ships
with check-jsonschema), and the cloud GPU workflow runs its pipeline job on the machine its
own run started, with the steps the README documents."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
CLOUD_GPU = ROOT / ".github" / "workflows" / "cloud_gpu.yml"


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda path: path.name)
def test_workflow_matches_the_github_schema(workflow):
    pytest.importorskip("check_jsonschema", reason="pip install -e '.[dev]'")
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                             "vendor.github-workflows", str(workflow)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def cloud_gpu() -> dict:
    return yaml.safe_load(CLOUD_GPU.read_text())


@pytest.mark.parametrize("job, step", [
    (job, index) for job, spec in cloud_gpu()["jobs"].items()
    for index, step in enumerate(spec["steps"]) if "run" in step])
def test_every_run_step_is_valid_bash(job, step):
    script = cloud_gpu()["jobs"][job]["steps"][step]["run"]
    done = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_pipeline_runs_on_the_machine_its_own_run_started():
    workflow = cloud_gpu()
    jobs = workflow["jobs"]
    launch = jobs["launch-runner"]["steps"][-1]["run"]
    assert "cml runner launch" in launch and "--single" in launch
    assert '--labels="$RUNNER_LABEL"' in launch
    # runs-on cannot read `env`, so the label is spelled out twice: they must agree.
    assert jobs["pipeline"]["runs-on"] == ["self-hosted", workflow["env"]["RUNNER_LABEL"]]
    assert jobs["pipeline"]["needs"] == "launch-runner"
    steps = "\n".join(step.get("run", "") for step in jobs["pipeline"]["steps"])
    for command in ("dvc pull", "dvc repro", "dvc push", "retrain report", "cml comment create"):
        assert command in steps
    # Triggers: by hand, or the `cloud-gpu` label on a pull request (YAML 1.1 reads `on` as
    # True).
    assert "workflow_dispatch" in workflow[True] and workflow[True]["pull_request"] == {
        "types": ["labeled"]}
    assert "cloud-gpu" in jobs["launch-runner"]["if"]
