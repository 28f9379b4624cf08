"""bench/run_all.py rewrites bench/results.md without losing what other benchmarks recorded."""

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

from run_all import kept_sections, sections_of  # noqa: E402

OLD = """# Benchmarks

Written by `python bench/run_all.py` on an earlier day.

## Goals

| goal | result |

## Extraction throughput

old extraction figures

## Data audit on generated features

audit figures

### On the scale set's features

subsection figures

## Scale: 3,670 to 100,000 images

scale figures

## Reading these numbers

old reading
"""


def test_sections_keep_their_subsections():
    assert [s.splitlines()[0] for s in sections_of(OLD)] == [
        "## Goals", "## Extraction throughput", "## Data audit on generated features",
        "## Scale: 3,670 to 100,000 images", "## Reading these numbers"]
    assert "### On the scale set's features" in sections_of(OLD)[2]


def test_a_rewrite_keeps_the_sections_it_does_not_write_in_their_order():
    new = ["## Extraction throughput\n\nnew extraction figures\n"]
    kept = kept_sections(OLD, new)
    assert [s.splitlines()[0] for s in kept] == [
        "## Data audit on generated features", "## Scale: 3,670 to 100,000 images"]
    assert "subsection figures" in kept[0] and "old extraction figures" not in "".join(kept)
    assert kept_sections("", new) == []
