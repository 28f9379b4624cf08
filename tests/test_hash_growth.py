"""`split.method: hash` when the data grows: a property over random class sizes (tiny classes
among big ones) and random additions. What may change, and why nothing more can be promised,
is argued in `retrain.manifests.top_up`."""
import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retrain import manifests
from retrain.errors import ParamsError

SPLITS = ("train", "val", "test")


def digest(label: str, index: int) -> str:
    return hashlib.sha256(f"{label}/{index}".encode()).hexdigest()


# Per class: images in the earlier version, then images added. Tiny classes (1-4 images, the
# ones the top-up has to fill) sit beside big ones; a class under 3 images cannot be split, so
# it enters a version only once it has 3.
tiny = st.integers(1, 4)
class_growth = st.tuples(st.one_of(tiny, st.integers(5, 40)), st.integers(0, 6))
growth = st.fixed_dictionaries({
    "classes": st.lists(class_growth, min_size=1, max_size=8),
    "val_fraction": st.sampled_from([0.1, 0.2, 0.3]),
    "test_fraction": st.sampled_from([0.1, 0.2, 0.3, 0.5]),
    "seed": st.integers(0, 2**16),
})


def version(sizes: dict[str, int]) -> list[dict]:
    return [{"sha256": digest(label, i), "label": label}
            for label, n in sizes.items() if n >= manifests.MIN_IMAGES_TO_SPLIT
            for i in range(n)]


def split_hash(rows, case) -> tuple[dict, dict]:
    """(final split, split the image's own score gives) per sha256."""
    args = case["val_fraction"], case["test_fraction"], case["seed"]
    final, _ = manifests.assign_splits(rows, *args, method="hash")
    groups = sorted({(row["sha256"], row["label"]) for row in rows})
    return final, manifests.hash_split(groups, *args)


@settings(max_examples=150, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(growth)
def test_adding_images_moves_only_topped_up_ones_and_keeps_test(case):
    # Two big classes so every split can hold one image of each class (else a params error).
    before = {"big_a": 60, "big_b": 60}
    before.update({f"class_{i}": n for i, (n, _) in enumerate(case["classes"])})
    after = {**before, **{f"class_{i}": n + extra
                          for i, (n, extra) in enumerate(case["classes"])}}
    try:
        old, old_own = split_hash(version(before), case)
        new, new_own = split_hash(version(after), case)
    except ParamsError:  # more classes than a split at these fractions can hold
        return
    moved_old = {d for d in old if old[d] != old_own[d]}
    moved_new = {d for d in new if new[d] != new_own[d]}
    for d in old:
        # (a) Only an image the top-up moves, in either version, changes split.
        if new[d] != old[d]:
            assert d in moved_old | moved_new, (d, old[d], new[d])
        # (b) An earlier test image stays in test, unless only the earlier top-up had put it
        # there (it returns to its own split once the class has test images of its own).
        if old[d] == "test" and d not in moved_old:
            assert new[d] == "test", (d, new[d])
    # (c) Every class in every split.
    for label, n in after.items():
        if n >= manifests.MIN_IMAGES_TO_SPLIT:
            held = {new[digest(label, i)] for i in range(n)}
            assert held == set(SPLITS), (label, n, held)


@pytest.mark.parametrize("seed", range(3))
def test_a_class_all_drawn_for_test_gives_its_lowest_scoring_images(seed):
    # The only case where test gives: nothing in val or train to give from.
    rows = version({"big_a": 60, "big_b": 60})
    small = [{"sha256": d, "label": "small"} for d in
             sorted((digest("small", i) for i in range(400)),
                    key=lambda d: manifests.split_score(d, seed))]
    own_test = [row for row in small if 0.2 <= manifests.split_score(row["sha256"], seed) < 0.6]
    final, notes = manifests.assign_splits(rows + own_test[:4], 0.2, 0.5, seed, method="hash")
    assert [final[row["sha256"]] for row in own_test[:4]] == ["train", "val", "test", "test"]
    assert len([note for note in notes if "'small'" in note]) == 2
