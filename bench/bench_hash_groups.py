"""`split.group_near_duplicates`: grouping difference hashes at most k bits apart, the
pigeonhole search (`retrain.manifests.hamming_pairs`) against a brute-force Hamming radius
search (scikit-learn's radius neighbours over every pair, what `split` used before), side
by side on the same hashes, with the load average before and after.

    .venv/bin/python bench/bench_hash_groups.py [--rows 3670 11000 36700] [--bits 4]

Hashes are uniform 64-bit values, one in three a near copy of the one before it (up to
k + 2 bits flipped, so some pairs fall just outside the radius and chains form). Prints
CPU seconds per side, their ratio, and whether both found the same groups.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import load_average  # noqa: E402

from retrain.manifests import near_duplicate_keys  # noqa: E402


def generated_hashes(rows: int, bits: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    hashes = [int(v) for v in rng.integers(0, 2**64, rows, dtype=np.uint64)]
    for i in range(1, rows, 3):
        flipped = rng.choice(64, size=int(rng.integers(0, bits + 3)), replace=False)
        hashes[i] = hashes[i - 1] ^ int(sum(1 << int(bit) for bit in flipped))
    return hashes


def brute_force_components(hashes: list[int], bits: int) -> np.ndarray:
    """The earlier search: every pair compared (scikit-learn, Hamming radius)."""
    from scipy.sparse.csgraph import connected_components
    from sklearn.neighbors import NearestNeighbors

    words = np.array(hashes, dtype=">u8").view(np.uint8).reshape(-1, 8)
    unpacked = np.unpackbits(words, axis=1).astype(bool)
    graph = NearestNeighbors(radius=(bits + 0.5) / 64, metric="hamming").fit(unpacked) \
        .radius_neighbors_graph(mode="connectivity")
    return connected_components(graph, directed=False)[1]


def same_groups(labels: np.ndarray, keys: list[str]) -> bool:
    first_label, first_key = {}, {}
    return all(first_label.setdefault(label, key) == key and first_key.setdefault(key, label)
               == label for label, key in zip(labels.tolist(), keys, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[3670, 11000, 36700])
    parser.add_argument("--bits", type=int, default=4)
    args = parser.parse_args()
    print(f"load average before: {load_average()}")
    print("| hashes | brute force CPU s | pigeonhole CPU s | ratio | same groups |")
    print("|---|---|---|---|---|")
    for rows in args.rows:
        hashes = generated_hashes(rows, args.bits)
        start = time.process_time()
        labels = brute_force_components(hashes, args.bits)
        brute = time.process_time() - start
        rows_in = [{"sha256": f"{i:064x}", "dhash": h} for i, h in enumerate(hashes)]
        start = time.process_time()
        keys = near_duplicate_keys(rows_in, args.bits)
        ours = time.process_time() - start
        same = same_groups(labels, [keys[f"{i:064x}"] for i in range(rows)])
        print(f"| {rows:,} | {brute:.2f} | {ours:.2f} | {brute / max(ours, 1e-9):.0f}x | "
              f"{'yes' if same else 'NO'} |", flush=True)
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
