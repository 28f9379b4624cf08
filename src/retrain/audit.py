"""Data audit on the cached features: images whose label looks wrong, near-duplicate images
(within and across splits: a group reaching test from train or val is a leak), and images
far from every other (out of scope).

Out-of-fold probabilities come from crossval's folds (its first repeat: the same fold
function, so byte-identical copies share a fold), so no train or val image is scored by a
classifier that saw it; test images are scored by one fitted on train+val and never fit on.

The classifier is scikit-learn's multinomial logistic regression on standardised features,
not the Keras head: the head is the same model family (one softmax layer on the features),
but fitting it means importing TensorFlow and tracing a train step, several seconds before
the first fold, while lbfgs fits a fold of flower-sized features in about a second and
gives the same probabilities on every machine. The ranking (cleanlab) only needs
calibrated-enough out-of-fold probabilities, not the head's exact ones.

The near-duplicate search compares every image with every other; the outlier search compares
every image with at most OUTLIER_REFERENCE_ROWS of them (those whose sha256 sorts first), so
its cost per image stays flat. Beyond EXACT_SEARCH_ROWS images both run on the features projected to
NEIGHBOUR_DIMENSIONS principal components (plus the length the projection drops), where each
comparison is ten times cheaper than on 1,280 features; near-duplicate pairs are then
confirmed on the full features, so the groups are exact (see `neighbour_space`), and outlier
scores use exact distances to the neighbours found.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler, normalize

from retrain.crossval import fold_indices
from retrain.evaluate import FIT_SPLITS, leaked_test_images  # train, val: what classifiers see
from retrain.manifests import (
    SPLITS,
    first_by_digest,
    load_split_arrays,
    merged_components,
    read_classes,
    read_split,
)

# Ties and rounding aside, a fold fit converges well within this many lbfgs steps.
MAX_ITERATIONS = 300
# L2 strength (inverse): with more feature dimensions than images per fold, an unpenalised
# fit can carve out a few mislabeled images and so hide them. 0.1 gave the lowest
# out-of-fold log loss on the 200 real flower photos (1, 0.1, 0.01, 0.001 tried).
INVERSE_REGULARISATION = 0.1
# The neighbour searches' space: 128 components, a tenth of 1,280 features' cost per pair.
# Fewer would be cheaper but let more distinct images above the duplicate similarity: the
# projection keeps only its share of the variance that is spread evenly over all dimensions
# (noise), and it is such variance that holds distinct images of one class apart. On the
# generated features of bench/bench_audit.py (class clusters plus isotropic noise, the hard
# case) 128 gave no false candidate pair at 100,000 rows.
NEIGHBOUR_DIMENSIONS = 128
# Up to this many rows both searches run on the full features, exact: at 3,670 x 1,280 they
# take about 2 s together, about what fitting and applying the projection costs.
EXACT_SEARCH_ROWS = 5_000
# The principal components are fitted on at most this many rows (seeded draw): the
# directions of largest variance are stable long before 100,000 rows.
PROJECTION_SAMPLE = 20_000
# Float32 rounding in the projection and the products (about 1e-6): a pair is a duplicate
# candidate when its bound reaches the similarity less this much.
SIMILARITY_SLACK = 1e-3
# Rows per block of the duplicate search: a block's bounds against every later row are held at
# once, 4 bytes each (256 x 100,000 rows: 100 MB), and its candidate pairs' positions, about
# 40 bytes each at their peak (flat positions, then row and column): a block of wholly alike
# images, every pair a candidate, peaks near 1 GB at 100,000 rows.
DUPLICATE_BLOCK_ROWS = 256
# Candidate pairs confirmed on the full features at a time; between batches the pairs already
# linked through others are dropped (on alike images, nearly all of them).
CONFIRM_BATCH_PAIRS = 8_192
# The outlier score's neighbours are picked, by their full-feature distance, among this many
# times as many nearest rows on the projection. Against cleanlab's own search on the full
# features, projection forced: the same scores (within 1e-6) on the 200 real flower photos'
# features; on 3,670 generated rows (isotropic noise, where the projection ranks neighbours
# worst) a rank correlation of 0.97 and 30 of the 37 flagged images in common (with 4 times
# as many: 0.94 and 27).
CANDIDATE_NEIGHBOURS = 8
# Beyond this many rows, the outlier score's neighbours are sought among this many rows (the
# reference: those whose sha256 sorts first, a uniform draw that depends on the images alone),
# not among all: a search against all rows costs rows squared (95 CPU-s at 100,000 rows,
# 18.5 at 36,700), one against the reference grows with the rows. The score asks how far an
# image is from the others; a draw of 20,000 answers that for any image with a few dozen
# like it in the set (an image's neighbours in the draw are a fifth as many as in 100,000).
OUTLIER_REFERENCE_ROWS = 20_000


@dataclass
class AuditInputs:
    """Every manifest row of every split, in one table, with its cached features."""
    table: pd.DataFrame  # path, label, label_index, sha256, split
    features: np.ndarray  # float32 (rows, feature size), row for row as `table`
    classes: list[str]


def read_inputs(features_dir: str | Path, manifests_dir: str | Path) -> AuditInputs:
    """Every split's manifest rows and cached features, in one table."""
    tables, features = [], []
    for split in SPLITS:
        split_features, _ = load_split_arrays(features_dir, manifests_dir, split)
        tables.append(read_split(manifests_dir, split).assign(split=split))
        features.append(split_features)
    return AuditInputs(pd.concat(tables, ignore_index=True), np.concatenate(features),
                       read_classes(manifests_dir))


def classifier(seed: int):
    return make_pipeline(StandardScaler(),
                         LogisticRegression(C=INVERSE_REGULARISATION,
                                            max_iter=MAX_ITERATIONS, random_state=seed))


def out_of_fold_probabilities(inputs: AuditInputs, folds: int, seed: int) -> np.ndarray:
    """Class probabilities for every row, each from a classifier that never saw the row."""
    table, features = inputs.table, inputs.features
    classes = len(inputs.classes)
    probabilities = np.zeros((len(table), classes), dtype=np.float64)
    fit_rows = np.flatnonzero(table["split"].isin(FIT_SPLITS).to_numpy())
    labels = table["label_index"].to_numpy()
    digests = table["sha256"].to_numpy()
    folds_of_fit = fold_indices(labels[fit_rows], digests[fit_rows], folds, 1, seed)
    scored = [(fit_rows[train], fit_rows[held]) for train, held in folds_of_fit]
    scored.append((fit_rows, np.flatnonzero(~table["split"].isin(FIT_SPLITS).to_numpy())))
    for train, held in scored:
        if len(held):
            probabilities[held] = _predict(features, labels, train, held, classes, seed)
    return probabilities


def _predict(features, labels, train, held, classes: int, seed: int) -> np.ndarray:
    """Probabilities over all `classes`, zero for a class absent from `train`."""
    model = classifier(seed).fit(features[train], labels[train])
    out = np.zeros((len(held), classes))
    out[:, model.classes_] = model.predict_proba(features[held])
    return out


def label_issues(inputs: AuditInputs, probabilities: np.ndarray) -> pd.DataFrame:
    """cleanlab's label quality (self-confidence: the probability of the given label) for
    every image, and its confident-learning verdict; lowest quality first."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = inputs.table["label_index"].to_numpy()
    quality = get_label_quality_scores(labels, probabilities)
    flagged = find_label_issues(labels, probabilities)
    frame = inputs.table[["path", "sha256", "split", "label"]].copy()
    frame["suggested_label"] = np.asarray(inputs.classes)[probabilities.argmax(axis=1)]
    frame["label_quality"] = np.round(quality, 6)
    frame["flagged"] = np.where(flagged, "yes", "no")
    return frame.sort_values(["label_quality", "path"], kind="stable").reset_index(drop=True)


@dataclass
class NeighbourSpace:
    """The features scaled to unit length (where cosine similarity s is Euclidean distance
    sqrt(2 - 2 s)), and the same unit vectors as seen by the searches: `reduced`, either the
    unit vectors themselves or their projection with one more column, the length the
    projection drops (see `neighbour_space`)."""
    unit: np.ndarray
    reduced: np.ndarray


def neighbour_space(features: np.ndarray, seed: int = 0,
                    exact_rows: int = EXACT_SEARCH_ROWS) -> NeighbourSpace:
    """Unit features, and for more than `exact_rows` rows their projection on
    NEIGHBOUR_DIMENSIONS principal directions fitted on a seeded sample of rows (randomized
    SVD), with one more column: the length of what the projection drops. Fewer rows or
    features than that are searched as they are.

    For unit vectors x, y with projections p, q and dropped lengths a, b (p.p + a^2 = 1):
    x.y = p.q + (the dropped parts' product) <= p.q + a b, which is the dot product of the
    two reduced rows (Cauchy-Schwarz). A reduced dot product therefore never falls below the
    cosine it stands for, and a reduced distance never exceeds the unit distance: every pair
    above a similarity on the full features is above it on the reduced rows too; only pairs
    that are not may join them, and the full features sort those out.
    """
    unit = normalize(features.astype(np.float32, copy=False))
    rows, dims = unit.shape
    if rows <= exact_rows or dims <= NEIGHBOUR_DIMENSIONS:
        return NeighbourSpace(unit, unit)
    rng = np.random.default_rng(seed)
    sample = unit[np.sort(rng.choice(rows, min(rows, PROJECTION_SAMPLE), replace=False))]
    components = min(NEIGHBOUR_DIMENSIONS, len(sample))
    pca = PCA(n_components=components, svd_solver="randomized", random_state=seed).fit(sample)
    # The principal directions, not PCA's transform: no centring, so that a row's projection
    # and its dropped length make up its unit length.
    directions = pca.components_.astype(np.float32)
    projected = unit @ directions.T
    return NeighbourSpace(unit, np.hstack([projected, _dropped_lengths(unit, projected,
                                                                       directions)]))


def _dropped_lengths(unit: np.ndarray, projected: np.ndarray, directions: np.ndarray,
                     chunk: int = 8_192) -> np.ndarray:
    """Each row's distance from its projection, as a column: the length of the residual
    itself, accurate to float32 rounding (sqrt(1 - |projection|^2) would lose up to 1e-3
    where a row lies almost wholly in the projection's span)."""
    lengths = np.empty((len(unit), 1), dtype=np.float32)
    for start in range(0, len(unit), chunk):  # bounded memory: a chunk of residuals at once
        part = slice(start, start + chunk)
        lengths[part, 0] = np.linalg.norm(unit[part] - projected[part] @ directions, axis=1)
    return lengths


def near_duplicate_groups(inputs: AuditInputs, similarity: float,
                          space: NeighbourSpace | None = None,
                          block_rows: int = DUPLICATE_BLOCK_ROWS) -> pd.DataFrame:
    """Groups of two or more distinct images (sha256) whose features have cosine similarity
    above `similarity` to another member (linked in a chain: connected components).
    Byte-identical copies alone make no group: `split` keeps them together already.
    """
    component = near_duplicate_components(space or neighbour_space(inputs.features),
                                          similarity, block_rows)
    frame = inputs.table[["path", "sha256", "split"]].assign(component=component)
    distinct = frame.groupby("component")["sha256"].transform("nunique")
    frame = frame[distinct > 1]
    # Groups numbered from 1 in the order of their first path, for a stable CSV.
    order = frame.groupby("component")["path"].transform("min")
    frame = frame.assign(first=order).sort_values(["first", "path"])
    frame["group"] = pd.factorize(frame["first"])[0] + 1
    return frame[["group", "path", "sha256", "split"]].reset_index(drop=True)


def near_duplicate_components(space: NeighbourSpace, similarity: float,
                              block_rows: int = DUPLICATE_BLOCK_ROWS) -> np.ndarray:
    """Each row's connected component in the graph of pairs whose unit features reach
    cosine `similarity`.

    Each block of rows is multiplied with itself and every later row on the reduced rows
    (one matrix product: their dot products bound the cosines from above, `neighbour_space`;
    each pair is looked at once); a pair above the similarity, less a little slack for
    float32 rounding, is a candidate, kept only if its full unit features reach `similarity`.
    Between batches of candidates the components are merged and the pairs already linked
    through others dropped, and only one link from each row to its component's first row is
    kept: memory is bounded by a block, not by the number of pairs, which grows as rows
    squared when most images are alike (burst shots, video frames, generated sets).
    """
    unit, reduced = space.unit, space.reduced
    rows = len(unit)
    floor = similarity - SIMILARITY_SLACK
    component = np.arange(rows)
    for start in range(0, rows, block_rows):
        bounds = reduced[start:start + block_rows] @ reduced[start:].T
        # flat positions: numpy finds them several times faster than 2-D ones
        one, other = np.divmod(np.flatnonzero(bounds >= floor), bounds.shape[1])
        del bounds
        later = other > one  # each pair once, no row with itself
        one, other = one[later] + start, other[later] + start
        for first in range(0, len(one), CONFIRM_BATCH_PAIRS):
            batch = slice(first, first + CONFIRM_BATCH_PAIRS)
            found = _confirmed_pairs(one[batch], other[batch], component, unit, similarity)
            if len(found[0]):
                component = merged_components(component, *found)
    return component


def _confirmed_pairs(rows: np.ndarray, cols: np.ndarray, component: np.ndarray,
                     unit: np.ndarray, similarity: float) -> tuple[np.ndarray, np.ndarray]:
    """The (rows, cols) pairs not yet in one component whose unit features' dot product
    (cosine similarity) reaches `similarity`. On alike images nearly every candidate is
    already linked through others, and confirming each would cost rows squared times 1,280
    products."""
    unlinked = component[rows] != component[cols]
    rows, cols = rows[unlinked], cols[unlinked]
    keep = np.einsum("ij,ij->i", unit[rows], unit[cols]) >= similarity
    return rows[keep], cols[keep]


def cross_split_groups(groups: pd.DataFrame) -> pd.Series:
    """Per group number: whether it spans more than one split."""
    return groups.groupby("group")["split"].nunique() > 1


def outliers(inputs: AuditInputs, fraction: float, neighbours: int,
             space: NeighbourSpace | None = None,
             reference: np.ndarray | None = None) -> pd.DataFrame:
    """cleanlab's out-of-distribution score of every image from its `neighbours` nearest
    neighbours' cosine distances (near 1: typical; near 0: far from every other image); the
    lowest `fraction` flagged. Lowest score first. With `reference` (row numbers, see
    `outlier_reference`), the neighbours are sought among those rows only."""
    from cleanlab.outlier import OutOfDistribution

    space = space or neighbour_space(inputs.features)
    k = max(1, min(neighbours, len(inputs.table) - 1))
    graph = _cosine_knn_graph(space, k, reference)
    # cleanlab scores a fitted neighbour index; a precomputed one reads the graph as it is.
    knn = NearestNeighbors(n_neighbors=k, metric="precomputed").fit(graph)
    scores = OutOfDistribution(params={"knn": knn, "k": k}).score(features=graph)
    frame = inputs.table[["path", "sha256", "split", "label"]].copy()
    frame["ood_score"] = np.round(scores, 6)
    frame = frame.sort_values(["ood_score", "path"], kind="stable").reset_index(drop=True)
    flagged = int(round(fraction * len(frame)))
    frame["flagged"] = np.where(np.arange(len(frame)) < flagged, "yes", "no")
    return frame


def outlier_reference(table: pd.DataFrame,
                      limit: int = OUTLIER_REFERENCE_ROWS) -> np.ndarray | None:
    """The rows the outlier search looks among: None for all of them (up to `limit`), else
    the `limit` rows whose sha256 sorts first (row order)."""
    return None if len(table) <= limit else first_by_digest(table, limit)


def _cosine_knn_graph(space: NeighbourSpace, k: int, reference: np.ndarray | None = None):
    """Each row's k nearest other rows by cosine distance (1 - cosine similarity, the
    distance cleanlab uses on features), as a sparse graph weighted by that distance; with
    `reference` (row numbers), the k nearest among those rows.

    The CANDIDATE_NEIGHBOURS * k nearest on the projection (Euclidean: scikit-learn computes
    it as one matrix product per block of rows) are re-ranked by their cosine distance on the
    full unit features, so every distance is exact; a true neighbour is missed only if the
    projection puts that many others closer.
    """
    rows = len(space.unit)
    projected = space.reduced is not space.unit
    among = rows if reference is None else len(reference)
    wide = min(among - 1, CANDIDATE_NEIGHBOURS * k if projected else k)
    if reference is None:  # the rows themselves: scikit-learn leaves each row's own out
        _, candidates = NearestNeighbors(n_neighbors=wide).fit(space.reduced).kneighbors()
    else:
        candidates = _nearest_in_reference(space.reduced, reference, wide)
    distances = np.empty(candidates.shape, dtype=np.float64)
    for start in range(0, rows, 512):  # bounded memory: a block of rows' candidates at once
        block = slice(start, start + 512)
        similar = space.unit[candidates[block]] @ space.unit[block, :, None]
        distances[block] = 1 - similar[..., 0]
    nearest = np.argsort(distances, axis=1, kind="stable")[:, :k]
    distances = np.maximum(np.take_along_axis(distances, nearest, axis=1), 0)
    indices = np.take_along_axis(candidates, nearest, axis=1)
    return sparse.csr_matrix((distances.ravel(), indices.ravel(), np.arange(0, rows * k + 1, k)),
                             shape=(rows, rows))


def _nearest_in_reference(points: np.ndarray, reference: np.ndarray, wide: int) -> np.ndarray:
    """Each row's `wide` nearest reference rows (row numbers, nearest first), itself left out
    where it is one of them."""
    _, found = NearestNeighbors(n_neighbors=wide + 1).fit(points[reference]).kneighbors(points)
    found = reference[found]
    # A row's own entry goes last (a stable sort keeps the others' order), then is cut; a row
    # outside the reference loses its farthest candidate instead.
    itself = found == np.arange(len(points))[:, None]
    order = np.argsort(itself, axis=1, kind="stable")
    return np.take_along_axis(found, order, axis=1)[:, :wide]


def test_accuracies(inputs: AuditInputs, probabilities: np.ndarray,
                    leaked: set[str]) -> dict[str, float | int | None]:
    """The train+val classifier's test accuracy, with and without the leaked test images."""
    table = inputs.table
    test = (table["split"] == "test").to_numpy()
    correct = probabilities.argmax(axis=1) == table["label_index"].to_numpy()
    clean = test & ~table["path"].isin(leaked).to_numpy()
    return {"test_accuracy": _mean(correct[test]),
            "leak_free_test_accuracy": _mean(correct[clean]),
            "leak_free_test_images": int(clean.sum())}


def label_agreement(inputs: AuditInputs, probabilities: np.ndarray) -> float | None:
    """The share of images whose label is the class a classifier that never saw them
    predicts (`suggested_label` in label_issues.csv, row for row): how well the labels
    agree with the images. Wrong labels lower it, whatever model the recipe trains, and
    `report` pairs it image by image between revisions (its default gate)."""
    labels = inputs.table["label_index"].to_numpy()
    return _mean(probabilities.argmax(axis=1) == labels)


def _mean(values: np.ndarray) -> float | None:
    return round(float(values.mean()), 6) if len(values) else None


def audit(inputs: AuditInputs, params: dict, *, folds: int, seed: int) -> dict:
    """Every table and count of the audit."""
    probabilities = out_of_fold_probabilities(inputs, folds, seed)
    issues = label_issues(inputs, probabilities)
    space = neighbour_space(inputs.features, seed)
    groups = near_duplicate_groups(inputs, params["duplicate_similarity"], space)
    crossing = cross_split_groups(groups)
    leaked = leaked_test_images(groups)
    reference = outlier_reference(inputs.table)
    odd = outliers(inputs, params["outlier_fraction"], params["outlier_neighbours"], space,
                   reference)
    counts = {
        "enabled": True,
        "images": len(inputs.table),
        "label_issues": int((issues["flagged"] == "yes").sum()),
        "label_agreement": label_agreement(inputs, probabilities),
        "near_duplicate_groups": int(len(crossing)),
        "near_duplicate_images": len(groups),
        "cross_split_groups": int(crossing.sum()),
        "leaked_test_images": len(leaked),
        "outliers": int((odd["flagged"] == "yes").sum()),
        # the images the outlier search looked among (outlier_reference)
        "outlier_reference_images": len(inputs.table) if reference is None else len(reference),
        **test_accuracies(inputs, probabilities, leaked),
    }
    return {"label_issues": issues, "near_duplicates": groups, "outliers": odd,
            "metrics": counts}
