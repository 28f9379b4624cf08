"""Build split manifests: list every image once, check it, and assign it to train/val/test.

Splits are made on files (never by `take`/`skip` on a shuffled stream, which reshuffles on
every pass and leaks images between splits), seeded by `split.seed` alone, either stratified
by class or by a hash of each image's content. Byte-identical files move together; identical
files filed under two classes are dropped, since either label would be wrong for one of them.
Every class gets at least one image in every split."""

from __future__ import annotations

import concurrent.futures
import hashlib
import math
import os
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from retrain.atomic import atomic_path
from retrain.errors import DataError, ParamsError, first_line
from retrain.images import image_name_problem, is_image_name, is_utf8, read_rgb, utf8_shown
from retrain.layout import UNLABELED

SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ["path", "label", "label_index", "sha256", "width", "height"]
SKIPPED_NAMES = ("__MACOSX",)
MIN_IMAGES_TO_SPLIT = 3  # one each for train, val and test
# Reason prefix -> metrics key; the empty prefix catches every decoding failure.
EXCLUSION_KINDS = {
    "identical file": "cross_class_duplicates",
    "prefilter score": "prefiltered",
    "class not selected": "unselected_class",
    "not an image file name": "not_image_files",
    "unsupported image format": "unsupported_formats",
    "file name is not UTF-8": "bad_file_names",
    "unlabeled image": "unlabeled_images",
    "excluded by user": "user_excluded",
    "": "unreadable_images",
}


@dataclass
class Manifests:
    splits: dict[str, pd.DataFrame]
    classes: list[str]
    excluded: pd.DataFrame  # path, reason
    empty_classes: list[str] = field(default_factory=list)  # folders with no usable image
    top_ups: list[str] = field(default_factory=list)  # images moved to fill an empty split


def dataset_root(raw_dir: Path) -> Path:
    """The folder holding the class folders: `raw_dir` itself or its single subfolder."""
    entries = [p for p in raw_dir.iterdir() if not _skipped(p)]
    folders = [p for p in entries if p.is_dir()]
    if len(folders) == 1 and not any(is_image_name(p) for p in entries):
        inner = [p for p in folders[0].iterdir() if p.is_dir() and not _skipped(p)]
        if inner:
            return folders[0]
    return raw_dir


def _skipped(path: Path) -> bool:
    return path.name.startswith(".") or path.name in SKIPPED_NAMES


def class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not _skipped(p))


def list_candidates(root: Path) -> list[tuple[Path, str]]:
    """(file, class name) for every file under each class folder, nested folders included."""
    folders = class_dirs(root)
    if not folders:
        raise DataError(f"{root}: no class folders found")
    found = []
    for class_dir in folders:
        _check_class_name(class_dir)
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames[:] = sorted(d for d in dirnames if not _skipped(Path(d)))
            found += [(Path(dirpath) / f, class_dir.name) for f in sorted(filenames)
                      if not f.startswith(".")]
    return found


def _check_class_name(class_dir: Path) -> None:
    """A class label is a line of classes.txt and a CSV cell: no control characters or line
    breaks (U+2028 included: `splitlines` splits there), UTF-8."""
    name = class_dir.name
    if not is_utf8(name) or any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in name):
        raise DataError(f"{class_dir.parent}: class folder {ascii(utf8_shown(name))} cannot "
                        "be a class label (control character, line break or not UTF-8); "
                        "rename it")


def inspect_image(path: Path) -> dict:
    """Decode once (to prove the file is usable) and hash the bytes and the picture."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    img = read_rgb(path)
    width, height = img.size
    return {"sha256": digest, "width": width, "height": height,
            "dhash": difference_hash(img)}


def difference_hash(img) -> int:
    """64-bit difference hash: whether each pixel of a 9x8 grey thumbnail is brighter than
    its left neighbour. Re-encoding, resizing or a small colour shift flips few bits."""
    from PIL import Image

    grey = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.BILINEAR), np.int16)
    return int.from_bytes(np.packbits(grey[:, 1:] > grey[:, :-1]).tobytes(), "big")


def scan_images(root: Path, base: Path, workers: int | None = None):
    """Return (rows of usable images, rows of excluded files with a reason)."""
    candidates = list_candidates(root)
    rows, excluded = [], []

    def check(candidate):
        path, label = candidate
        rel = path.relative_to(base).as_posix()
        if not is_utf8(rel):  # could not be written to a UTF-8 manifest
            return None, {"path": utf8_shown(rel), "reason": "file name is not UTF-8"}
        if problem := image_name_problem(path):
            return None, {"path": rel, "reason": problem}
        try:
            return {"path": rel, "label": label, **inspect_image(path)}, None
        except DataError as exc:
            return None, {"path": rel, "reason": str(exc).split(": ", 1)[-1]}

    with concurrent.futures.ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        for row, bad in pool.map(check, candidates):
            if row:
                rows.append(row)
            else:
                excluded.append(bad)
    return rows, excluded


def unlabeled_images(root: Path, base: Path) -> list[dict]:
    """Excluded rows for images outside every class folder: loose in the dataset root, or set
    aside by `fetch` (a publisher's unlabeled test set, say) in its UNLABELED folder."""
    loose = [p for p in root.iterdir() if p.is_file()]
    aside = sorted((root / UNLABELED).rglob("*"))
    return [{"path": utf8_shown(p.relative_to(base).as_posix()),
             "reason": "unlabeled image (not inside a class folder)"}
            for p in loose + aside if is_image_name(p) and p.is_file()]


def drop_cross_class_duplicates(rows: list[dict], excluded: list[dict]) -> list[dict]:
    labels_by_digest = defaultdict(set)
    for row in rows:
        labels_by_digest[row["sha256"]].add(row["label"])
    kept = []
    for row in rows:
        labels = labels_by_digest[row["sha256"]]
        if len(labels) > 1:
            excluded.append({"path": row["path"],
                             "reason": "identical file under classes " + ", ".join(sorted(labels))})
        else:
            kept.append(row)
    return kept


def select_classes(rows, excluded, min_images: int, top_n: int) -> list[dict]:
    """Keep classes with at least `min_images` images and/or the `top_n` most frequent."""
    counts = Counter(row["label"] for row in rows)
    keep = {label for label, n in counts.items() if n >= min_images}
    if top_n:
        ranked = sorted(keep, key=lambda label: (-counts[label], label))
        keep = set(ranked[:top_n])
    for row in rows:
        if row["label"] not in keep:
            excluded.append({"path": row["path"], "reason": "class not selected "
                             f"({counts[row['label']]} images; split.min_images_per_class="
                             f"{min_images}, split.top_classes={top_n})"})
    return [row for row in rows if row["label"] in keep]


def assign_splits(rows, val_fraction: float, test_fraction: float, seed: int,
                  method: str = "stratified") -> tuple[dict[str, str], list[str]]:
    """Split groups of identical files; returns ({sha256: split}, notes on top-ups).

    `stratified`: scikit-learn's seeded stratified split (exact class proportions).
    `hash`: each image by a seeded hash of its content, so adding images never moves an
    earlier one (see `hash_split`) other than the few the top-up moves, and never takes an
    image out of test that its own hash put there (see `top_up`). Either way, a class whose
    draw leaves a split empty gets one image moved there (`top_up`): every class is in every
    split.
    """
    groups = sorted({(row["sha256"], row["label"]) for row in rows})
    per_class = Counter(label for _, label in groups)
    for label, n in sorted(per_class.items()):
        if n < MIN_IMAGES_TO_SPLIT:
            raise DataError(f"class '{label}' has {n} distinct image(s); at least "
                            f"{MIN_IMAGES_TO_SPLIT} are needed to split it (drop small classes "
                            "with split.min_images_per_class)")
    check_split_sizes(len(groups), len(per_class), val_fraction, test_fraction)
    if method == "hash":
        split_of = hash_split(groups, val_fraction, test_fraction, seed)
        # Test gives images away only when val and train cannot: see `top_up`.
        return split_of, top_up(groups, split_of, dict.fromkeys(SPLITS, 1), seed,
                                protected=("test",))
    split_of, notes = stratified_split(groups, val_fraction, test_fraction, seed)
    notes += top_up(groups, split_of, dict.fromkeys(SPLITS, 1), seed)
    return split_of, notes


def split_sizes(images: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """Images per split as scikit-learn's `train_test_split` counts them: each held-out
    share is rounded up, validation first, then test from what remains."""
    val = math.ceil(val_fraction * images)
    test = math.ceil(test_fraction * (images - val))
    return {"train": images - val - test, "val": val, "test": test}


def check_split_sizes(images: int, classes: int, val_fraction: float,
                      test_fraction: float) -> None:
    """Each split must be able to hold one image per class; name the params if not."""
    sizes = split_sizes(images, val_fraction, test_fraction)
    small = [name for name in SPLITS if sizes[name] < classes]
    if not small:
        return
    advice = {"train": "lower split.val_fraction or split.test_fraction",
              "val": "raise split.val_fraction", "test": "raise split.test_fraction"}
    name = small[0]
    # A params error (exit 2): the fix is in params.yaml, whatever the data.
    raise ParamsError(f"split.val_fraction={val_fraction} and split.test_fraction="
                    f"{test_fraction} give {name} {sizes[name]} of {images} distinct images, "
                    f"fewer than the {classes} classes (each split needs one image per "
                    f"class): {advice[name]}")


def split_score(digest: str, seed: int) -> float:
    """A number in [0, 1) fixed by an image's content and the split seed alone."""
    hashed = hashlib.sha256(f"{seed}:{digest}".encode()).digest()
    return int.from_bytes(hashed[:8], "big") / 2**64


def hash_split(groups, val_fraction: float, test_fraction: float, seed: int) -> dict:
    """Each image's split from its own score, as TensorFlow's old retrain.py did from a hash
    of the file name (content here, so identical files land together): validation below
    `val_fraction`, test in the next `test_fraction` of the rest, train above. No image's
    split depends on any other image, so adding images moves none of the earlier ones."""
    test_end = val_fraction + (1 - val_fraction) * test_fraction
    split_of = {}
    for digest, _ in groups:
        score = split_score(digest, seed)
        split_of[digest] = "val" if score < val_fraction else "test" if score < test_end \
            else "train"
    return split_of


def stratified_split(groups, val_fraction: float, test_fraction: float, seed: int
                     ) -> tuple[dict, list[str]]:
    """scikit-learn's stratified split: validation from all images, then test from the
    rest (stratifying the second split needs two images of each class in the rest)."""
    digests = [digest for digest, _ in groups]
    labels = [label for _, label in groups]
    rest_name = "train+test"
    try:
        rest, val = train_test_split(digests, test_size=val_fraction, stratify=labels,
                                     random_state=seed)
        split_of = {**dict.fromkeys(rest, rest_name), **dict.fromkeys(val, "val")}
        notes = top_up(groups, split_of, {rest_name: 2, "val": 1}, seed)
        # scikit-learn's order of `rest`, images moved in by the top-up last: the second draw
        # depends on that order, and keeping it keeps every earlier split of a seed as it was.
        moved_in = [digest for digest in val if split_of[digest] == rest_name]
        rest = [digest for digest in rest if split_of[digest] == rest_name] + moved_in
        label_of = dict(groups)
        rest_labels = [label_of[digest] for digest in rest]
        train, test = train_test_split(rest, test_size=test_fraction, stratify=rest_labels,
                                       random_state=seed)
    except ValueError as exc:  # check_split_sizes should have caught every such case
        raise DataError(f"cannot split {len(digests)} images with split.val_fraction="
                        f"{val_fraction} and split.test_fraction={test_fraction} "
                        f"({first_line(exc)})") from None
    return {**split_of, **dict.fromkeys(train, "train"), **dict.fromkeys(test, "test")}, notes


def top_up(groups, split_of: dict, minimum: dict[str, int], seed: int,
           protected: tuple[str, ...] = ()) -> list[str]:
    """Per class, move images into every split holding fewer than its `minimum`, each from
    the split with the most to spare (the lowest-scoring image first); a `protected` split
    gives only when no other split can spare. Returns one note per move. A class of
    MIN_IMAGES_TO_SPLIT or more images always has enough to spare.

    With `protected=("test",)` on a hash split this is the best guarantee growth allows.
    Call V, T, R a class's images that their own scores put in val, test and train; adding
    images to the class only adds to V, T and R.
    1. An image changes split between two versions only if the top-up moved it in one of
       them: every other image sits where its own score puts it, in both.
    2. An earlier image that its score put in test stays in test. Test gives only when val
       and train together hold too few images to fill their own gaps: k = max(0, 2 - |V|-|R|)
       images, the k lowest-scoring of T. Adding images only lowers k and only adds to T,
       so an earlier image among the k lowest of the grown T was among the k lowest of the
       earlier T: it gave before too, and was not in test then.
    What no rule that sees only the current images can promise (so none is attempted): that
    an image moved *into* a split stays there, or that the moved image never changes. Take a
    class with val {a, d}, train {b, c}, test empty. Some image must move to test, yet each
    is the only one of its split in a three-image subset ({a, b, c} for a, {a, b, d} for b,
    ...), where it could not have moved: whichever moves, it did not move in some earlier
    version of the class. Likewise the image moved into test must return to its own split
    once images of the class land in test by their scores, or every earlier version's
    top-up would have to stay in test."""
    by_class = defaultdict(list)
    for digest, label in groups:
        by_class[label].append(digest)
    notes = []
    for label, digests in sorted(by_class.items()):
        digests.sort(key=lambda digest: split_score(digest, seed))
        for split, need in minimum.items():
            while (held := sum(split_of[d] == split for d in digests)) < need:
                spare = {name: sum(split_of[d] == name for d in digests) - low
                         for name, low in minimum.items()}
                donor = max(minimum, key=lambda name: (
                    spare[name] > 0 and name not in protected, spare[name]))
                if spare[donor] <= 0:  # unreachable past the MIN_IMAGES_TO_SPLIT check
                    raise DataError(f"class '{label}' has {len(digests)} distinct images, "
                                    f"too few for one in each split")
                moved = next(d for d in digests if split_of[d] == donor)
                split_of[moved] = split
                notes.append(f"class '{label}' ({len(digests)} images) drew {held} for "
                             f"{split}: moved one image there from {donor}")
    return notes


def build_manifests(raw_dir: str | Path, *, val_fraction: float, test_fraction: float,
                    seed: int, method: str = "stratified", min_images_per_class: int = 0,
                    top_classes: int = 0,
                    prefilter: Callable[[Path, list, list], list] | None = None,
                    user_edits: UserEdits | None = None, group_near_duplicates: bool = False,
                    near_duplicate_bits: int = 4) -> Manifests:
    """`prefilter(raw_dir, rows, excluded)` returns the rows to keep and adds the rest to
    `excluded`; it runs before class selection, so top_classes counts only kept images.
    `user_edits` (the user's exclusion list and relabelling) apply first of all, so a
    relabelled copy can settle an identical file filed under two classes.
    `group_near_duplicates` keeps images whose difference hashes differ in at most
    `near_duplicate_bits` bits in one split (see `near_duplicate_keys`)."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DataError(f"{raw_dir}: dataset folder not found (run the fetch stage first)")
    root = dataset_root(raw_dir)
    rows, excluded = scan_images(root, raw_dir)
    excluded += unlabeled_images(root, raw_dir)
    empty_classes = sorted({p.name for p in class_dirs(root)} - {row["label"] for row in rows})
    if user_edits is not None:
        rows = user_edits.apply(rows, excluded, {p.name for p in class_dirs(root)})
    rows = drop_cross_class_duplicates(rows, excluded)
    if prefilter is not None:
        rows = prefilter(raw_dir, rows, excluded)
    if not rows:
        raise DataError(f"{raw_dir}: no usable images")
    selected = select_classes(rows, excluded, min_images_per_class, top_classes)
    classes = sorted({row["label"] for row in selected})
    if len(classes) < 2:
        found = f"only one class ({classes[0]})" if classes else "no class"
        selection = (f" is left by split.min_images_per_class={min_images_per_class} and "
                     f"split.top_classes={top_classes}" if len(selected) < len(rows) else "")
        raise DataError(f"{raw_dir}: {found}{selection}; at least two are needed")
    rows = selected
    # Near-duplicate groups split as one image (their first sha256), so they share a split.
    key_of = near_duplicate_keys(rows, near_duplicate_bits) if group_near_duplicates else {}
    grouped = {key for key, size in Counter(key_of.values()).items() if size > 1}

    def split_key(digest: str, label: str) -> str:
        # A group filed under two classes splits once per class: one key with two labels
        # would stratify on the wrong one (the audit flags such images as label issues).
        key = key_of.get(digest, digest)
        return f"{key}/{label}" if key in grouped else digest

    keyed = [{**row, "sha256": split_key(row["sha256"], row["label"])} for row in rows]
    split_of, top_ups = assign_splits(keyed, val_fraction, test_fraction, seed, method)
    index = {label: i for i, label in enumerate(classes)}
    frame = pd.DataFrame(rows)
    frame["label_index"] = frame["label"].map(index)
    frame["split"] = [split_of[split_key(d, label)]
                      for d, label in zip(frame["sha256"], frame["label"])]
    splits = {
        name: frame[frame["split"] == name][MANIFEST_COLUMNS].sort_values("path")
        .reset_index(drop=True)
        for name in SPLITS
    }
    excluded_frame = pd.DataFrame(excluded, columns=["path", "reason"]).sort_values("path")
    return Manifests(splits, classes, excluded_frame.reset_index(drop=True), empty_classes,
                     top_ups)


USER_EXCLUDED = "excluded by user"
RELABEL_HEADER = ("sha256", "class")


@dataclass
class UserEdits:
    """The user's decisions after an audit: images to leave out (by path under the raw
    folder, or sha256) and labels to replace (sha256 -> class), each with where it was
    written (`file:line`) so an exclusion reason and every error can point at it."""
    exclude: dict[str, str] = field(default_factory=dict)  # path or sha256 -> file:line
    relabel: dict[str, tuple[str, str]] = field(default_factory=dict)  # sha256 -> class, file:line

    def apply(self, rows: list[dict], excluded: list[dict], class_names: set[str]
              ) -> list[dict]:
        for digest, (label, where) in self.relabel.items():
            if label not in class_names:
                raise DataError(f"{where}: relabel {digest[:12]}... to '{label}', which is "
                                f"not a class folder (one of {', '.join(sorted(class_names))})")
        self._check_every_line_matches(rows, excluded)
        kept = []
        for row in rows:
            where = self.exclude.get(row["path"]) or self.exclude.get(row["sha256"])
            if where:
                excluded.append({"path": row["path"], "reason": f"{USER_EXCLUDED} ({where})"})
                continue
            if row["sha256"] in self.relabel:
                row = {**row, "label": self.relabel[row["sha256"]][0]}
            kept.append(row)
        return kept

    def _check_every_line_matches(self, rows: list[dict], excluded: list[dict]) -> None:
        """A line that names no image would look like a decision taken and do nothing (a
        path written with its `data/raw/` prefix, an image since removed): stop instead."""
        digests = {row["sha256"] for row in rows}
        known = digests | {row["path"] for row in rows} | {row["path"] for row in excluded}
        for key, where in self.exclude.items():
            if key not in known:
                raise DataError(f"{where}: {key} matches no image (a path relative to data/raw "
                                "as the manifests write it, or an image's sha256)")
        for digest, (_, where) in self.relabel.items():
            if digest not in digests:
                raise DataError(f"{where}: {digest} is the sha256 of no image (the manifests' "
                                "sha256 column lists them)")


def _content_lines(path: Path):
    """(line number, text) of each line that is not blank or a `#` comment."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or 'not UTF-8'})"
                        ) from None
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            yield number, line


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def read_user_edits(exclude: str | Path | None, relabel: str | Path | None) -> UserEdits:
    """Read data/exclude.txt (a path under the raw folder or a sha256 per line) and
    data/relabel.csv (`sha256,class` per line; a `sha256,class` header is allowed); `#`
    starts a comment line in both. A missing file means no edits of that kind."""
    edits = UserEdits()
    if exclude is not None:
        for number, line in _content_lines(Path(exclude)):
            edits.exclude[line.lower() if _is_sha256(line.lower()) else line] = \
                f"{exclude}:{number}"
    if relabel is not None:
        for number, line in _content_lines(Path(relabel)):
            where = f"{relabel}:{number}"
            cells = [cell.strip() for cell in line.split(",")]
            if tuple(cells) == RELABEL_HEADER:
                continue
            if len(cells) != 2 or not _is_sha256(cells[0].lower()) or not cells[1]:
                raise DataError(f"{where}: expected 'sha256,class' (64 hexadecimal digits, a "
                                f"comma, a class folder name), got {line!r}")
            digest = cells[0].lower()
            if digest in edits.relabel and edits.relabel[digest][0] != cells[1]:
                raise DataError(f"{where}: {digest[:12]}... is relabelled twice "
                                f"({edits.relabel[digest][1]} says '{edits.relabel[digest][0]}')")
            edits.relabel[digest] = (cells[1], where)
    return edits


def near_duplicate_keys(rows: list[dict], max_bits: int) -> dict[str, str]:
    """{sha256: the first sha256 of its group} for images linked by difference hashes at most
    `max_bits` bits apart (chains join: connected components). Unlike `audit`'s groups, from
    the backbone's features, these see only the coarse picture (a 9x8 thumbnail): re-encoded,
    resized or recoloured copies, not a different shot of the same scene."""
    hashes = dict(sorted({row["sha256"]: row["dhash"] for row in rows}.items()))
    if len(hashes) < 2:
        return {}
    digests = list(hashes)
    values, first_row, row_of = np.unique(np.array(list(hashes.values()), dtype=np.uint64),
                                          return_index=True, return_inverse=True)
    one, other = hamming_pairs(values, max_bits)
    # Rows of one hash value start linked to its first row; digests are sorted, so a
    # component's first row is its smallest sha256.
    component = merged_components(first_row[row_of], first_row[one], first_row[other])
    return {digest: digests[group] for digest, group in zip(digests, component, strict=True)}


def merged_components(component: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Components after linking the pairs (rows, cols). `component` names each row's
    component by a row of it, its first (np.arange: every row alone; so component[i] <= i and
    component[component] == component), and so does the result: a new array, or `component`
    itself where there are no pairs. The graph is built over the components the pairs touch
    alone, so a search linking a few pairs at a time among 100,000 rows pays a graph of those
    pairs and one vectorised relabelling pass over the rows, not a graph of every row."""
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    if not len(rows):
        return component
    pairs = len(rows)
    touched, index = np.unique(np.concatenate([component[rows], component[cols]]),
                               return_inverse=True)
    links = sparse.coo_matrix((np.ones(pairs, dtype=np.int8), (index[:pairs], index[pairs:])),
                              shape=(len(touched), len(touched)))
    _, labels = connected_components(links, directed=False)
    first = np.full(labels.max() + 1, len(component))
    np.minimum.at(first, labels, touched)  # a merged component is named by its first row
    renamed = np.arange(len(component))
    renamed[touched] = first[labels]
    return renamed[component]


HASH_BITS = 64


def hamming_pairs(values: np.ndarray, max_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of distinct 64-bit `values` at most `max_bits` bits apart, all of
    them (exact). Pigeonhole: cut the bits into max_bits + 1 chunks, and two values that
    differ in at most max_bits bits agree on at least one chunk whole; so only values
    sharing a chunk are compared, not every pair (36,700 hashes: 0.39 CPU-s, where a search
    over every pair took 99; bench/bench_hash_groups.py). Radii of 16 bits or more leave
    slices too narrow to tell values apart: every pair is compared then, a block at a time."""
    chunks = max_bits + 1
    if chunks > HASH_BITS // 4:  # slices under 4 bits: most values share one with most others
        return _close_pairs_by_blocks(values, max_bits)
    bounds = np.linspace(0, HASH_BITS, chunks + 1).astype(int)
    candidates = [_sharing((values >> np.uint64(low)) & np.uint64((1 << (high - low)) - 1))
                  for low, high in zip(bounds[:-1], bounds[1:], strict=True)]
    keys = np.unique(np.concatenate([one * len(values) + other for one, other in candidates]))
    one, other = np.divmod(keys, len(values))
    keep = _bits_set(values[one] ^ values[other]) <= max_bits
    return one[keep], other[keep]


def _bits_set(words: np.ndarray) -> np.ndarray:
    """How many bits are set in each uint64 (numpy >= 2 counts them natively)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words)
    bytes_ = np.ascontiguousarray(words).view(np.uint8).reshape(*words.shape, 8)
    return np.unpackbits(bytes_, axis=-1).sum(axis=-1)


def _close_pairs_by_blocks(values: np.ndarray, max_bits: int,
                           block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """`hamming_pairs` by comparing every pair, a block of rows at a time (bounded memory)."""
    ones, others = [], []
    for start in range(0, len(values), block):
        near = _bits_set(values[start:start + block, None] ^ values[None, start:]) <= max_bits
        one, other = np.nonzero(near)
        one += start
        other += start
        later = other > one
        ones.append(one[later])
        others.append(other[later])
    return np.concatenate(ones), np.concatenate(others)


def _sharing(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) whose `keys` are equal (a stable sort keeps each run of equal keys
    in index order, and triu_indices pairs earlier with later)."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    sizes = np.diff(np.r_[starts, len(keys)])
    ones, others = [], []
    for size in np.unique(sizes[sizes > 1]):
        groups = order[starts[sizes == size][:, None] + np.arange(size)]  # (groups, size)
        first, second = np.triu_indices(size, 1)
        ones.append(groups[:, first].ravel())
        others.append(groups[:, second].ravel())
    if not ones:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    return np.concatenate(ones), np.concatenate(others)


def data_metrics(manifests: Manifests) -> dict:
    """Images per class per split and exclusion counts, for reports/details/data.json
    (retrain.headline.data_rows sums them up for metrics/data/)."""
    per_split = {}
    for name, frame in manifests.splits.items():
        counts = frame["label"].value_counts()
        per_split[name] = {label: int(counts.get(label, 0)) for label in manifests.classes}
        per_split[name]["total"] = len(frame)
    reasons = Counter(manifests.excluded["reason"].map(_reason_kind))
    return {
        "classes": len(manifests.classes),
        "empty_class_folders": len(manifests.empty_classes),
        "images": per_split,
        "excluded": {"total": len(manifests.excluded),
                     **{kind: reasons.get(kind, 0) for kind in EXCLUSION_KINDS.values()}},
    }


def _reason_kind(reason: str) -> str:
    for prefix, kind in EXCLUSION_KINDS.items():
        if reason.startswith(prefix):
            return kind
    return EXCLUSION_KINDS[""]


def write_manifests(manifests: Manifests, out_dir: str | Path) -> None:
    """Write {train,val,test}.csv, classes.txt and excluded.csv as one atomic folder."""
    with atomic_path(out_dir, directory=True) as tmp:
        for name, frame in manifests.splits.items():
            frame.to_csv(tmp / f"{name}.csv", index=False, lineterminator="\n")
        (tmp / "classes.txt").write_text("".join(f"{c}\n" for c in manifests.classes),
                                          encoding="utf-8")
        manifests.excluded.to_csv(tmp / "excluded.csv", index=False, lineterminator="\n")


def first_by_digest(table: pd.DataFrame, count: int) -> np.ndarray:
    """Positions of the `count` rows whose sha256 (then path) sorts first, in row order: a
    uniform draw that depends on the images alone, so a row stays in it whatever the seed,
    until images whose digests sort before it are added."""
    first = np.lexsort((table["path"].to_numpy(), table["sha256"].to_numpy()))[:count]
    return np.sort(first)


def read_split(manifest_dir: str | Path, split: str) -> pd.DataFrame:
    path = Path(manifest_dir) / f"{split}.csv"
    if not path.exists():
        raise DataError(f"{path}: manifest not found (run the split stage first)")
    return pd.read_csv(path, dtype={"path": str, "label": str, "sha256": str},
                       keep_default_na=False)


def load_split_arrays(features_dir: str | Path, manifests_dir: str | Path, split: str
                      ) -> tuple[np.ndarray, np.ndarray]:
    """A split's cached features and class indices, row for row as in its manifest."""
    features = np.load(Path(features_dir) / f"{split}.npy")
    labels = read_split(manifests_dir, split)["label_index"].to_numpy()
    if len(features) != len(labels):
        raise DataError(f"{features_dir}/{split}.npy has {len(features)} rows but the "
                        f"{split} manifest has {len(labels)}: re-run the extract stage")
    return features, labels


def read_classes(manifest_dir: str | Path) -> list[str]:
    return read_class_list(Path(manifest_dir) / "classes.txt")


def read_class_list(path: str | Path) -> list[str]:
    """Class names, one per line, in the model's output order (what `split` writes)."""
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: class list not found (run the split stage first)") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise DataError(f"{path}: cannot read the class list ({reason})") from None
