"""Run every benchmark and write bench/results.md: the machine, the date, every figure.
Sections of an existing results file that these benchmarks do not write (those of the
benchmarks run on their own) are kept, after the ones written.

    python bench/run_all.py            # full sizes (tens of minutes on 2 CPU cores)
    python bench/run_all.py --quick    # small sizes, a smoke run of every benchmark

Each benchmark runs in its own process (a fresh TensorFlow, as a user's command would), on
generated data with random weights; both sides of each comparison run back to back on the
same data. A benchmark that fails is reported as such and the others still run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import bench_export
import bench_extraction
import bench_finetune
import bench_memory
import bench_pipeline
import bench_whole
from common import PYTHON, bench_env, load_average, machine, parse_args, verdict

HERE = Path(__file__).resolve().parent
BENCHMARKS = [("extraction", bench_extraction), ("memory", bench_memory),
              ("pipeline", bench_pipeline), ("export", bench_export),
              ("finetune", bench_finetune), ("whole", bench_whole)]

READING = """\
## Reading these numbers

- The machine is a 2-vCPU VM that other jobs (test suites, DVC pipelines) may share: see the
  load averages. Comparisons run both sides back to back, interleaved where they repeat, and
  report medians; the CPU-ms-per-image column of the extraction table does not depend on
  how busy the cores were. Sharing moves the ratios: an earlier full run on busy cores (load
  average ~3.5; each side got ~0.75 of a core) gave ours/predict 2.08x, ours/in-memory 1.01,
  head-only 27.4x (14.4 s against 393 s), no-op repro 2.68 s and peak RSS 1.05x. On idle
  cores Keras and the notebook way spread over both cores well, so the ratios are lower.
- Extraction vs `model.predict` (goal 3x) is limited by arithmetic, not by the pipeline:
  MobileNetV2 at 224 is 299.5 M multiply-adds per image; LiteRT/XNNPACK does it in about
  8.2 CPU-ms (~73 GFLOP/s on one core, close to this core's float32 FMA peak), TensorFlow
  2.21 (oneDNN, AVX-512) in about 17-20 CPU-ms. In float32 (required: features within 1e-4
  of Keras) that caps the ratio near 2-2.5x here; only reduced precision would go further.
- Extraction vs the in-memory compute limit (goal 0.85) is limited by JPEG decoding sharing
  the same two cores: when the engine already keeps both cores busy, decode + resize
  (about 2 CPU-ms per image with Pillow: 0.9 ms decode, 1.0 ms bilinear resize 320 -> 224)
  cannot be hidden, so the ceiling is compute / (compute + decode) ~ 8.9 / (8.9 + 2.0) ~ 0.8.
  py-spy over `extract_to_file`: 45% of samples in `Interpreter.invoke`, 49% in the decoder
  threads (`load_image`), the rest in batching and waiting.
- The head-only experiment is bounded by process start-up rather than training: importing
  TensorFlow + Keras costs about 5 CPU-seconds (`python -X importtime`: keras' sklearn
  wrapper alone pulls in sklearn, 1.7 s); the whole train_head stage takes about 11 s, of
  which training 5 epochs on cached features is about 1 s; DVC adds about 1.5 s (what
  `dvc status` costs) plus the experiment's git bookkeeping. py-spy over train_head: 75% of
  samples in imports (`import keras` -> TensorFlow, sklearn), 10% in `fit`. So the ratio
  is set by how fast the notebook way runs: about 20x on idle cores, 27x on busy ones.
"""


def run_benchmark(name: str, module, args) -> tuple[dict | None, str]:
    out = args.workdir / f"{name}.json"
    out.unlink(missing_ok=True)
    cmd = [PYTHON, str(HERE / f"bench_{name}.py"), "--workdir", str(args.workdir),
           "--json", str(out)] + (["--quick"] if args.quick else [])
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, env=bench_env(args.workdir), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    (args.workdir / f"{name}.log").write_text(done.stdout)
    print(f"   {name}: exit {done.returncode} after {time.perf_counter() - start:.0f} s "
          f"(log: {args.workdir / f'{name}.log'})", flush=True)
    if done.returncode != 0 or not out.exists():
        tail = "\n".join(done.stdout.strip().splitlines()[-15:])
        return None, (f"## {name}\n\nFailed (exit {done.returncode}); last lines:\n\n"
                      f"```\n{tail}\n```\n")
    results = json.loads(out.read_text())
    return results, module.markdown(results)


def sections_of(text: str) -> list[str]:
    """A Markdown file cut at its `## ` headings (each piece keeps its `###` subsections)."""
    pieces, current = [], []
    for line in text.splitlines(keepends=True):
        if line.startswith("## ") and current:
            pieces.append("".join(current))
            current = []
        current.append(line)
    if current:
        pieces.append("".join(current))
    return [piece for piece in pieces if piece.startswith("## ")]


def heading(section: str) -> str:
    return section.splitlines()[0].strip()


# Sections run_all writes afresh every time; every other `## ` section of an existing
# results file (the benchmarks run on their own: audit, recipe gates, scale, ...) is kept.
OWN_HEADINGS = ("## Goals", "## Reading these numbers")


def kept_sections(old_text: str, new_sections: list[str]) -> list[str]:
    """The existing file's sections that this run does not write, in their order: what
    other benchmark scripts recorded there is not lost when run_all rewrites the file."""
    written = {heading(section) for section in new_sections} | set(OWN_HEADINGS)
    return [section.rstrip("\n") + "\n" for section in sections_of(old_text)
            if heading(section) not in written]


def goals_table(results: dict) -> str:
    ext, mem, pipe = (results.get(k) for k in ("extraction", "memory", "pipeline"))

    def row(label, value, goal, ok):
        # `part and part["goal"]` is the empty part itself when that benchmark did not run
        ok = ok if isinstance(ok, bool) else None
        return f"| {label} | {value} | {goal} | {verdict(ok)} |"

    rows = [
        row("extraction vs Keras `model.predict`",
            f"{ext['ratio_vs_predict']:.2f}x" if ext else "-", ">= 3x",
            ext and ext["goal_vs_predict"]),
        row("extraction vs compute limit (in-memory tensors)",
            f"{ext['ratio_vs_memory']:.2f}" if ext else "-", ">= 0.85",
            ext and ext["goal_vs_memory"]),
        row("head-only experiment vs notebook way",
            f"{pipe['ratio']:.1f}x faster" if pipe else "-", ">= 20x",
            pipe and pipe["goal_ratio"]),
        row("no-op `dvc repro`",
            f"{pipe['noop_repro']['median']:.2f} s" if pipe else "-", "<= 3 s",
            pipe and pipe["goal_noop"]),
        row("extract peak RSS, 10x the images",
            (f"{mem['ratio']:.2f}x, max "
             f"{max(r['peak_rss_bytes'] for r in mem['runs']) / 2**20:.0f} MiB")
            if mem else "-", "<= 1.2x and < 2 GiB", mem and mem["goal"]),
    ]
    rows += [row(*goal) for goal in bench_finetune.goals(results.get("finetune") or {})]
    rows += [row(*goal) for goal in bench_whole.goals(results.get("whole") or {})]
    return "\n".join(["| goal | result | target | |", "|---|---|---|---|", *rows]) + "\n"


def main(argv=None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv, lambda p: p.add_argument(
        "--out", type=Path, default=HERE / "results.md", help="Markdown file to write"))
    start = time.perf_counter()
    info = machine()
    load_before = load_average()
    results, sections = {}, []
    for name, module in BENCHMARKS:
        result, section = run_benchmark(name, module, args)
        if result is not None:
            results[name] = result
        sections.append(section)
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    header = [
        "# Benchmarks" + (" (quick run: small sizes)" if args.quick else ""),
        "",
        "Written by `python bench/run_all.py" + (" --quick" if args.quick else "") + "` on "
        f"{info['date']}, in {(time.perf_counter() - start) / 60:.0f} min.",
        "",
        f"- CPU: {info['cpu']} ({info['cpu_flags']}), {info['cores']} cores; "
        f"RAM {info['ram_gib']} GiB; GPU: {info['gpu']}",
        f"- {info['os']}, Python {info['python']}",
        f"- {versions}",
        f"- Load average (1/5/15 min) before: {load_before}; after: {load_average()}",
        "",
        "## Goals",
        "",
        goals_table(results),
    ]
    kept = kept_sections(args.out.read_text() if args.out.exists() else "", sections)
    text = "\n".join(header) + "\n" + "\n".join(sections + kept) + "\n" + READING
    tmp = args.out.with_name(f".tmp-{args.out.name}")
    tmp.write_text(text)
    tmp.replace(args.out)
    print(text)
    print(f"wrote {args.out}")
    return 0 if len(results) == len(BENCHMARKS) else 1


if __name__ == "__main__":
    sys.exit(main())
