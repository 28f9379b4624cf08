"""The CI report: a regression in a gated metric fails the job, anything else passes.

Each test works on a copy of one throwaway git + DVC repository whose base commit holds
known metrics; the test then edits the workspace (as a pull request would) and runs the report
against the base commit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from retrain.report import ReportError, build_report, main

ROOT = Path(__file__).resolve().parents[1]

DVC_YAML = """\
stages:
  evaluate:
    cmd: python -c "pass"
    params:
      - head.epochs
    metrics:
      - metrics/evaluate.json:
          cache: false
    outs:
      - reports/figures
"""

BASE_METRICS = {
    "head": {"test_accuracy": 0.80, "test_loss": 0.50, "macro_f1": 0.78},
    "finetuned": {"test_accuracy": 0.90, "test_loss": 0.30, "macro_f1": 0.88},
}

ACCURACY = "finetuned.test_accuracy"

# dvc would otherwise start a background process per command to send usage statistics.
QUIET_ENV = {**os.environ, "DVC_NO_ANALYTICS": "1"}


def _run(cmd: list[str], cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True, env=QUIET_ENV)


def _dvc(*args: str, cwd: Path) -> None:
    _run([sys.executable, "-m", "dvc", *args], cwd)


def write_metrics(repo: Path, **finetuned: float | None) -> None:
    """Base metrics with the given `finetuned` values replaced (None removes the key)."""
    metrics = json.loads(json.dumps(BASE_METRICS))
    for key, value in finetuned.items():
        if value is None:
            metrics["finetuned"].pop(key)
        else:
            metrics["finetuned"][key] = value
    (repo / "metrics" / "evaluate.json").write_text(json.dumps(metrics))


@pytest.fixture(scope="module")
def base_repo(tmp_path_factory) -> Path:
    """A repo whose only commit, tagged `base`, has accuracy 0.90 and two figures."""
    repo = tmp_path_factory.mktemp("base") / "repo"
    repo.mkdir()
    _run(["git", "init", "-q", "-b", "main"], repo)
    _run(["git", "config", "user.email", "ci@example.com"], repo)
    _run(["git", "config", "user.name", "CI"], repo)
    _dvc("init", "-q", cwd=repo)
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "metrics").mkdir()
    write_metrics(repo)
    figures = repo / "reports" / "figures"
    figures.mkdir(parents=True)
    (figures / "confusion.png").write_bytes(b"png-confusion-v1")
    (figures / "curves.png").write_bytes(b"png-curves-v1")
    _dvc("commit", "-f", "-q", cwd=repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-q", "-m", "base"], repo)
    _run(["git", "tag", "base"], repo)
    return repo


@pytest.fixture
def repo(base_repo, tmp_path, monkeypatch) -> Path:
    """A private copy of the base repo, made the working directory."""
    copy = tmp_path / "repo"
    shutil.copytree(base_repo, copy, symlinks=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    return copy


def gate(metric: str, direction: str = "higher", tolerance: float = 0.01) -> dict:
    return {"metric": metric, "direction": direction, "tolerance": tolerance}


def test_regression_exits_1_and_names_the_metric(repo, capsys):
    write_metrics(repo, test_accuracy=0.85)

    assert main(["--base", "base"]) == 1

    out = capsys.readouterr().out
    verdict = next(line for line in out.splitlines() if line.startswith("❌"))
    assert ACCURACY in verdict
    assert "0.9 → 0.85" in verdict
    assert "-0.05" in verdict
    assert "macro_f1" not in verdict


def test_improvement_exits_0(repo, capsys):
    write_metrics(repo, test_accuracy=0.95, macro_f1=0.93)

    assert main(["--base", "base"]) == 0

    out = capsys.readouterr().out
    assert "✅" in out and "❌" not in out
    # Changed metrics are tabulated with old, new and change.
    assert f"| `metrics/evaluate.json` | `{ACCURACY}` | 0.9 | 0.95 | +0.05 |" in out


def test_a_drop_of_exactly_the_tolerance_passes(repo):
    # 0.9 - 0.89 is 0.010000000000000009 in floating point: still within 0.01.
    write_metrics(repo, test_accuracy=0.89)

    markdown, passed = build_report("base", [gate(ACCURACY, tolerance=0.01)])

    assert passed, markdown


# A higher-is-better gate would judge both of these the other way round.
@pytest.mark.parametrize(("loss", "passed"), [(0.20, True), (0.40, False)])
def test_lower_is_better_gate(repo, loss, passed):
    write_metrics(repo, test_loss=loss)

    markdown, ok = build_report("base", [gate("finetuned.test_loss", "lower", 0.05)])

    assert ok is passed
    assert ("❌" in markdown.splitlines()[2]) is not passed


def test_fully_qualified_metric_name(repo):
    write_metrics(repo, test_accuracy=0.5)

    markdown, passed = build_report("base", [gate(f"metrics/evaluate.json:{ACCURACY}")])

    assert not passed
    assert f"metrics/evaluate.json:{ACCURACY}" in markdown


def test_unknown_base_is_a_one_line_error(repo, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--base", "no-such-rev"])

    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "no-such-rev" in err


def test_gated_metric_missing_in_both_revisions_is_an_error(repo):
    with pytest.raises(ReportError, match="finetuned.no_such_metric"):
        build_report("base", [gate("finetuned.no_such_metric")])


def test_gated_metric_missing_in_the_workspace_fails(repo):
    write_metrics(repo, test_accuracy=None)

    markdown, passed = build_report("base", [gate(ACCURACY)])

    assert not passed
    assert f"`{ACCURACY}` (metrics/evaluate.json) is missing in the workspace" in markdown


def test_gated_metric_new_in_the_workspace_passes(repo):
    write_metrics(repo, top5_accuracy=0.99)

    markdown, passed = build_report("base", [gate("finetuned.top5_accuracy")])

    assert passed
    assert "✅ new" in markdown


def test_out_file_params_and_changed_figures(repo, capsys):
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("epochs: 5", "epochs: 7", 1))
    write_metrics(repo, test_accuracy=0.91)
    figures = repo / "reports" / "figures"
    (figures / "confusion.png").write_bytes(b"png-confusion-v2")
    (figures / "new samples.png").write_bytes(b"png-samples")

    assert main(["--base", "base", "--out", "out/report.md"]) == 0

    printed = capsys.readouterr().out
    assert printed.startswith("✅") and printed.count("\n") == 1
    markdown = (repo / "out" / "report.md").read_text()
    assert "| `params.yaml` | `head.epochs` | 5 | 7 |" in markdown
    # Links are relative to the report so that `cml comment create` finds the images.
    assert "![confusion.png](../reports/figures/confusion.png)" in markdown
    assert "![new samples.png](../reports/figures/new%20samples.png)" in markdown
    assert "curves.png" not in markdown
    assert not [p for p in (repo / "out").iterdir() if p.name.startswith(".tmp-")]


def test_cli_exit_status_in_a_subprocess(repo):
    """What CI sees: the process's exit status, not a return value."""
    write_metrics(repo, test_accuracy=0.80)
    code = "import sys; from retrain.report import main; sys.exit(main(sys.argv[1:]))"
    env = {**QUIET_ENV, "PYTHONPATH": str(ROOT / "src")}

    done = subprocess.run(
        [sys.executable, "-c", code, "--base", "base", "--out", "report.md"],
        cwd=repo,
        capture_output=True,
        text=True,
        env=env,
    )

    assert done.returncode == 1, done.stderr
    assert ACCURACY in done.stdout
    assert (repo / "report.md").is_file()
