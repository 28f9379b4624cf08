"""Experiments on the small profile: what a param change re-runs, queued sweeps that reuse the
cached features and fill the run-cache, and a misspelled `-S` key. (That a re-run of every
stage reproduces the same hashes and metrics is checked in test_interruption, after the
re-runs it interrupts.)

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
from conftest import (
    FROM_TRAIN_HEAD,
    UPSTREAM,
    dvc,
    locked_outs,
    read_metrics,
    set_param,
    stages_run,
)

from retrain.report import CROSSVAL_DETAILS

pytestmark = pytest.mark.slow

# The compact `dvc exp show` of the README's Experiments section: the swept params and the
# headline metrics.
SHOW_KEEP = (r"^(Experiment|Created|State)$|^head\.(dropout|learning_rate)$"
             r"|^metrics/models/finetuned\.json:(accuracy|macro_f1)$")
FINETUNED = "metrics/models/finetuned.json"


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
    # An export param re-runs export alone (and card, which reads what export writes).
    count = params["export"]["representative_images"]
    set_param(workspace, "export.representative_images", count + 4)
    assert stages_changed(workspace) == {"export"}
    set_param(workspace, "export.representative_images", count)
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
    """Wait until no experiment is queued or running: attached to a running one's log
    (`dvc queue logs --follow` returns when it ends), polling `dvc queue status` (a second or
    two of dvc each time, beside the experiment) only while none has started."""
    from retrain.workspace import pipeline_env

    deadline = time.monotonic() + timeout
    while True:
        states = queue_states(workspace)
        if not {"Queued", "Running"} & set(states.values()):
            return states
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"queue still busy after {timeout:.0f} s: {states}")
        running = [name for name, state in states.items() if state == "Running"]
        if running:  # returns at once while the run has no log yet, or is being collected
            try:
                subprocess.run([sys.executable, "-m", "dvc", "queue", "logs", "--follow",
                                running[0]], cwd=workspace, env=pipeline_env(workspace),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               timeout=left)
            except subprocess.TimeoutExpired:
                continue  # the deadline check above reports the states
        time.sleep(1)


def start_queue(workspace: Path) -> None:
    """`dvc queue start`, its output in a file: the worker it leaves running inherits the
    command's stdout, and a captured pipe would then stay open (and `dvc` blocked) for as long
    as that worker lingers after the queue is done."""
    from retrain.workspace import pipeline_env

    with open(workspace.parent / "queue-start.log", "w") as log:
        subprocess.run([sys.executable, "-m", "dvc", "queue", "start"], cwd=workspace,
                       env=pipeline_env(workspace), stdout=log, stderr=subprocess.STDOUT,
                       stdin=subprocess.DEVNULL, check=True)


def test_queued_sweep_reruns_from_train_head_and_fills_the_run_cache(workspace):
    """A queued sweep over a head param queues one experiment per point; one of them run
    re-runs train_head and everything after it, reusing the features; afterwards a plain
    `dvc repro` at its params, or back at the committed ones, runs nothing: the run-cache
    restores every stage's outputs. (The second point is dequeued: it would check the same
    things again at the cost of a second run.) The same run also shows what two fine-tuning
    replicates add (`check_two_replicates`) and how `report` gates an export figure that
    the new model changed (`check_int8_gate`)."""
    # A gate on an export figure beside the default ones, committed: report checks it too.
    gates = yaml.safe_load((workspace / "params.yaml").read_text())["report"]["gates"]
    set_param(workspace, "report.gates", [*gates, INT8_GATE])
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit",
                    "-qam", "gate int8.agreement"], cwd=workspace, check=True)
    baseline, metrics_before = locked_outs(workspace), read_metrics(workspace)
    base_crossval = json.loads((workspace / CROSSVAL_DETAILS).read_text())
    base_predictions = (workspace / "reports" / "predictions.csv").read_text()
    committed_params = (workspace / "params.yaml").read_text()
    committed_dropout = yaml.safe_load(committed_params)["head"]["dropout"]
    queued = dvc(workspace, "exp", "run", "--queue", "-n", "sweep", "-S", "head.dropout=0.2,0.5",
                 "-S", "finetune.replicates=2")
    for name in ("sweep-1", "sweep-2"):
        assert f"Queued experiment '{name}'" in queued.stdout, queued.stdout
    dvc(workspace, "queue", "remove", "sweep-2")
    name = "sweep-1"

    start_queue(workspace)
    try:
        states = wait_for_queue(workspace, timeout=900)
    finally:
        dvc(workspace, "queue", "stop", "--kill", check=False)  # no worker outlives the test
    log = dvc(workspace, "queue", "logs", name).stdout
    assert states.get(name) == "Success" and "sweep-2" not in states, f"{states}\n{log}"

    # Feature extraction ran once, for the baseline: the experiment reused its outputs.
    assert stages_run(log) == FROM_TRAIN_HEAD, log
    for stage in UPSTREAM:
        assert f"Stage '{stage}' didn't change, skipping" in log, log
    assert "2 fine-tuning replicates" in log, log

    shown = json.loads(dvc(workspace, "exp", "show", "--json").stdout)
    experiments = {exp["name"]: exp["revs"][0]["data"]
                   for row in shown for exp in (row.get("experiments") or [])}
    assert sorted(experiments) == [name]
    data = experiments[name]
    assert data["params"]["params.yaml"]["data"]["head"]["dropout"] == 0.2
    finetuned = data["metrics"][FINETUNED]["data"]
    assert 0.0 <= finetuned["accuracy"] <= 1.0
    assert data["deps"]["data/features"]["hash"] == baseline["extract"]["data/features"]

    # The documented compact table keeps exactly the chosen columns.
    table = dvc(workspace, "exp", "show", "--csv", "--drop", ".*", "--keep", SHOW_KEEP).stdout
    header, *rows = table.splitlines()
    assert header.split(",") == ["Experiment", "Created", "State", f"{FINETUNED}:accuracy",
                                 f"{FINETUNED}:macro_f1", "head.dropout",
                                 "head.learning_rate"]
    assert name in {row.split(",")[0] for row in rows}

    diff = json.loads(dvc(workspace, "exp", "diff", "HEAD", name, "--json").stdout)
    assert diff["params"]["params.yaml"]["head.dropout"] == {
        "old": committed_dropout, "new": 0.2, "diff": pytest.approx(0.2 - committed_dropout)}

    dvc(workspace, "exp", "apply", name)
    assert yaml.safe_load((workspace / "params.yaml").read_text())["head"]["dropout"] == 0.2
    applied = json.loads((workspace / FINETUNED).read_text())
    assert applied == finetuned
    details = json.loads((workspace / "reports/details/evaluate.json").read_text())
    assert [applied["ci95_low"], applied["ci95_high"]] == \
        details["finetuned"]["test_accuracy_ci95"]
    assert dvc(workspace, "status").stdout.strip() == "Data and pipelines are up to date."
    report = subprocess.run([sys.executable, "-m", "retrain", "report", "--base", "HEAD"],
                            cwd=workspace, capture_output=True, text=True)
    assert report.returncode in (0, 1), report.stderr
    check_two_replicates(workspace, base_predictions, report.stdout)
    check_int8_gate(metrics_before[INT8], workspace, report.stdout)
    check_data_gates(base_crossval, workspace, report.stdout)

    # Back at the committed params, then at the experiment's, by hand: nothing runs, the
    # run-cache has every stage's outputs for both (the experiment's from the queued run,
    # which ran in a workspace of its own).
    experiment_params = (workspace / "params.yaml").read_text()
    for params in (committed_params, experiment_params):
        (workspace / "params.yaml").write_text(params)
        result = dvc(workspace, "repro")
        assert stages_run(result.stdout) == [], result.stdout
        for stage in FROM_TRAIN_HEAD:
            assert f"Stage '{stage}' is cached - skipping run, checking out outputs" \
                in result.stdout, result.stdout
        if params == committed_params:
            assert locked_outs(workspace) == baseline
            assert read_metrics(workspace) == metrics_before


INT8 = "metrics/export/int8.json"
INT8_GATE = {"metric": f"{INT8}:agreement", "direction": "higher", "tolerance": 0.05}


def check_int8_gate(base_export: dict, workspace: Path, report: str) -> None:
    """The report's row of INT8_GATE: the base's and the workspace's agreement (another
    head and fine-tuned model, converted again), failed exactly when it dropped by more
    than the tolerance."""
    from retrain.report import RESULT_MARKS

    after = json.loads((workspace / INT8).read_text())
    assert after["size_mb"] > 0 and set(after) == set(base_export)
    rows = [line for line in report.splitlines()
            if line.startswith(f"| `{INT8_GATE['metric']}` | `{INT8}`")]
    assert len(rows) == 1, report
    worse = base_export["agreement"] - after["agreement"]
    expected = "regression" if worse > INT8_GATE["tolerance"] + 1e-9 else "pass"
    assert rows[0].rstrip(" |").endswith(RESULT_MARKS[expected]), rows[0]


def check_data_gates(base_crossval: dict, workspace: Path, report: str) -> None:
    """The default crossval and label agreement gates on a head param change: crossval
    re-ran, and its gate shows the corrected t-test over both revisions' per-fold scores
    (read from the details files, the base's from the DVC cache); the audit did not re-run,
    so its gate pairs identical tables and passes."""
    from retrain.report import RESULT_MARKS, _interval
    from retrain.uncertainty import corrected_resampled_ttest

    new = json.loads((workspace / CROSSVAL_DETAILS).read_text())
    folds = corrected_resampled_ttest(base_crossval["per_fold"]["val_accuracy"],
                                      new["per_fold"]["val_accuracy"], new["folds"], 0.95)
    [crossval] = [line for line in report.splitlines()
                  if line.startswith("| `metrics/crossval.json:accuracy`")]
    assert f" {_interval(folds.interval)} |" in crossval, (crossval, folds)
    [agreement] = [line for line in report.splitlines()
                   if line.startswith("| `metrics/audit/label_issues.json:agreement`")]
    assert "| 1 (0 vs 0) |" in agreement and agreement.rstrip(" |").endswith(
        RESULT_MARKS["pass"]), agreement


def check_two_replicates(workspace: Path, base_predictions: str, report: str) -> None:
    """A workspace at an experiment with `finetune.replicates: 2` over a one-replicate
    commit: finetune wrote the second replicate's weights beside model.keras (replicate 0),
    evaluate shows the spread in the headline and a column per further replicate, and
    `report` (its output given) shows the spread and its recipe gate weighs them."""
    from test_recipe_gates import gate_on

    from retrain.report import _read_predictions

    folder = workspace / "models" / "replicates"
    replicates = json.loads((folder / "replicates.json").read_text())
    assert [r["replicate"] for r in replicates] == [0, 1]
    assert replicates[0]["weights"] == "models/model.keras" and replicates[0]["seed"] != \
        replicates[1]["seed"]
    assert (folder / replicates[1]["weights"]).is_file()

    headline = json.loads((workspace / FINETUNED).read_text())
    spread = json.loads((workspace / "reports/details/evaluate.json").read_text())[
        "finetuned"]["replicates"]
    assert spread["count"] == 2 and headline["sd"] == spread["test_accuracy_sd"] >= 0
    new_predictions = (workspace / "reports" / "predictions.csv").read_text()
    assert "predicted_replicate_1" in new_predictions.splitlines()[0]

    assert f"| `{FINETUNED}` | `sd` | — |" in report, report
    # What the gate weighs, read from both tables as report reads them: the recipe test
    # over one base replicate and two new ones.
    base, new = (_read_predictions(text, "predictions.csv")
                 for text in (base_predictions, new_predictions))
    recipe = gate_on(base, new).evidence.recipe
    assert (recipe.base_replicates, recipe.new_replicates) == (1, 2)
    assert recipe.training_noise_measured
