"""The data audit: planted label errors are flagged, planted re-encoded copies are grouped and
counted as leaks (and kept in one split on request), and the user's exclusion list and
relabelling reach `split` through DVC."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, dvc, set_param, stages_run
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from retrain.errors import DataError, ParamsError
from retrain.headline import AUDIT_ROWS

SPLIT = {"val_fraction": 0.25, "test_fraction": 0.34, "seed": 3}
PLANTED_MOVES = 4  # images of class_000 filed under class_001
PLANTED_COPIES = 8  # images given a re-encoded copy in their own class folder


# ---------------------------------------------------------------- planted data

def reencode(path: Path, dest: Path) -> None:
    """The same picture, other bytes: what a re-upload or a format conversion makes. (At
    lower JPEG qualities the noisy background of generated images flips several bits of
    the difference hash; photos hold more structure.)"""
    with Image.open(path) as img:
        img.convert("RGB").save(dest, format="JPEG", quality=95, subsampling=0)


def planted_tree(tmp_path: Path, per_class: int = 30, size: int = 64) -> dict:
    """raw/synthetic_photos/<4 classes>/ with PLANTED_MOVES images of class_000 moved into
    class_001 and PLANTED_COPIES re-encoded copies (`*_copy.jpg`) beside their originals."""
    from retrain.synthetic import write_dataset

    tarball = write_dataset(tmp_path / "set.tgz", classes=4, per_class=per_class, size=size,
                            seed=5)
    raw = tmp_path / "raw"
    with tarfile.open(tarball) as tar:
        tar.extractall(raw, filter="data")
    root = raw / "synthetic_photos"
    moved = []
    for source in sorted((root / "class_000").glob("*.jpg"))[:PLANTED_MOVES]:
        dest = root / "class_001" / f"moved_{source.name}"
        source.rename(dest)
        moved.append(dest.relative_to(raw).as_posix())
    copies = []
    originals = [sorted((root / f"class_{c:03d}").glob("class_*.jpg"))[-2:] for c in range(4)]
    for original in [p for pair in originals for p in pair][:PLANTED_COPIES]:
        copy = original.with_name(original.stem + "_copy.jpg")
        reencode(original, copy)
        copies.append((original.relative_to(raw).as_posix(), copy.relative_to(raw).as_posix()))
    return {"raw": raw, "moved": moved, "copies": copies}


def split_of(manifests) -> dict[str, str]:
    return {path: name for name, frame in manifests.splits.items() for path in frame["path"]}


# ---------------------------------------------------------------- label issues (features)

def clustered_inputs(moved: int, seed: int = 0):
    """5 classes of 60 feature rows around their own centre, in train/val/test; `moved` rows
    of class 0 given label 1. Returns (inputs, indices of the moved rows)."""
    from retrain.audit import AuditInputs

    rng = np.random.default_rng(seed)
    classes, per_class, size = 5, 60, 16
    truth = np.repeat(np.arange(classes), per_class)
    centres = rng.normal(size=(classes, size)) * 2
    features = np.maximum(centres[truth] + rng.normal(size=(len(truth), size)), 0)
    given = truth.copy()
    planted = np.flatnonzero(truth == 0)[:moved]
    given[planted] = 1
    split = rng.choice(["train", "val", "test"], size=len(truth), p=[0.6, 0.2, 0.2])
    names = [f"class_{c}" for c in range(classes)]
    table = pd.DataFrame({"path": [f"img_{i:04d}.jpg" for i in range(len(truth))],
                          "label": [names[c] for c in given], "label_index": given,
                          "sha256": [f"{i:064x}" for i in range(len(truth))], "split": split})
    return AuditInputs(table, features.astype(np.float32), names), planted


AUDIT_PARAMS = {"duplicate_similarity": 0.98, "outlier_fraction": 0.02,
                "outlier_neighbours": 10, "gallery_size": 8}


def test_planted_label_errors_are_flagged_and_few_clean_images_are():
    from retrain.audit import audit

    inputs, planted = clustered_inputs(moved=12)
    issues = audit(inputs, AUDIT_PARAMS, folds=5, seed=42)["label_issues"]
    flagged = set(issues.loc[issues["flagged"] == "yes", "path"])
    planted_paths = set(inputs.table["path"].iloc[planted])
    # Confident learning is conservative: a fifth of one class moved into another pulls
    # the classifier towards them, and it flags about two thirds.
    assert len(flagged & planted_paths) >= 0.6 * len(planted_paths), issues.head(20)
    assert len(flagged - planted_paths) <= 0.03 * (len(inputs.table) - len(planted)), \
        issues.head(20)
    # the ranking puts the planted rows first and suggests their true class
    top = set(issues.head(len(planted))["path"])
    assert len(top & planted_paths) >= 0.75 * len(planted_paths)
    assert (issues[issues["path"].isin(planted_paths)]["suggested_label"] == "class_0").mean() \
        >= 0.8


def test_no_row_is_scored_by_a_classifier_that_saw_it(monkeypatch):
    """Each fit sees none of the rows it scores, and test rows are never fitted on."""
    import retrain.audit as audit_module

    inputs, _ = clustered_inputs(moved=0)
    calls = []
    real = audit_module._predict

    def spy(features, labels, train, held, classes, seed):
        calls.append((set(train.tolist()), set(held.tolist())))
        return real(features, labels, train, held, classes, seed)

    monkeypatch.setattr(audit_module, "_predict", spy)
    audit_module.out_of_fold_probabilities(inputs, folds=4, seed=1)
    test_rows = set(np.flatnonzero(inputs.table["split"] == "test").tolist())
    assert len(calls) == 5  # 4 folds of train+val, then the test split
    assert all(not (train & held) and not (train & test_rows) for train, held in calls)
    assert set().union(*(held for _, held in calls)) == set(range(len(inputs.table)))


# ---------------------------------------------------------------- near-duplicates

def test_near_duplicates_are_grouped_and_a_group_across_train_and_test_is_a_leak():
    from retrain.audit import audit

    inputs, _ = clustered_inputs(moved=0)
    table, features = inputs.table, inputs.features
    # row 0 (copied into test) and row 1 (copied into val, as row 0's twin in its own split)
    twin = features[[0, 1]] * 1.01 + 0.001
    table = pd.concat([table, pd.DataFrame({
        "path": ["copy_0.jpg", "copy_1.jpg"], "label": table["label"].iloc[[0, 1]].tolist(),
        "label_index": table["label_index"].iloc[[0, 1]].tolist(),
        "sha256": ["e" * 64, "f" * 64], "split": ["test", table["split"].iloc[1]]})],
        ignore_index=True)
    table.loc[0, "split"] = "train"
    inputs = type(inputs)(table, np.concatenate([features, twin]), inputs.classes)
    # Distinct rows of these 16-dimensional clusters reach 0.98; the copies are above 0.9999.
    results = audit(inputs, {**AUDIT_PARAMS, "duplicate_similarity": 0.9999}, folds=5, seed=42)
    groups = results["near_duplicates"]
    members = groups.groupby("group")["path"].apply(set).tolist()
    assert {"img_0000.jpg", "copy_0.jpg"} in members
    assert {"img_0001.jpg", "copy_1.jpg"} in members
    metrics = results["metrics"]
    assert metrics["near_duplicate_groups"] == 2
    assert metrics["cross_split_groups"] == 1 and metrics["leaked_test_images"] == 1
    assert metrics["leak_free_test_images"] == (table["split"] == "test").sum() - 1


def wide_inputs(rows: int = 400, dims: int = 512, seed: int = 0):
    """Feature rows wider than the neighbour searches' projection: 4 non-negative clusters,
    so the projection keeps their structure and drops most of each row's own noise."""
    from retrain.audit import AuditInputs

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, dims))
    features = np.maximum(centres[rng.integers(0, 4, rows)] + rng.normal(size=(rows, dims)), 0)
    table = pd.DataFrame({"path": [f"img_{i:04d}.jpg" for i in range(rows)], "label": "a",
                          "label_index": 0, "sha256": [f"{i:064x}" for i in range(rows)],
                          "split": "train"})
    return AuditInputs(table, features.astype(np.float32), ["a"])


def with_twins(inputs, cosines: np.ndarray, seed: int = 1):
    """One twin per cosine: row i's unit features turned by that cosine towards a random
    direction (mostly outside the projection), so the twin sits exactly that far from it."""
    from sklearn.preprocessing import normalize

    rng = np.random.default_rng(seed)
    unit = normalize(inputs.features[: len(cosines)].astype(np.float64))
    away = rng.normal(size=unit.shape)
    away = normalize(away - (away * unit).sum(axis=1, keepdims=True) * unit)
    twins = cosines[:, None] * unit + np.sqrt(1 - cosines[:, None] ** 2) * away
    extra = pd.DataFrame({"path": [f"twin_{i:04d}.jpg" for i in range(len(cosines))],
                          "label": "a", "label_index": 0,
                          "sha256": ["e" * 60 + f"{i:04d}" for i in range(len(cosines))],
                          "split": "test"})
    return type(inputs)(pd.concat([inputs.table, extra], ignore_index=True),
                        np.concatenate([inputs.features, twins.astype(np.float32)]),
                        inputs.classes)


def test_near_duplicates_on_the_projection_are_those_of_the_full_features():
    """Twins just above and just below the threshold, apart mostly in directions the
    projection drops: exactly the pairs whose full features reach the threshold are grouped,
    as a search on the full features finds them."""
    from scipy.sparse.csgraph import connected_components
    from sklearn.metrics.pairwise import cosine_similarity

    from retrain.audit import NEIGHBOUR_DIMENSIONS, near_duplicate_groups, neighbour_space

    cosines = np.linspace(0.97, 0.99, 20)  # around the threshold 0.98, none on it
    inputs = with_twins(wide_inputs(), cosines)
    space = neighbour_space(inputs.features, exact_rows=0)
    assert space.reduced.shape[1] == NEIGHBOUR_DIMENSIONS + 1 < 512  # + the dropped length
    groups = near_duplicate_groups(inputs, 0.98, space)

    exact = cosine_similarity(inputs.features.astype(np.float64)) >= 0.98
    np.fill_diagonal(exact, False)
    _, component = connected_components(exact, directed=False)
    expected = inputs.table.assign(component=component).groupby("component")["path"].apply(set)
    assert sorted(map(sorted, expected[expected.map(len) > 1])) == sorted(
        map(sorted, groups.groupby("group")["path"].apply(set)))
    twins_grouped = {f"twin_{i:04d}.jpg" for i in np.flatnonzero(cosines >= 0.98)}
    assert twins_grouped and twins_grouped <= set(groups["path"])
    assert not set(groups["path"]) & {f"twin_{i:04d}.jpg" for i in
                                        np.flatnonzero(cosines < 0.98)}


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), rows=st.integers(30, 300))
def test_reduced_rows_bound_every_cosine_from_above(seed, rows):
    """The search's premise: on the projection with its dropped length, every pair's dot
    product is at least its cosine on the full features, so no duplicate pair can be missed;
    each reduced row has unit length; and where the projection keeps all of every row the
    bound is the cosine itself."""
    from retrain.audit import neighbour_space

    def bound_and_cosine(features):
        space = neighbour_space(features.astype(np.float32), seed, exact_rows=0)
        return (space.reduced.astype(np.float64) @ space.reduced.T.astype(np.float64),
                space.unit.astype(np.float64) @ space.unit.T.astype(np.float64))

    rng = np.random.default_rng(seed)
    # ReLU features whose variance is spread over far more dimensions than the projection keeps
    bound, cosine = bound_and_cosine(
        np.maximum(rng.normal(size=(rows, 400)) + rng.normal(size=(1, 400)), 0))
    assert (bound >= cosine - 1e-5).all()
    assert np.allclose(np.diag(bound), 1.0, atol=1e-5)  # projection and dropped length: unit
    # Rank 20: the projection's directions span every row, nothing is dropped
    bound, cosine = bound_and_cosine(rng.normal(size=(rows, 20)) @ rng.normal(size=(20, 400)))
    np.testing.assert_allclose(bound, cosine, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(2, 60), chains=st.integers(0, 6), block_rows=st.integers(1, 70),
       confirm_batch=st.integers(1, 3), projected_dimensions=st.sampled_from([None, 3, 8]),
       seed=st.integers(0, 2**16))
def test_blockwise_duplicate_search_finds_the_components_of_all_pairs(
        rows, chains, block_rows, confirm_batch, projected_dimensions, seed):
    """Whatever the block size, the candidates confirmed a few at a time, on the unit rows
    or on a projection far narrower than the rows' span, the components are those of the
    graph of every pair above the threshold (chains of near-copies reaching across blocks
    included)."""
    from unittest import mock

    from scipy.sparse.csgraph import connected_components
    from sklearn.preprocessing import normalize

    from retrain import audit
    from retrain.audit import NeighbourSpace, near_duplicate_components, neighbour_space

    rng = np.random.default_rng(seed)
    unit = rng.normal(size=(rows, 16))
    for _ in range(chains):  # a row pulled close to another, anywhere in the table
        a, b = rng.integers(0, rows, 2)
        unit[a] = unit[b] + rng.normal(scale=0.1, size=16)
    unit = normalize(unit).astype(np.float32)
    cosines = unit.astype(np.float64) @ unit.T.astype(np.float64)
    assume(not (np.abs(cosines - 0.98) < 1e-5).any())  # no pair on the threshold's rounding
    if projected_dimensions is None:
        space = NeighbourSpace(unit, unit)
    else:
        with mock.patch.object(audit, "NEIGHBOUR_DIMENSIONS", projected_dimensions):
            space = neighbour_space(unit, seed, exact_rows=0)
        assert space.reduced.shape[1] == min(projected_dimensions, rows) + 1
    with mock.patch.object(audit, "CONFIRM_BATCH_PAIRS", confirm_batch):
        component = near_duplicate_components(space, 0.98, block_rows)

    exact = cosines >= 0.98
    _, expected = connected_components(exact, directed=False)
    # the same partition of the rows, whatever each component is called
    assert len(set(zip(component, expected))) == len(set(component)) == len(set(expected))


def with_strays(inputs, seed: int, count: int = 4):
    """`inputs` and `count` rows far from every cluster (stray_0.jpg, ...), appended."""
    from retrain.audit import AuditInputs

    rng = np.random.default_rng(seed)
    strays = np.abs(rng.normal(size=(count, inputs.features.shape[1]))).astype(np.float32) * 3
    table = pd.concat([inputs.table, inputs.table.iloc[:count].assign(
        path=[f"stray_{i}.jpg" for i in range(count)],
        sha256=["d" * 63 + str(i) for i in range(count)])], ignore_index=True)
    return AuditInputs(table, np.concatenate([inputs.features, strays]), inputs.classes)


def test_outlier_scores_on_the_projection_follow_cleanlabs_on_the_full_features():
    """Strays far from every cluster score lowest, and every score is close to cleanlab's
    own on the full features."""
    from cleanlab.outlier import OutOfDistribution
    from scipy.stats import spearmanr

    from retrain.audit import neighbour_space, outliers

    inputs = with_strays(wide_inputs(), seed=2)
    table = inputs.table
    ranked = outliers(inputs, fraction=0.01, neighbours=10,
                      space=neighbour_space(inputs.features, exact_rows=0))
    assert set(ranked["path"].head(4)) == {f"stray_{i}.jpg" for i in range(4)}
    assert (ranked["flagged"] == "yes").sum() == 4
    full = OutOfDistribution(params={"k": 10}).fit_score(features=inputs.features,
                                                         verbose=False)
    ours = ranked.set_index("path")["ood_score"].loc[table["path"]].to_numpy()
    assert spearmanr(full, ours).statistic > 0.95
    assert np.abs(full - ours).max() < 0.02


def test_outliers_sought_among_a_reference_draw_still_find_the_strays():
    """Beyond OUTLIER_REFERENCE_ROWS rows each image's neighbours come from the rows whose
    sha256 sorts first: only those are neighbours, the strays (outside it) still score
    lowest, and the scores rank the images as the search among all rows does."""
    from scipy.stats import spearmanr

    from retrain.audit import _cosine_knn_graph, neighbour_space, outlier_reference, outliers

    inputs = with_strays(wide_inputs(rows=600), seed=3)
    table = inputs.table
    assert outlier_reference(table, 604) is None  # small enough: searched whole
    reference = outlier_reference(table, 200)
    assert sorted(table["sha256"].iloc[reference]) == sorted(table["sha256"])[:200]
    assert not table["path"].iloc[reference].str.startswith("stray").any()

    space = neighbour_space(inputs.features, exact_rows=0)
    assert np.isin(_cosine_knn_graph(space, 10, reference).indices, reference).all()
    every = outliers(inputs, 0.01, 10, space).set_index("path")["ood_score"]
    drawn = outliers(inputs, 0.01, 10, space, reference)
    assert set(drawn["path"].head(4)) == {f"stray_{i}.jpg" for i in range(4)}
    scores = drawn.set_index("path")["ood_score"].loc[every.index]
    assert not np.allclose(every, scores)  # the reference changed the neighbours
    assert spearmanr(every, scores).statistic > 0.9


@pytest.mark.parametrize("reference_size", [30, 120])
def test_nearest_in_reference_rows_leaves_each_row_itself_out(reference_size):
    from retrain.audit import _nearest_in_reference

    rng = np.random.default_rng(reference_size)
    points = rng.normal(size=(120, 6)).astype(np.float32)
    points[7] = points[3]  # an exact copy: both at distance 0 from each row of the pair
    reference = np.sort(rng.choice(120, reference_size, replace=False))
    reference = np.union1d(reference, [3, 7])
    found = _nearest_in_reference(points, reference, wide=5)
    distances = np.linalg.norm(points[:, None] - points[None, reference], axis=2)
    distances[reference[None, :] == np.arange(120)[:, None]] = np.inf  # not itself
    expected = np.sort(distances, axis=1)[:, :5]
    got = np.linalg.norm(points[:, None] - points[found], axis=2)
    assert np.allclose(np.sort(got, axis=1), expected, atol=1e-5)
    assert not (found == np.arange(120)[:, None]).any() and np.isin(found, reference).all()
    assert 7 in found[3] and 3 in found[7]


def test_planted_reencoded_copies_share_a_split_under_group_near_duplicates(tmp_path):
    from retrain.manifests import build_manifests

    planted = planted_tree(tmp_path)
    for method in ("stratified", "hash"):
        apart = split_of(build_manifests(planted["raw"], method=method, **SPLIT))
        assert any(apart[a] != apart[b] for a, b in planted["copies"]), method  # precondition
        together = split_of(build_manifests(planted["raw"], method=method,
                                            group_near_duplicates=True, **SPLIT))
        assert all(together[a] == together[b] for a, b in planted["copies"]), method
        # distinct images are not merged into one big group: the splits keep their sizes
        sizes = pd.Series(together).value_counts()
        assert sizes["test"] >= 0.15 * len(together) and sizes["train"] >= 0.3 * len(together)


# ---------------------------------------------------------------- the user's edits

def test_excluded_and_relabelled_images_reach_the_manifests(class_tree, tmp_path):
    from retrain.manifests import build_manifests, data_metrics, read_user_edits

    first = build_manifests(class_tree, **SPLIT)
    rows = pd.concat(first.splits.values())
    by_path, by_digest, relabelled = rows.iloc[0], rows.iloc[1], rows.iloc[2]
    new_class = next(c for c in first.classes if c != relabelled["label"])
    exclude, relabel = tmp_path / "exclude.txt", tmp_path / "relabel.csv"
    exclude.write_text(f"# comment\n{by_path['path']}\n\n{by_digest['sha256'].upper()}\n")
    relabel.write_text(f"sha256,class\n# comment\n{relabelled['sha256']},{new_class}\n")

    edited = build_manifests(class_tree, user_edits=read_user_edits(exclude, relabel), **SPLIT)
    kept = pd.concat(edited.splits.values()).set_index("path")
    assert by_path["path"] not in kept.index and by_digest["path"] not in kept.index
    assert kept.loc[relabelled["path"], "label"] == new_class
    reasons = dict(zip(edited.excluded["path"], edited.excluded["reason"], strict=True))
    assert reasons[by_path["path"]] == f"excluded by user ({exclude}:2)"
    assert reasons[by_digest["path"]] == f"excluded by user ({exclude}:4)"
    assert data_metrics(edited)["excluded"]["user_excluded"] == 2


@pytest.mark.parametrize("line, message", [
    ("abc,class_000", "expected 'sha256,class'"),
    (f"{'a' * 64}", "expected 'sha256,class'"),
    (f"{'a' * 64},class_000,extra", "expected 'sha256,class'"),
    (f"{'a' * 64},no_such_class", "not a class folder"),
])
def test_a_bad_relabel_line_is_one_error_naming_the_file_and_line(class_tree, tmp_path, line,
                                                                  message):
    from retrain.manifests import build_manifests, read_user_edits

    relabel = tmp_path / "relabel.csv"
    relabel.write_text(f"# header\n{line}\n")
    with pytest.raises(DataError) as error:
        build_manifests(class_tree, user_edits=read_user_edits(None, relabel), **SPLIT)
    assert str(error.value).startswith(f"{relabel}:2: ") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_audit_params_are_validated():
    import yaml

    from retrain.params import validate

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    validate(params)
    for key, bad in [("duplicate_similarity", 1.5), ("enabled", "yes"),
                     ("outlier_fraction", -0.1), ("colour", 1)]:
        broken = {**params, "audit": {**params["audit"], key: bad}}
        with pytest.raises(ParamsError, match=f"audit.{key}"):
            validate(broken)


# ---------------------------------------------------------------- the stage, through DVC

@pytest.fixture(scope="module")
def audited(tmp_path_factory) -> dict:
    """A small-profile workspace on the planted images, after `dvc repro audit`. Its tests
    share the xdist group `audited`, so it is built on one worker only."""
    import hashlib

    from retrain.workspace import create_workspace

    tmp = tmp_path_factory.mktemp("audit")
    planted = planted_tree(tmp)
    tarball = tmp / "planted.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(planted["raw"] / "synthetic_photos", arcname="synthetic_photos")
    workspace = create_workspace(tmp / "ws", source=REPO, profile="small")
    for key, value in {"data.url": str(tarball),
                       "data.sha256": hashlib.sha256(tarball.read_bytes()).hexdigest(),
                       # Random-weight features are not semantic: distinct generated images
                       # of a class reach 0.997, re-encoded copies 0.9997.
                       "audit.duplicate_similarity": 0.999,
                       **{f"split.{k}": v for k, v in SPLIT.items()}}.items():
        set_param(workspace, key, value)
    dvc(workspace, "repro", "audit")
    return {**planted, "workspace": workspace}


def read_csv(workspace: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(workspace / "reports" / "audit" / name, keep_default_na=False)


@pytest.mark.xdist_group("audited")
def test_stage_flags_images_moved_into_another_class(audited):
    issues = read_csv(audited["workspace"], "label_issues.csv")
    assert list(issues.columns) == ["path", "sha256", "split", "label", "suggested_label",
                                    "label_quality", "flagged"]
    flagged = set(issues.loc[issues["flagged"] == "yes", "path"])
    moved = set(audited["moved"])
    assert len(flagged & moved) >= 0.75 * len(moved), issues.head(15)
    assert len(flagged - moved) <= 0.1 * (len(issues) - len(moved)), issues.head(15)
    details = json.loads((audited["workspace"] / "reports/details/audit.json").read_text())
    assert details["label_issues"] == len(flagged)
    assert (audited["workspace"] / "reports/audit/label_issues.png").stat().st_size > 0


@pytest.mark.xdist_group("audited")
def test_stage_groups_planted_copies_and_counts_the_leaks(audited):
    ws = audited["workspace"]
    groups = read_csv(ws, "near_duplicates.csv")
    group_of = dict(zip(groups["path"], groups["group"], strict=True))
    assert sorted(groups.groupby("group")["path"].apply(sorted).tolist()) == sorted(
        sorted(pair) for pair in audited["copies"])
    split = dict(zip(groups["path"], groups["split"], strict=True))
    crossing = {group_of[a] for a, b in audited["copies"] if split[a] != split[b]}
    leaked = {path for a, b in audited["copies"] for path, other in ((a, b), (b, a))
              if split[path] == "test" and split[other] != "test"}
    assert crossing and group_of  # precondition: the split put some copies on both sides
    details = json.loads((ws / "reports/details/audit.json").read_text())
    assert details["cross_split_groups"] == len(crossing)
    assert details["leaked_test_images"] == len(leaked) > 0
    assert details["leak_free_test_images"] == details["images"] - len(
        pd.concat([pd.read_csv(ws / f"data/manifests/{s}.csv") for s in ("train", "val")])
    ) - details["leaked_test_images"]
    # a set this small is searched whole for outliers, not a draw of it
    assert details["outlier_reference_images"] == details["images"]
    assert details["near_duplicate_images"] == len(groups)
    headline = {name: json.loads((ws / f"metrics/audit/{name}.json").read_text())
                for name in ("near_duplicates", "test_leaks")}
    assert headline == {"near_duplicates": {"images": len(groups)},
                        "test_leaks": {"images": details["leaked_test_images"]}}


@pytest.mark.xdist_group("audited")
def test_excluding_and_relabelling_images_rerun_split_and_the_label_gate_reads_them(
        audited, tmp_path):
    """The README's loop in one pull request: a flagged image excluded (data/exclude.txt)
    and twenty images relabelled wrongly (data/relabel.csv). split, extract and audit
    re-run, never fetch; the excluded image is gone, with its reason; `report`'s label
    agreement gate, reading the base's audit table from the DVC cache, pairs the images
    both audits hold by content and fails on McNemar's test."""
    from scipy.stats import binomtest

    from retrain.report import compose_report

    ws = tmp_path / "ws"
    shutil.copytree(audited["workspace"], ws, symlinks=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run([*git, "add", "-A"], cwd=ws, check=True)
    subprocess.run([*git, "commit", "-qm", "audited"], cwd=ws, check=True)
    base = read_csv(ws, "label_issues.csv")
    target = base.loc[base["flagged"] == "yes", "path"].iloc[0]
    with open(ws / "data" / "exclude.txt", "a") as f:
        f.write(f"{target}\n")
    # Five images of each class the audit agrees on, each given the next class's label.
    agreeing = base[base["label"] == base["suggested_label"]].groupby("label").head(5)
    assert len(agreeing) == 20, base  # precondition: the audit agrees on enough images
    classes = sorted(base["label"].unique())
    (ws / "data" / "relabel.csv").write_text("sha256,class\n" + "".join(
        f"{digest},{classes[(classes.index(label) + 1) % len(classes)]}\n"
        for digest, label in zip(agreeing["sha256"], agreeing["label"], strict=True)))

    status = dvc(ws, "status", "split").stdout
    assert "data/exclude.txt" in status and "modified" in status
    result = dvc(ws, "repro", "audit")
    assert stages_run(result.stdout) == ["split", "extract", "audit"], result.stdout
    assert "Stage 'fetch' didn't change, skipping" in result.stdout
    manifests = pd.concat([pd.read_csv(ws / f"data/manifests/{s}.csv")
                           for s in ("train", "val", "test")])
    assert target not in set(manifests["path"])
    excluded = pd.read_csv(ws / "data/manifests/excluded.csv")
    reason = excluded.set_index("path").loc[target, "reason"]
    assert reason.startswith("excluded by user (data/exclude.txt:")
    report = compose_report("HEAD", [{"metric": "metrics/audit/label_issues.json:agreement",
                                      "direction": "higher", "tolerance": 0.01,
                                      "significance": 0.05}], ws)

    new = read_csv(ws, "label_issues.csv")
    assert target not in set(new["path"])
    paired = base.merge(new, on="sha256", suffixes=("_old", "_new"))
    assert len(paired) == len(base) - 1  # all but the excluded image
    agreed = {side: paired[f"label_{side}"] == paired[f"suggested_label_{side}"]
              for side in ("old", "new")}
    lost, gained = int((agreed["old"] & ~agreed["new"]).sum()), int(
        (~agreed["old"] & agreed["new"]).sum())
    # Most relabelled images now disagree (a classifier fitted on the wrong labels may
    # learn some of them), and the refit moves a few others either way.
    assert lost - gained >= 12, (lost, gained)
    p = binomtest(gained, lost + gained, 0.5).pvalue
    assert not report.passed, report.markdown
    relabelled = paired["label_old"] != paired["label_new"]
    lost_relabelled = int((agreed["old"] & ~agreed["new"] & relabelled).sum())
    assert (f"McNemar p = {p:.3g} (over the {len(paired)} images both revisions audited: "
            f"agreement lost by {lost} ({lost_relabelled} relabelled), gained by {gained}"
            in report.verdict), report.verdict
    assert lost_relabelled >= 12, lost_relabelled  # most of the twenty it relabelled
    headline = json.loads((ws / "metrics" / "audit" / "label_issues.json").read_text())
    assert headline["agreement"] == pytest.approx(agreed["new"].mean(), abs=1e-6)


@pytest.mark.xdist_group("audited")
def test_audit_off_writes_enabled_false(audited, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(audited["workspace"], ws, symlinks=True)
    set_param(ws, "audit.enabled", False)
    result = dvc(ws, "repro", "audit")
    assert stages_run(result.stdout) == ["audit"]
    rows = {path.name: json.loads(path.read_text()) for path in (ws / "metrics/audit").iterdir()}
    assert rows == {f"{name}.json": {"enabled": False} for name in AUDIT_ROWS}
    assert read_csv(ws, "label_issues.csv").empty


def test_reencoded_copy_has_near_identical_difference_hash(tmp_path):
    from retrain.manifests import difference_hash
    from retrain.synthetic import draw_image

    original = draw_image(2, 96, np.random.default_rng(0))
    buffer = io.BytesIO()
    original.save(buffer, format="JPEG", quality=95, subsampling=0)
    copy = Image.open(io.BytesIO(buffer.getvalue()))
    other = draw_image(2, 96, np.random.default_rng(1))
    assert bin(difference_hash(original) ^ difference_hash(copy)).count("1") <= 4
    assert bin(difference_hash(original) ^ difference_hash(other)).count("1") > 10
