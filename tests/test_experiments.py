"""Experiments on the small profile: what a param change re-runs, queued sweeps that reuse the
cached features, a misspelled `-S` key, and forced re-runs that reproduce the same hashes.

Each test works on a private copy of the session's finished pipeline (`workspace`) and follows
the commands documented in the README's Experiments section.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import dvc, set_param, stages_run

pytestmark = pytest.mark.slow

UPSTREAM = ["fetch", "split", "extract"]
FROM_TRAIN_HEAD = ["train_head", "crossval", "finetune", "evaluate", "export", "card",
                   "render"]

# The compact `dvc exp show` of the README's Experiments section: the swept params and the
# headline metrics.
SHOW_KEEP = (r"^(Experiment|Created|State)$|^head\.(dropout|learning_rate)$"
             r"|^finetuned\.(test_accuracy|macro_f1)$")


def locked_outs(workspace: Path) -> dict[str, dict[str, str]]:
    """{stage: {output path: md5}} as recorded in dvc.lock."""
    lock = yaml.safe_load((workspace / "dvc.lock").read_text())
    return {name: {out["path"]: out["md5"] for out in stage.get("outs", [])}
            for name, stage in lock["stages"].items()}


def read_metrics(workspace: Path) -> dict[str, dict]:
    """Every figure: the metrics files DVC shows and the stages' details files, by path."""
    return {path.relative_to(workspace).as_posix(): json.loads(path.read_text())
            for folder in ("metrics", "reports/details")
            for path in sorted((workspace / folder).glob("*.json"))}


def test_head_learning_rate_change_reruns_train_head_and_later_only(workspace):
    before, metrics_before = locked_outs(workspace), read_metrics(workspace)
    learning_rate = yaml.safe_load((workspace / "params.yaml").read_text())["head"][
        "learning_rate"]
    set_param(workspace, "head.learning_rate", learning_rate / 2)

    result = dvc(workspace, "repro")

    assert stages_run(result.stdout) == FROM_TRAIN_HEAD, result.stdout
    for stage in UPSTREAM:
        assert f"Stage '{stage}' didn't change, skipping" in result.stdout
    after = locked_outs(workspace)
    assert {s: after[s] for s in UPSTREAM} == {s: before[s] for s in UPSTREAM}
    assert after["train_head"] != before["train_head"]

    # Back to the committed value: the run-cache restores every stage's outputs, nothing runs.
    set_param(workspace, "head.learning_rate", learning_rate)
    result = dvc(workspace, "repro")
    assert stages_run(result.stdout) == [], result.stdout
    for stage in FROM_TRAIN_HEAD:
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in result.stdout
    assert locked_outs(workspace) == before
    assert read_metrics(workspace) == metrics_before


def stages_changed(workspace: Path) -> set[str]:
    """Stages `dvc status` would re-run."""
    return set(json.loads(dvc(workspace, "status", "--json").stdout))


def test_each_seed_and_finetune_change_invalidates_only_its_stages(workspace):
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    # The training seed: a `dvc exp run -S seed=1,2,3` sweep keeps the split, the features and
    # the cross-validation, so it measures training noise on one fixed test set.
    # (export reads it too: it draws the int8 calibration images; the card states it.)
    set_param(workspace, "seed", params["seed"] + 1)
    assert stages_changed(workspace) == {"train_head", "finetune", "export", "card", "render"}
    set_param(workspace, "seed", params["seed"])
    # Fine-tuning params leave the head's cross-validation alone ...
    set_param(workspace, "finetune.epochs", params["finetune"]["epochs"] + 1)
    assert "crossval" not in stages_changed(workspace)
    set_param(workspace, "finetune.epochs", params["finetune"]["epochs"])
    # ... head params re-run it ...
    set_param(workspace, "head.dropout", 0.5)
    assert "crossval" in stages_changed(workspace)
    set_param(workspace, "head.dropout", params["head"]["dropout"])
    # ... and the split seed re-draws the split (then everything after it runs); finetune
    # reads it too, to rebuild the base extract built.
    set_param(workspace, "split.seed", params["split"]["seed"] + 1)
    assert stages_changed(workspace) == {"split", "extract", "finetune"}
    set_param(workspace, "split.seed", params["split"]["seed"])
    assert stages_changed(workspace) == set()


def test_misspelled_set_param_fails_and_names_the_key(workspace):
    params_before = (workspace / "params.yaml").read_text()

    # dvc (through Hydra) refuses to override a key that params.yaml does not have ...
    result = dvc(workspace, "exp", "run", "-S", "head.learnig_rate=0.1", check=False)
    assert result.returncode != 0
    assert "head.learnig_rate" in result.stdout + result.stderr
    assert (workspace / "params.yaml").read_text() == params_before

    # ... and Hydra's explicit append syntax gets past dvc, but not past the params loader:
    # the first stage that reads params.yaml stops with exit status 2 and the key's name.
    result = dvc(workspace, "exp", "run", "-S", "+head.learnig_rate=0.1", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "head.learnig_rate: unknown key" in output
    assert "exited with 2" in output
    assert stages_run(result.stdout) == ["train_head"]
    assert dvc(workspace, "exp", "list", "--name-only").stdout.strip() == ""  # nothing recorded


def queue_states(workspace: Path) -> dict[str, str]:
    """{experiment name: state} from `dvc queue status` (Queued, Running, Success, Failed)."""
    rows = [line.split() for line in dvc(workspace, "queue", "status").stdout.splitlines()]
    return {row[1]: row[-1] for row in rows if len(row) >= 4 and row[0] != "Task"}


def wait_for_queue(workspace: Path, timeout: float) -> dict[str, str]:
    """Poll `dvc queue status` until no experiment is queued or running."""
    deadline = time.monotonic() + timeout
    while True:
        states = queue_states(workspace)
        if not {"Queued", "Running"} & set(states.values()):
            return states
        if time.monotonic() > deadline:
            raise AssertionError(f"queue still busy after {timeout:.0f} s: {states}")
        time.sleep(5)


def start_queue(workspace: Path) -> None:
    """`dvc queue start`, its output in a file: the worker it leaves running inherits the
    command's stdout, and a captured pipe would then stay open (and `dvc` blocked) for as long
    as that worker lingers after the queue is done."""
    from retrain.workspace import pipeline_env

    with open(workspace.parent / "queue-start.log", "w") as log:
        subprocess.run([sys.executable, "-m", "dvc", "queue", "start"], cwd=workspace,
                       env=pipeline_env(workspace), stdout=log, stderr=subprocess.STDOUT,
                       stdin=subprocess.DEVNULL, check=True)


def test_queued_sweep_runs_both_points_and_reuses_the_features(workspace):
    baseline = locked_outs(workspace)
    queued = dvc(workspace, "exp", "run", "--queue", "-n", "sweep", "-S", "head.dropout=0.2,0.5")
    names = ["sweep-1", "sweep-2"]
    for name in names:
        assert f"Queued experiment '{name}'" in queued.stdout, queued.stdout

    start_queue(workspace)
    try:
        states = wait_for_queue(workspace, timeout=900)
    finally:
        dvc(workspace, "queue", "stop", "--kill", check=False)  # no worker outlives the test
    logs = {name: dvc(workspace, "queue", "logs", name).stdout for name in names}
    for name in names:
        assert states.get(name) == "Success", f"{name}: {states}\n{logs[name]}"

    # Feature extraction ran once, for the baseline: both experiments reused its outputs.
    for name, log in logs.items():
        assert stages_run(log) == FROM_TRAIN_HEAD, f"{name}:\n{log}"
        assert "Stage 'extract' didn't change, skipping" in log

    shown = json.loads(dvc(workspace, "exp", "show", "--json").stdout)
    experiments = {exp["name"]: exp["revs"][0]["data"]
                   for row in shown for exp in (row.get("experiments") or [])}
    assert sorted(experiments) == names
    for name, dropout in zip(names, (0.2, 0.5), strict=True):
        data = experiments[name]
        assert data["params"]["params.yaml"]["data"]["head"]["dropout"] == dropout
        finetuned = data["metrics"]["metrics/evaluate.json"]["data"]["finetuned"]
        assert 0.0 <= finetuned["test_accuracy"] <= 1.0
        assert data["deps"]["data/features"]["hash"] == baseline["extract"]["data/features"]

    # The documented compact table keeps exactly the chosen columns.
    table = dvc(workspace, "exp", "show", "--csv", "--drop", ".*", "--keep", SHOW_KEEP).stdout
    header, *rows = table.splitlines()
    assert header.split(",") == ["Experiment", "Created", "State", "finetuned.macro_f1",
                                 "finetuned.test_accuracy", "head.dropout",
                                 "head.learning_rate"]
    assert {row.split(",")[0] for row in rows} >= set(names)

    diff = json.loads(dvc(workspace, "exp", "diff", *names, "--json").stdout)
    assert diff["params"]["params.yaml"]["head.dropout"] == {"old": 0.2, "new": 0.5,
                                                             "diff": pytest.approx(0.3)}

    dvc(workspace, "exp", "apply", "sweep-1")
    assert yaml.safe_load((workspace / "params.yaml").read_text())["head"]["dropout"] == 0.2
    applied = json.loads((workspace / "metrics" / "evaluate.json").read_text())
    shown_metrics = experiments["sweep-1"]["metrics"]["metrics/evaluate.json"]["data"]
    # DVC shows numbers, not lists: each [low, high] interval is there as its two bounds.
    assert {key: value for key, value in applied["finetuned"].items()
            if not isinstance(value, list)} == shown_metrics["finetuned"]
    assert [shown_metrics["finetuned"]["test_accuracy_ci95_low"],
            shown_metrics["finetuned"]["test_accuracy_ci95_high"]] == \
        applied["finetuned"]["test_accuracy_ci95"]
    assert dvc(workspace, "status").stdout.strip() == "Data and pipelines are up to date."


def test_forced_repro_gives_the_same_hashes_and_metrics(workspace):
    """The session's first run and a `dvc repro --force` of every stage agree byte for byte on
    the manifests and features, and exactly on every metric (throughput aside)."""
    before_outs, before_metrics = locked_outs(workspace), read_metrics(workspace)

    result = dvc(workspace, "repro", "--force")

    # every stage, the audit among them (it reads only the data and crossval's folds)
    everything = UPSTREAM + FROM_TRAIN_HEAD[:2] + ["audit"] + FROM_TRAIN_HEAD[2:]
    assert stages_run(result.stdout) == everything, result.stdout
    after_outs, after_metrics = locked_outs(workspace), read_metrics(workspace)
    for stage in ("split", "extract"):
        # The data outputs; the stage's figures are compared below, less their timings.
        data = [path for path in before_outs[stage]
                if not path.startswith(("metrics/", "reports/details/"))]
        assert data, stage
        assert {p: after_outs[stage][p] for p in data} == {p: before_outs[stage][p] for p in data}
    for metrics in (before_metrics, after_metrics):
        metrics["reports/details/extract.json"].pop("images_per_second")  # timings
        metrics["reports/details/finetune.json"].pop("train_images_per_second")
        for path in ("metrics/export.json", "reports/details/export.json"):
            for entry in metrics[path].values():
                entry.pop("latency_ms")
    assert after_metrics == before_metrics
