"""The CI report: a regression in a gated metric fails the job, anything else passes.

Most tests work on a copy of one throwaway git + DVC repository whose base commit holds known
metrics: they edit the workspace (as a pull request would) and run the report against the base
commit. The gate arithmetic is also tested on its own, on dvc's JSON, without dvc.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from retrain import uncertainty
from retrain.report import (
    Evidence,
    ReportError,
    _verdict,
    add_evidence,
    build_report,
    changed_figures,
    check_gates,
    compose_report,
    load_test_sets,
    main,
)

ROOT = Path(__file__).resolve().parents[1]

DVC_YAML = """\
stages:
  evaluate:
    cmd: python -c "pass"
    params:
      - head.epochs
    metrics:
      - metrics/models:
          cache: false
    outs:
      - reports/figures
  crossval:
    cmd: python -c "pass"
    metrics:
      - metrics/crossval.json:
          cache: false
  audit:
    cmd: python -c "pass"
    metrics:
      - metrics/audit:
          cache: false
  export:
    cmd: python -c "pass"
    metrics:
      - metrics/export:
          cache: false
"""

# evaluate's headline rows (retrain.headline), one file per model.
BASE_METRICS = {
    "head": {"accuracy": 0.80, "macro_f1": 0.78},
    "finetuned": {"accuracy": 0.90, "macro_f1": 0.88},
}
FINETUNED = "metrics/models/finetuned.json"
ACCURACY = f"{FINETUNED}:accuracy"
MACRO_F1 = f"{FINETUNED}:macro_f1"


@pytest.fixture(scope="module")
def dvc_env(tmp_path_factory) -> dict[str, str]:
    """No usage statistics (a background process per dvc command), and dvc's per-repo
    site cache kept with the throwaway repos instead of in /var/tmp/dvc."""
    site = tmp_path_factory.mktemp("dvc-site-cache")
    return {"DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(site)}


def _run(cmd: list[str], cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)


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
    (repo / "metrics" / "models").mkdir(parents=True, exist_ok=True)
    for model, row in metrics.items():
        (repo / "metrics" / "models" / f"{model}.json").write_text(json.dumps(row))


def write_latency(repo: Path, latency_ms: float) -> None:
    """export's headline row of one format."""
    (repo / "metrics" / "export").mkdir(parents=True, exist_ok=True)
    (repo / "metrics" / "export" / "int8.json").write_text(
        json.dumps({"agreement": 0.99, "size_mb": 0.7, "latency_ms": latency_ms}))


@pytest.fixture(scope="module")
def base_repo(tmp_path_factory, dvc_env) -> Path:
    """A repo whose only commit, tagged `base`, has accuracy 0.90 and two figures."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in dvc_env.items():
            patch.setenv(name, value)
        return _make_base_repo(tmp_path_factory.mktemp("base") / "repo")


def _make_base_repo(repo: Path) -> Path:
    repo.mkdir()
    _run(["git", "init", "-q", "-b", "main"], repo)
    _run(["git", "config", "user.email", "ci@example.com"], repo)
    _run(["git", "config", "user.name", "CI"], repo)
    _dvc("init", "-q", cwd=repo)
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    (repo / "dvc.yaml").write_text(DVC_YAML)
    write_metrics(repo)
    # What the default crossval and audit gates read (the stages' headlines; no per-fold
    # details or audit tables here: those gates fall back to their tolerance).
    (repo / "metrics" / "crossval.json").write_text(json.dumps({"accuracy": 0.7, "sd": 0.05}))
    (repo / "metrics" / "audit").mkdir()
    (repo / "metrics" / "audit" / "label_issues.json").write_text(
        json.dumps({"images": 3, "agreement": 0.8}))
    write_latency(repo, 1.0)
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
def repo(base_repo, dvc_env, tmp_path, monkeypatch) -> Path:
    """A private copy of the base repo, made the working directory."""
    copy = tmp_path / "repo"
    shutil.copytree(base_repo, copy, symlinks=True)
    monkeypatch.chdir(copy)
    for name, value in dvc_env.items():
        monkeypatch.setenv(name, value)
    return copy


def gate(metric: str, direction: str = "higher", tolerance: float = 0.01) -> dict:
    return {"metric": metric, "direction": direction, "tolerance": tolerance}


def test_regression_exits_1_and_names_the_metric(repo, capsys):
    write_metrics(repo, accuracy=0.85)

    assert main(["--base", "base"]) == 1

    out = capsys.readouterr().out
    verdict = next(line for line in out.splitlines() if line.startswith("❌"))
    assert ACCURACY in verdict
    assert "0.9 → 0.85" in verdict
    assert "-0.05" in verdict
    assert "macro_f1" not in verdict


def test_improvement_exits_0(repo, capsys):
    write_metrics(repo, accuracy=0.95, macro_f1=0.93)

    assert main(["--base", "base"]) == 0

    out = capsys.readouterr().out
    assert "✅" in out and "❌" not in out
    # Changed metrics are tabulated with old, new and change.
    assert f"| `{FINETUNED}` | `accuracy` | 0.9 | 0.95 | +0.05 |" in out


def test_a_drop_of_exactly_the_tolerance_passes(repo):
    # 0.9 - 0.89 is 0.010000000000000009 in floating point: still within 0.01.
    write_metrics(repo, accuracy=0.89)

    markdown, passed = build_report("base", [gate(ACCURACY, tolerance=0.01)])

    assert passed, markdown


def test_lower_is_better_gate_fails_when_the_value_rises(repo):
    write_latency(repo, 1.1)
    latency = "metrics/export/int8.json:latency_ms"

    markdown, passed = build_report("base", [gate(latency, "lower", 0.05)])

    assert not passed
    assert f"`{latency}`" in markdown.splitlines()[2]


def test_gated_metric_missing_in_the_workspace_is_reported_and_fails(repo):
    write_metrics(repo, accuracy=None)

    markdown, passed = build_report("base", [gate(ACCURACY)])

    assert not passed
    assert f"`{ACCURACY}` ({FINETUNED}) is missing in the workspace" in markdown


def test_unknown_base_is_a_one_line_error(repo, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--base", "no-such-rev"])

    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "no-such-rev" in err


def test_out_file_params_and_changed_figures(repo, capsys):
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("epochs: 5", "epochs: 7", 1))
    write_metrics(repo, accuracy=0.91)
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



def test_report_hides_a_url_password_and_needs_no_weights_file(repo):
    # The report is posted on pull requests; it reads only the gates from params.yaml, so a
    # model.weights file that exists on the training machine alone does not stop it.
    params = repo / "params.yaml"
    text = params.read_text()
    url = yaml.safe_load(text)["data"]["url"]
    secret_url = url.replace("://", "://alice:s3cret@", 1) + "?token=t0ken"
    text = text.replace(url, secret_url).replace("weights: imagenet", "weights: /no/such.h5")
    params.write_text(text)
    assert main(["--base", "base", "--out", "report.md"]) == 0
    markdown = (repo / "report.md").read_text()
    assert "`data.url`" in markdown and "alice:***@" in markdown and "token=***" in markdown
    assert "s3cret" not in markdown and "t0ken" not in markdown



def test_out_naming_a_folder_is_refused_and_the_folder_kept(repo, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--base", "base", "--out", "reports"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == "error: reports: is a folder; name a file to write"
    assert (repo / "reports" / "figures" / "confusion.png").is_file()


def test_figures_of_a_folder_dvc_cannot_list_all_count_as_changed(repo):
    # On a fresh CI checkout the base's folder listing is not in the cache: `dvc diff`
    # then names only the folder.
    diff = {"added": [], "modified": [{"path": "reports/figures/"}], "renamed": []}

    figures = changed_figures("base", repo, "reports/figures", dvc_diff=diff)

    assert figures == ["reports/figures/confusion.png", "reports/figures/curves.png"]


def test_cli_exit_status_in_a_subprocess(repo):
    """What CI sees: the process's exit status, not a return value."""
    write_metrics(repo, accuracy=0.80)
    code = "import sys; from retrain.report import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

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


# --- gate logic on `dvc metrics diff --all --json` output, without dvc ----------------------


def diff_of(old: float | None, new: float | None, key: str = "accuracy") -> dict:
    return {FINETUNED: {key: {"old": old, "new": new}}}


@pytest.mark.parametrize(
    ("direction", "old", "new", "status"),
    [
        ("higher", 0.90, 0.95, "pass"),
        ("higher", 0.90, 0.89, "pass"),  # exactly the tolerance
        ("higher", 0.90, 0.8899, "regression"),
        ("lower", 0.30, 0.20, "pass"),  # a higher-is-better gate would fail this ...
        ("lower", 0.30, 0.31, "pass"),
        ("lower", 0.30, 0.3101, "regression"),  # ... and pass this
        ("higher", None, 0.90, "new"),
        ("higher", 0.90, None, "missing"),
        ("higher", 0.90, float("nan"), "missing"),
    ],
)
def test_gate_status(direction, old, new, status):
    [result] = check_gates(diff_of(old, new), [gate(ACCURACY, direction, 0.01)], "base")

    assert result.status == status
    assert result.passed is (status in ("pass", "new"))


def test_a_change_that_does_nothing_fails_a_005_accuracy_gate_at_most_1_time_in_40():
    """McNemar's test is two-sided and only the worse side fails (README: Reading a gate
    verdict): two equally good, correlated models on 300 shared test images."""
    rng = np.random.default_rng(0)
    runs, failed = 2000, 0
    for _ in range(runs):
        base = rng.random(300) < 0.85
        new = np.where(rng.random(300) < 0.8, base, rng.random(300) < 0.85)
        evidence = Evidence(None, None, mcnemar=uncertainty.mcnemar_exact(base, new))
        failed += evidence.drop_is_real(0.05, "higher")
    assert 0 < failed / runs <= 0.025


def test_a_significance_on_a_metric_without_a_paired_test_says_the_tolerance_decided():
    metric = "metrics/export/int8.json:agreement"
    diff = {"metrics/export/int8.json": {"agreement": {"old": 1.0, "new": 0.9}}}
    results = check_gates(diff, [{**gate(metric), "significance": 0.05}], "base")

    results, test_sets = add_evidence(results, "base", ".")  # export: no predictions

    assert test_sets == {} and [r.status for r in results] == ["regression"]
    assert "no paired test for this metric: tolerance only" in _verdict(results)


def test_gate_matches_a_key_in_every_metrics_file_or_one_file_by_name():
    metrics = {**diff_of(0.9, 0.5), "metrics/other.json": {"accuracy": {"old": 0.9, "new": 0.9}}}

    everywhere = check_gates(metrics, [gate("accuracy")], "base")
    one_file = check_gates(metrics, [gate("metrics/other.json:accuracy")], "base")

    assert [(r.path, r.passed) for r in everywhere] == [
        (FINETUNED, False),
        ("metrics/other.json", True),
    ]
    assert [(r.path, r.passed) for r in one_file] == [("metrics/other.json", True)]


def test_gated_metric_missing_in_both_revisions_is_an_error():
    with pytest.raises(ReportError, match="finetuned.no_such_metric"):
        check_gates(diff_of(0.9, 0.9), [gate("finetuned.no_such_metric")], "base")


def test_a_gate_on_a_stage_off_on_both_sides_is_not_checked_and_says_so():
    """`crossval.folds: 0` writes `{"enabled": false}`: with crossval off at the base too,
    the default crossval gate passes unchecked, and the verdict names it."""
    crossval = {"enabled": {"old": False, "new": False}}
    metrics = {**diff_of(0.9, 0.9), "metrics/crossval.json": crossval}
    named = "metrics/crossval.json:accuracy"

    results = check_gates(metrics, [gate(ACCURACY), gate(named)], "base")

    assert [r.status for r in results] == ["pass", "off"] and all(r.passed for r in results)
    assert _verdict(results) == ("✅ **pass**: no gated metric got worse beyond its tolerance "
                                 f"(1 checked); not checked, their stage is off "
                                 f"(`enabled: false`): `{named}`")


def test_a_pull_request_that_turns_a_gated_stage_off_fails():
    """Otherwise a pull request could switch off the check it would fail."""
    crossval = {"enabled": {"old": None, "new": False},
                "accuracy": {"old": 0.7, "new": None}}
    metrics = {**diff_of(0.9, 0.9), "metrics/crossval.json": crossval}
    named = "metrics/crossval.json:accuracy"

    results = check_gates(metrics, [gate(ACCURACY), gate(named)], "base")

    assert [r.status for r in results] == ["pass", "turned off"]
    assert _verdict(results) == (f"❌ **regression**: `{named}` (metrics/crossval.json) not "
                                 "checked: this revision turned its stage off "
                                 "(`enabled: false`; was 0.7)")


def test_a_gate_that_does_not_name_its_file_is_an_error_when_missing():
    crossval = {"enabled": {"old": False, "new": False}}
    metrics = {**diff_of(0.9, 0.9), "metrics/crossval.json": crossval}
    # A gate that does not name the file cannot tell an off stage from a typo.
    with pytest.raises(ReportError, match="no_such_mean"):
        check_gates(metrics, [gate("no_such_mean")], "base")


def test_gated_metric_that_is_not_a_number_is_an_error():
    with pytest.raises(ReportError, match=ACCURACY):
        check_gates(diff_of(0.9, "high"), [gate(ACCURACY)], "base")


# --- pairing test images by content ------------------------------------------------------

CLASSES = ["cats", "dogs"]
TEST_PATHS = [f"{CLASSES[i % 2]}/{i:02d}.jpg" for i in range(10)]
TEST_DIGESTS = [f"{i:064x}" for i in range(10)]


def predictions_csv(repo: Path, paths, digests, with_sha256: bool = True) -> None:
    """reports/predictions.csv as evaluate writes it, for a model right on every image."""
    from retrain.evaluate import predictions_table

    labels = np.array([CLASSES.index(path.split("/")[0]) for path in paths])
    table = predictions_table(list(paths), list(digests), np.eye(2)[labels], labels, CLASSES)
    if not with_sha256:   # as evaluate wrote it before it recorded each image's sha256
        table = table.drop(columns="sha256")
    (repo / "reports" / "predictions.csv").write_text(table.to_csv(index=False))


def base_predictions(repo: Path, with_sha256: bool = True) -> None:
    """Commit the base's predictions and move the `base` tag onto that commit."""
    predictions_csv(repo, TEST_PATHS, TEST_DIGESTS, with_sha256)
    _run(["git", "add", "reports/predictions.csv"], repo)
    _run(["git", "commit", "-q", "-m", "base predictions"], repo)
    _run(["git", "tag", "-f", "base"], repo)


PAIRED_GATE = [{**gate(ACCURACY), "significance": 0.05}]


def test_a_file_re_encoded_under_the_same_name_is_not_paired(repo):
    base_predictions(repo)
    digests = ["f" * 64, *TEST_DIGESTS[1:]]   # cats/00.jpg: other bytes, same name
    predictions_csv(repo, TEST_PATHS, digests)

    report = compose_report("base", PAIRED_GATE, repo)

    assert ("`finetuned`: **unpaired**, the test sets differ: 9 images paired by content "
            "(sha256) with the same label, 1 only at the base and 1 only in the workspace"
            ) in report.markdown
    assert "Paired by file name" not in report.markdown
    assert "| +0 | — | ✅ |" in report.markdown   # no paired interval, no McNemar test


def test_a_renamed_identical_file_is_paired(repo):
    base_predictions(repo)
    paths = ["cats/renamed.jpg", *TEST_PATHS[1:]]   # cats/00.jpg, same bytes, new name
    predictions_csv(repo, paths, TEST_DIGESTS)

    report = compose_report("base", PAIRED_GATE, repo)

    assert ("`finetuned`: both revisions predicted the same 10 test images "
            "(`reports/predictions.csv`), matched by content (sha256): changes are paired."
            ) in report.markdown
    assert "| +0 [0, 0] | 1 (0 vs 0) | ✅ |" in report.markdown   # a paired test ran


def test_identical_copies_pair_one_to_one_whatever_their_names(repo):
    digests = [TEST_DIGESTS[0], *TEST_DIGESTS[:-1]]   # two copies of one cat image
    predictions_csv(repo, TEST_PATHS, digests)
    _run(["git", "add", "reports/predictions.csv"], repo)
    _run(["git", "commit", "-q", "-m", "base predictions"], repo)
    _run(["git", "tag", "-f", "base"], repo)
    paths = ["cats/copy.jpg", *TEST_PATHS[1:]]
    predictions_csv(repo, paths, digests)

    sets = load_test_sets("finetuned", "base", repo)

    assert sets.paired and sets.shared == 10


def test_a_base_without_sha256_pairs_by_file_name_and_says_so(repo):
    base_predictions(repo, with_sha256=False)
    digests = ["f" * 64, *TEST_DIGESTS[1:]]
    predictions_csv(repo, TEST_PATHS, digests)

    report = compose_report("base", PAIRED_GATE, repo)

    assert ("both revisions predicted the same 10 test images (`reports/predictions.csv`), "
            "matched by file name: changes are paired.") in report.markdown
    assert ("Paired by file name: no sha256 column in `reports/predictions.csv` at `base` "
            "(written before evaluate recorded it), so a file replaced under the same name "
            "counts as the same image.") in report.markdown


# --- paired comparisons on the pipeline's own outputs ---------------------------------------
#
# A copy of the session's pipeline run. Its committed base is rewritten so that the fine-tuned
# model got every test file right (predictions CSV and metrics together, in evaluate's
# formats), then the workspace's predictions are edited as a pull request's run would change
# them. A perfect base makes every edit a known number of discordant files.

SIGNIFICANT_GATES = [dict(gate(ACCURACY), significance=0.05),
                     dict(gate(MACRO_F1), significance=0.05)]


def write_finetuned_predictions(ws: Path, paths, digests, actual, predicted) -> None:
    """reports/predictions.csv and the fine-tuned model's headline row, as the evaluate
    stage writes them, for a model that predicts `predicted` with certainty."""
    from retrain.evaluate import classification_metrics, predictions_table
    from retrain.headline import model_rows

    classes = (ws / "data" / "manifests" / "classes.txt").read_text().splitlines()
    index = {name: i for i, name in enumerate(classes)}
    labels = np.array([index[name] for name in actual])
    probabilities = np.eye(len(classes))[[index[name] for name in predicted]]
    table = predictions_table(list(paths), list(digests), probabilities, labels, classes)
    table.to_csv(ws / "reports" / "predictions.csv", index=False, lineterminator="\n")
    figures = {"finetuned": classification_metrics(probabilities, labels, classes)}
    (ws / FINETUNED).write_text(json.dumps(model_rows(figures)["finetuned"]))


def perfect_base(ws: Path) -> pd.DataFrame:
    """Commit, tagged `base`, a fine-tuned model right on every test file; its table."""
    table = pd.read_csv(ws / "reports" / "predictions.csv", dtype=str, keep_default_na=False)
    write_finetuned_predictions(ws, table["path"], table["sha256"], table["actual"],
                                table["actual"])
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    _run([*git, "commit", "-qam", "perfect base"], ws)
    _run(["git", "tag", "base"], ws)
    return pd.read_csv(ws / "reports" / "predictions.csv", dtype=str, keep_default_na=False)


def wrong_class(ws: Path, name: str) -> str:
    classes = (ws / "data" / "manifests" / "classes.txt").read_text().splitlines()
    return classes[(classes.index(name) + 1) % len(classes)]


def flip_to_wrong(ws: Path, table: pd.DataFrame, count: int) -> None:
    predicted = [wrong_class(ws, a) if i < count else a for i, a in enumerate(table["actual"])]
    write_finetuned_predictions(ws, table["path"], table["sha256"], table["actual"], predicted)


@pytest.mark.slow
def test_two_changed_test_files_pass_as_not_significant(workspace):
    base = perfect_base(workspace)
    flip_to_wrong(workspace, base, 2)

    report = compose_report("base", SIGNIFICANT_GATES, workspace, context="the small profile")

    assert report.passed, report.markdown
    drop = -2 / len(base)
    assert drop < -0.01   # beyond the tolerance: the tolerance alone would fail it
    assert "not significant" in report.verdict and ACCURACY in report.verdict
    assert f"same {len(base)} test images" in report.markdown
    assert "McNemar p = 0.5" in report.verdict   # 2 discordant files, both against: p = 0.5
    assert "| 0.5 (2 vs 0) | ✅ not significant |" in report.markdown
    assert "Compared on: the small profile" in report.markdown


@pytest.mark.slow
def test_many_files_flipped_to_wrong_fail_naming_metric_change_interval_and_p(workspace):
    base = perfect_base(workspace)
    flip_to_wrong(workspace, base, len(base))
    assert len(base) >= 6   # enough files for McNemar to reject at 0.05

    report = compose_report("base", SIGNIFICANT_GATES, workspace)

    assert not report.passed
    p = stats.binomtest(0, len(base), 0.5).pvalue
    verdict = report.verdict
    assert verdict.startswith("❌")
    assert f"`{ACCURACY}` ({FINETUNED}) 1 → 0 (-1, 95% paired interval [-1, -1], " \
           f"McNemar p = {p:.3g}; tolerance 0.01, significance 0.05" in verdict
    assert f"`{MACRO_F1}` ({FINETUNED}) 1 → 0 (-1, 95% paired interval" \
           in verdict


@pytest.mark.slow
def test_different_test_sets_are_reported_unpaired_and_judged_by_the_tolerance(workspace):
    base = perfect_base(workspace)
    kept = base.iloc[2:].copy()      # two files fewer, one renamed, one re-encoded
    kept.iloc[0, kept.columns.get_loc("path")] = "elsewhere/renamed.png"
    kept.iloc[1, kept.columns.get_loc("sha256")] = "0" * 64
    predicted = [wrong_class(workspace, a) for a in kept["actual"][:2]] + list(kept["actual"][2:])
    write_finetuned_predictions(workspace, kept["path"], kept["sha256"], kept["actual"],
                                predicted)

    report = compose_report("base", SIGNIFICANT_GATES, workspace)

    assert not report.passed   # two wrong of n - 2: worse than the tolerance allows
    shared = len(base) - 3   # the renamed file is the same image, the re-encoded one is not
    assert (f"**unpaired**, the test sets differ: {shared} images paired by content (sha256) "
            "with the same label, 3 only at the base and 1 only in the workspace"
            ) in report.markdown
    assert "test sets differ: tolerance only" in report.verdict
    row = next(line for line in report.markdown.splitlines() if f"`{ACCURACY}`" in line
               and line.startswith(f"| `{ACCURACY}`"))
    assert row.count("[") == 2 and "| — |" in row   # both intervals, no McNemar


# --- the audit's label agreement, paired by image (end to end: tests/test_audit.py) ---


def test_label_agreement_pairs_images_by_content_whatever_their_label():
    """A relabelled image is the same image (paired); a replaced one is another (not)."""
    from retrain.report import agreement_evidence

    def table(agrees, digests):
        return pd.DataFrame({"sha256": digests, "copy": 0, "label": "a", "agrees": agrees})

    digests = [f"{i:064x}" for i in range(10)]
    old = table([True] * 10, digests)
    new = table([False] * 3 + [True] * 7, digests[:9] + ["f" * 64])
    evidence = agreement_evidence(old, new, 0.95)
    assert (evidence.mcnemar.base_only, evidence.mcnemar.new_only) == (3, 0)
    assert evidence.over == ("over the 9 images both revisions audited: agreement lost by 3 "
                             "(0 relabelled), gained by 0 (0 relabelled)")
    assert evidence.added.images == 1  # the replaced image, tested on its own
    assert evidence.difference.difference == pytest.approx(-3 / 9)


def test_label_agreement_tests_the_images_only_the_workspace_holds():
    """Mislabelled images that come with new data lower the agreement without touching
    the images both revisions hold: a binomial test against the base's rate catches them,
    each test at half the significance."""
    from retrain.report import GateResult, agreement_evidence

    digests = [f"{i:064x}" for i in range(260)]
    old = pd.DataFrame({"sha256": digests[:200], "copy": 0, "label": "a",
                        "agrees": [True] * 160 + [False] * 40})
    new = pd.concat([old, pd.DataFrame({"sha256": digests[200:], "copy": 0, "label": "a",
                                        "agrees": [True] * 40 + [False] * 20})])
    evidence = agreement_evidence(old, new, 0.95)
    assert (evidence.added.images, evidence.added.agreeing) == (60, 40)
    assert evidence.added.pvalue == pytest.approx(
        stats.binomtest(40, 60, 0.8, alternative="less").pvalue)
    result = GateResult("metrics/audit/label_issues.json:agreement",
                        "metrics/audit/label_issues.json", "higher",
                        0.01, 0.8, float(new["agrees"].mean()), 0.05, evidence=evidence)
    assert result.status == ("regression" if evidence.added.pvalue < 0.025
                             else "not significant")
    assert "the 60 images only in the workspace: 40 agree (66.7% against the base's 80.0%)" \
        in _verdict([result])
    same = agreement_evidence(old, old, 0.95)
    assert same.added is None and "agreement lost by 0 (0 relabelled)" in same.over
