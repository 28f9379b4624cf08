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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.sparse.csgraph import connected_components
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler, normalize

from retrain.crossval import fold_indices

FIT_SPLITS = ("train", "val")  # what the out-of-fold classifiers see; test never
# Ties and rounding aside, a fold fit converges well within this many lbfgs steps.
MAX_ITERATIONS = 300
# L2 strength (inverse): with more feature dimensions than images per fold, an unpenalised
# fit can carve out a few mislabeled images and so hide them. 0.1 gave the lowest
# out-of-fold log loss on the 200 real flower photos (1, 0.1, 0.01, 0.001 tried).
INVERSE_REGULARISATION = 0.1


@dataclass
class AuditInputs:
    """Every manifest row of every split, in one table, with its cached features."""
    table: pd.DataFrame  # path, label, label_index, sha256, split
    features: np.ndarray  # float32 (rows, feature size), row for row as `table`
    classes: list[str]


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


def near_duplicate_groups(inputs: AuditInputs, similarity: float) -> pd.DataFrame:
    """Groups of two or more distinct images (sha256) whose features have cosine similarity
    above `similarity` to another member (linked in a chain: connected components).

    On unit vectors, cosine similarity s is Euclidean distance sqrt(2 - 2 s), so a radius
    query finds every pair. Byte-identical copies alone make no group: `split` keeps them
    together already.
    """
    unit = normalize(inputs.features.astype(np.float32, copy=False))
    radius = float(np.sqrt(max(2.0 - 2.0 * similarity, 0.0)))
    graph = NearestNeighbors(radius=radius).fit(unit).radius_neighbors_graph(mode="connectivity")
    _, component = connected_components(graph, directed=False)
    frame = inputs.table[["path", "sha256", "split"]].assign(component=component)
    distinct = frame.groupby("component")["sha256"].transform("nunique")
    frame = frame[distinct > 1]
    # Groups numbered from 1 in the order of their first path, for a stable CSV.
    order = frame.groupby("component")["path"].transform("min")
    frame = frame.assign(first=order).sort_values(["first", "path"])
    frame["group"] = pd.factorize(frame["first"])[0] + 1
    return frame[["group", "path", "sha256", "split"]].reset_index(drop=True)


def cross_split_groups(groups: pd.DataFrame) -> pd.Series:
    """Per group number: whether it spans more than one split."""
    return groups.groupby("group")["split"].nunique() > 1


def leaked_test_paths(groups: pd.DataFrame) -> set[str]:
    """Test images with a near-duplicate in train or val."""
    fit_side = groups[groups["split"].isin(FIT_SPLITS)]["group"].unique()
    leaked = groups[(groups["split"] == "test") & groups["group"].isin(fit_side)]
    return set(leaked["path"])


def outliers(inputs: AuditInputs, fraction: float, neighbours: int) -> pd.DataFrame:
    """cleanlab's out-of-distribution score of every image from its `neighbours` nearest
    neighbours' cosine distances (near 1: typical; near 0: far from every other image); the
    lowest `fraction` flagged. Lowest score first."""
    from cleanlab.outlier import OutOfDistribution

    # cleanlab's own neighbour search: cosine distance on features of more than 3 dimensions.
    k = max(1, min(neighbours, len(inputs.table) - 1))
    scores = OutOfDistribution(params={"k": k}).fit_score(features=inputs.features,
                                                          verbose=False)
    frame = inputs.table[["path", "sha256", "split", "label"]].copy()
    frame["ood_score"] = np.round(scores, 6)
    frame = frame.sort_values(["ood_score", "path"], kind="stable").reset_index(drop=True)
    flagged = int(round(fraction * len(frame)))
    frame["flagged"] = np.where(np.arange(len(frame)) < flagged, "yes", "no")
    return frame


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


def _mean(values: np.ndarray) -> float | None:
    return round(float(values.mean()), 6) if len(values) else None


def audit(inputs: AuditInputs, params: dict, *, folds: int, seed: int) -> dict:
    """Every table and count of the audit."""
    probabilities = out_of_fold_probabilities(inputs, folds, seed)
    issues = label_issues(inputs, probabilities)
    groups = near_duplicate_groups(inputs, params["duplicate_similarity"])
    crossing = cross_split_groups(groups)
    leaked = leaked_test_paths(groups)
    odd = outliers(inputs, params["outlier_fraction"], params["outlier_neighbours"])
    counts = {
        "enabled": True,
        "images": len(inputs.table),
        "label_issues": int((issues["flagged"] == "yes").sum()),
        "near_duplicate_groups": int(len(crossing)),
        "cross_split_groups": int(crossing.sum()),
        "leaked_test_images": len(leaked),
        "outliers": int((odd["flagged"] == "yes").sum()),
        **test_accuracies(inputs, probabilities, leaked),
    }
    return {"label_issues": issues, "near_duplicates": groups, "outliers": odd,
            "metrics": counts}
