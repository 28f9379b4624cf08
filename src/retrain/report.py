"""CI metric diff report: what changed against a base revision, and whether it is allowed to.

`dvc metrics diff` shows the numbers but never fails on them (treeverse/dvc#10408), so a pull
request that makes the model worse would pass CI. This command adds the missing gate: each
entry of `report.gates` in params.yaml names a metric, the direction that is better and an
absolute tolerance, and the command exits 1 when a gated metric gets worse by more than that.
The Markdown it writes is meant for a pull-request comment (`cml comment create`).

Exit status: 0 pass, 1 regression, 2 usage error (bad params, unknown revision, dvc failure).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from retrain.atomic import write_text
from retrain.errors import UserError, exits_cleanly
from retrain.params import load_params
from retrain.urls import redact

EXIT_PASS = 0
EXIT_REGRESSION = 1

# A change of exactly the tolerance passes; float noise (0.9 - 0.89 = 0.010000000000000009)
# must not turn it into a failure.
SLACK = 1e-9


class ReportError(UserError):
    """The report could not be made; exit 2 so CI tells it apart from a regression (1)."""

    exit_code = 2


@dataclass(frozen=True)
class GateResult:
    """One gate checked against one metrics file."""

    metric: str
    path: str
    direction: str
    tolerance: float
    old: float | None
    new: float | None

    @property
    def change(self) -> float | None:
        if self.old is None or self.new is None:
            return None
        return self.new - self.old

    @property
    def status(self) -> str:
        """`pass`, `regression`, `new` (no base value) or `missing` (no value now).

        A metric that vanished from the workspace fails: the gate can no longer be checked,
        which is exactly what a broken evaluate stage looks like. One that is new passes,
        since the pull request that introduces a metric has nothing to compare with.
        """
        if self.new is None or math.isnan(self.new):
            return "missing"
        if self.old is None:
            return "new"
        worse = -self.change if self.direction == "higher" else self.change
        return "regression" if worse > self.tolerance + SLACK else "pass"

    @property
    def passed(self) -> bool:
        return self.status in ("pass", "new")


@dataclass(frozen=True)
class Report:
    markdown: str
    verdict: str
    passed: bool


# --- dvc -----------------------------------------------------------------------------------


class _Dvc:
    """One `dvc ARGS --json` run in repo_dir, started now and read later.

    The report needs three dvc commands of about a second each, mostly interpreter start-up;
    they only read the repository, so they run side by side. dvc runs under this interpreter
    so the report sees the dvc installed next to it, not whichever is first on PATH.
    """

    def __init__(self, args: list[str], repo_dir: str | Path):
        self.name = "dvc " + " ".join(args)
        cmd = [sys.executable, "-m", "dvc", *args, "--json"]
        try:
            self.proc = subprocess.Popen(
                cmd, cwd=repo_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        except OSError as exc:
            raise ReportError(f"could not run dvc in {repo_dir}: {exc.strerror}") from None

    def result(self) -> tuple[dict[str, Any], str]:
        """The parsed JSON output and dvc's stderr; a failure becomes a ReportError."""
        stdout, stderr = self.proc.communicate()
        if self.proc.returncode != 0:
            raise ReportError(f"{self.name}: {_last_line(stderr)}")
        try:
            return json.loads(stdout or "{}"), stderr
        except json.JSONDecodeError:
            raise ReportError(f"{self.name}: output is not JSON") from None

    def stop(self) -> None:
        """Reap the process; one still running after another failed is no longer needed."""
        if self.proc.returncode is None:
            self.proc.kill()
            self.proc.communicate()


def _last_line(stderr: str) -> str:
    """dvc ends its error output with a support link; the message is the ERROR line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    line = (errors or lines or ["failed without a message"])[-1]
    return line.removeprefix("ERROR:").strip()


def _load_warnings(stderr: str) -> list[str]:
    """dvc reports an unreadable metrics file on stderr and carries on with a null value."""
    return [line.strip() for line in stderr.splitlines() if "failed to load" in line]


# --- gates ---------------------------------------------------------------------------------


def _number(value: Any, metric: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReportError(f"gated metric {metric}: expected a number, got {value!r}")
    return float(value)


def _matches(metrics: dict[str, dict], metric: str) -> list[tuple[str, dict]]:
    """Entries for `key` in every metrics file that has it, or for `file:key` in that file."""
    path, sep, key = metric.rpartition(":")
    if sep:
        entry = metrics.get(path, {}).get(key)
        return [(path, entry)] if entry else []
    return [(path, keys[metric]) for path, keys in metrics.items() if metric in keys]


def check_gates(metrics: dict[str, dict], gates: list[dict], base: str) -> list[GateResult]:
    """Evaluate each gate against `dvc metrics diff --all --json` output."""
    results = []
    for gate in gates:
        name = gate["metric"]
        found = [
            (path, entry)
            for path, entry in _matches(metrics, name)
            if entry.get("old") is not None or entry.get("new") is not None
        ]
        if not found:
            raise ReportError(f"gated metric {name}: found neither in {base} nor in the workspace")
        for path, entry in found:
            results.append(
                GateResult(
                    metric=name,
                    path=path,
                    direction=gate["direction"],
                    tolerance=float(gate["tolerance"]),
                    old=_number(entry.get("old"), name),
                    new=_number(entry.get("new"), name),
                )
            )
    return results


# --- figures -------------------------------------------------------------------------------


def _under(path: str, folder: str) -> bool:
    folder = folder.rstrip("/")
    return path.rstrip("/") == folder or path.startswith(folder + "/")


def _dvc_changed(diff: dict[str, Any], repo_dir: Path, figures_dir: str) -> set[str]:
    """Changed DVC-tracked files under figures_dir.

    `dvc diff` lists files inside a tracked folder only when the base's folder listing is in
    the local cache; on a fresh CI checkout it names just the folder, so then every figure in
    it counts as changed.
    """
    entries = [e["path"] for kind in ("added", "modified") for e in diff.get(kind, [])]
    entries += [e["path"]["new"] for e in diff.get("renamed", [])]
    entries = [p for p in entries if _under(p, figures_dir)]
    files = {p for p in entries if not p.endswith("/")}
    for folder in (p for p in entries if p.endswith("/")):
        if not any(_under(f, folder) for f in files):
            files |= {p.relative_to(repo_dir).as_posix() for p in (repo_dir / folder).rglob("*")}
    return files


def _git_changed(base: str, repo_dir: Path, figures_dir: str) -> set[str]:
    """Changed git-tracked and new untracked files under figures_dir (`cache: false` plots)."""
    commands = [
        ["git", "diff", "--name-only", base, "--", figures_dir],
        ["git", "ls-files", "--others", "--exclude-standard", "--", figures_dir],
    ]
    files: set[str] = set()
    for cmd in commands:
        done = subprocess.run(cmd, cwd=repo_dir, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ReportError(f"{' '.join(cmd[:2])}: {_last_line(done.stderr)}")
        files |= {line for line in done.stdout.splitlines() if line}
    return files


def changed_figures(
    base: str, repo_dir: str | Path, figures_dir: str, dvc_diff: dict[str, Any] | None = None
) -> list[str]:
    """PNG paths (relative to repo_dir) under figures_dir that differ from `base`.

    dvc_diff is `dvc diff --json base` output when the caller already has it.
    """
    repo_dir = Path(repo_dir)
    figures_dir = PurePosixPath(figures_dir).as_posix()
    if dvc_diff is None:
        dvc_diff = _Dvc(["diff", base], repo_dir).result()[0]
    files = _dvc_changed(dvc_diff, repo_dir, figures_dir)
    files |= _git_changed(base, repo_dir, figures_dir)
    return sorted(p for p in files if p.lower().endswith(".png") and (repo_dir / p).is_file())


# --- markdown ------------------------------------------------------------------------------


def _fmt(value: Any, sign: bool = False) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:+.4g}" if sign else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool) and sign:
        return f"{value:+d}"
    return str(value)


def _cell(value: Any, sign: bool = False) -> str:
    return _fmt(value, sign).replace("|", "\\|").replace("\n", " ")


def _change(old: Any, new: Any) -> Any:
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (old, new))
    return new - old if numbers else None


def _table(header: list[str], rows: list[list[str]], empty: str) -> list[str]:
    if not rows:
        return [empty]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _verdict(results: list[GateResult]) -> str:
    failed = [r for r in results if not r.passed]
    if not failed:
        checked = f"{len(results)} checked"
        return f"✅ **pass**: no gated metric got worse beyond its tolerance ({checked})"
    parts = []
    for r in failed:
        where = f"`{r.metric}` ({r.path})"
        if r.status == "missing":
            parts.append(f"{where} is missing in the workspace (was {_fmt(r.old)})")
        else:
            parts.append(
                f"{where} {_fmt(r.old)} → {_fmt(r.new)} ({_fmt(r.change, sign=True)}, "
                f"tolerance {_fmt(r.tolerance)}, {r.direction} is better)"
            )
    return "❌ **regression**: " + "; ".join(parts)


def _params_section(params: dict[str, dict]) -> list[str]:
    rows = [
        [f"`{path}`", f"`{key}`",
         _cell(_shown(key, e.get("old"))), _cell(_shown(key, e.get("new")))]
        for path, keys in sorted(params.items())
        for key, e in sorted(keys.items())
    ]
    return ["## Params changed", ""] + _table(
        ["file", "param", "old", "new"], rows, "No params changed."
    )


def _shown(key: str, value):
    """A param as the report prints it: a URL's password and query values hidden."""
    return redact(value, value) if key == "data.url" and isinstance(value, str) else value


def _metrics_section(metrics: dict[str, dict]) -> list[str]:
    rows = [
        [
            f"`{path}`",
            f"`{key}`",
            _cell(e.get("old")),
            _cell(e.get("new")),
            _cell(_change(e.get("old"), e.get("new")), sign=True),
        ]
        for path, keys in sorted(metrics.items())
        for key, e in sorted(keys.items())
        if e.get("old") != e.get("new")
    ]
    return ["## Metrics changed", ""] + _table(
        ["file", "metric", "old", "new", "change"], rows, "No metrics changed."
    )


def _gates_section(results: list[GateResult]) -> list[str]:
    rows = [
        [
            f"`{r.metric}`",
            f"`{r.path}`",
            f"{r.direction} is better",
            _cell(r.tolerance),
            _cell(r.old),
            _cell(r.new),
            _cell(r.change, sign=True),
            {"pass": "✅", "new": "✅ new", "regression": "❌", "missing": "❌ missing"}[r.status],
        ]
        for r in results
    ]
    header = ["metric", "file", "direction", "tolerance", "old", "new", "change", "result"]
    return ["## Gates", ""] + _table(header, rows, "No gates configured.")


def _figures_section(figures: list[str], link_prefix: str) -> list[str]:
    """Changed figures, folded: a run renders a dozen of them, too many to show unasked."""
    lines = ["## Changed figures", ""]
    if not figures:
        return lines + ["No figures changed."]
    lines += ["<details>", f"<summary>{len(figures)} changed</summary>", ""]
    for path in figures:
        link = quote(PurePosixPath(link_prefix, path).as_posix())
        lines += [f"### `{path}`", "", f"![{PurePosixPath(path).name}]({link})", ""]
    return lines + ["</details>"]


def _figures_or_why_not(
    run: _Dvc, base: str, repo_dir: str | Path, figures_dir: str, link_prefix: str
) -> list[str]:
    """The figures section, or why it is missing.

    The figures only illustrate the report: failing to list them must not hide the verdict.
    """
    try:
        figures = changed_figures(base, repo_dir, figures_dir, run.result()[0])
    except ReportError as exc:
        return ["## Changed figures", "", f"Could not list changed figures: {exc}"]
    return _figures_section(figures, link_prefix)


def compose_report(
    base: str,
    gates: list[dict],
    repo_dir: str | Path = ".",
    figures_dir: str = "reports/figures",
    link_prefix: str = ".",
) -> Report:
    """Collect the diffs, check the gates and lay out the Markdown.

    link_prefix is the path from where the Markdown will live to repo_dir, so that the image
    links resolve for `cml comment create`, which uploads the local images it finds.
    """
    runs = [
        _Dvc(["metrics", "diff", "--all", base], repo_dir),
        _Dvc(["params", "diff", base], repo_dir),
        _Dvc(["diff", base], repo_dir),
    ]
    try:
        (metrics, stderr), (params, _) = runs[0].result(), runs[1].result()
        results = check_gates(metrics, gates, base)
        figure_lines = _figures_or_why_not(runs[2], base, repo_dir, figures_dir, link_prefix)
    finally:
        for run in runs:
            run.stop()
    verdict = _verdict(results)
    notes = [f"> {warning}" for warning in _load_warnings(stderr)]
    sections = [
        [f"# Metrics report: workspace vs `{base}`", "", verdict],
        notes,
        _params_section(params),
        _metrics_section(metrics),
        _gates_section(results),
        figure_lines,
    ]
    markdown = "\n\n".join("\n".join(s) for s in sections if s) + "\n"
    return Report(markdown, verdict, all(r.passed for r in results))


def build_report(
    base: str, gates: list[dict], repo_dir: str | Path = ".", figures_dir: str = "reports/figures"
) -> tuple[str, bool]:
    """The report's Markdown and whether every gate passed."""
    report = compose_report(base, gates, repo_dir, figures_dir)
    return report.markdown, report.passed


# --- command line --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="retrain report",
        description="Markdown diff of params, metrics and figures against a base revision; "
        "exits 1 when a gated metric (params.yaml report.gates) regresses beyond tolerance.",
    )
    parser.add_argument("--base", default="main", help="git revision to compare with")
    parser.add_argument("--out", help="write the Markdown here (default: print it)")
    parser.add_argument("--params", default="params.yaml", help="params file with report.gates")
    parser.add_argument("--figures", default="reports/figures", help="folder of figures")
    return parser.parse_args(argv)


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gates = load_params(args.params, check_model=False)["report"]["gates"]
    link_prefix = "."
    if args.out:
        out_dir = Path(args.out).resolve().parent
        link_prefix = Path(os.path.relpath(Path.cwd(), out_dir)).as_posix()
    report = compose_report(args.base, gates, ".", args.figures, link_prefix)
    if args.out:
        write_text(args.out, report.markdown)
        print(report.verdict)
    else:
        print(report.markdown, end="")
    return EXIT_PASS if report.passed else EXIT_REGRESSION


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
