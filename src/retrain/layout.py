"""The layout reading: which folders of an extracted archive are classes, which are sets of
classes, and which hold images without a label.

`fetch` reads the unpacked tree once (`read_layout`), prints the reading (`describe`), stores
it (`data/layout.json`, so `dvc diff` shows when it changes) and moves the files into the one
layout every later stage reads, `<dataset>/<class>/<images...>` (`arrange`).

A folder of image folders can be read two ways:
- classes: each folder is a class; images at any depth below it carry its label;
- sets: each folder is a set of the same class folders (a publisher's `train/` `test/`,
  `set1/` `set2/`), merged by class name, because `split` makes its own seeded splits.
Images that no class folder holds (loose beside the class folders, loose inside a set, or a
folder that holds images directly but is named as a split or as unlabeled) are set aside as
unlabeled in `<dataset>/.unlabeled/`, where `split` lists them: they never become a class
unless the user says so.

`data.layout: auto` picks the reading from the shape of the tree and from folder names that
are made only of split or set words (`train`, `seg_test`, `Test Set`, `set_2`, `part1`; a
class such as `test_tube`, `tea_set` or `part_ok` has a word of its own and is not one). It
refuses, with the tree and the params to set, wherever both readings stay plausible: a
wrong guess trains a plausible model on the wrong labels, which is worse than an error.
`data.layout: classes | sets` forces a reading; `data.unlabeled` names folders whose
images have no label.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path

from retrain.errors import DataError
from retrain.images import is_image_name

UNLABELED = ".unlabeled"  # images outside every class folder, set aside for `split` to report
LAYOUTS = ("auto", "classes", "sets")

# Words that name a publisher's split ...
SPLIT_WORDS = frozenset({"train", "training", "trn", "val", "valid", "validation", "dev",
                         "test", "testing", "tst", "eval", "evaluation", "holdout", "pred",
                         "predict", "prediction", "unlabeled", "unlabelled", "unlabel",
                         "nolabel", "unannotated"})
# ... one of several sets side by side ...
SET_WORDS = frozenset({"set", "subset", "split", "part", "fold", "batch", "chunk", "shard"})
# ... or nothing of their own beside such a word (`seg_train`, `test_images`).
FILLER_WORDS = frozenset({"seg", "data", "dataset", "images", "image", "imgs", "img", "photos",
                          "pictures", "pics", "files", "samples", "all", "final", "new", "old"})
UNLABELED_WORDS = frozenset({"unlabeled", "unlabelled", "unlabel", "nolabel", "unannotated"})
MERGE_ORDER = ({"train", "training", "trn"}, {"val", "valid", "validation", "dev"})
CLASSES_SHOWN = 12
HINT = ("set data.layout: classes (every folder is a class) or sets (every folder is a set of "
        "class folders), and/or data.unlabeled: [<folder>, ...] for folders of unlabeled images")


def words(name: str) -> list[str]:
    """The words of a folder name: split at non-letters and camelCase, lower-cased."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)
    return re.findall(r"[^\W\d_]+", spaced.lower())


def set_rank(name: str) -> int:
    """2: named as a split (`train`, `seg_test`, `Validation2`, `unlabeled`); 1: named as one
    of several sets (`set1`, `part_2`); 0: anything else, every class name among them."""
    found = set(words(name))
    if not found or not found <= SPLIT_WORDS | SET_WORDS | FILLER_WORDS:
        return 0
    if found & SPLIT_WORDS:
        return 2
    return 1 if found & SET_WORDS else 0


def named_unlabeled(name: str) -> bool:
    return set_rank(name) == 2 and bool(set(words(name)) & UNLABELED_WORDS)


def class_key(name: str) -> str:
    """Two folder names are one class when they differ only in case or Unicode form
    (`Cats`/`cats`; `café` as macOS writes it, NFD, and as Linux tools do, NFC)."""
    return unicodedata.normalize("NFC", name).casefold()


# ---------------------------------------------------------------------------- the tree


@dataclass
class _Folder:
    path: Path  # a folder of the root
    content: Path  # the same, or where its single-subfolder wrappers lead (seg_train/seg_train)
    loose: list[Path]  # image files directly in `content`
    inner: list[Path]  # subfolders of `content` holding images

    @property
    def name(self) -> str:
        return self.path.name


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and p.name != "__MACOSX")


def _images(folder: Path, *, deep: bool) -> list[Path]:
    candidates = folder.rglob("*") if deep else folder.iterdir()
    return sorted(p for p in candidates if is_image_name(p) and p.is_file())


def _image_folders(folder: Path) -> list[Path]:
    return [d for d in _subfolders(folder) if any(_iter_images(d))]


def _iter_images(folder: Path):
    return (p for p in folder.rglob("*") if is_image_name(p) and p.is_file())


def _survey(folder: Path) -> _Folder:
    """Descend through wrappers: a single subfolder with nothing else beside it, unless it is
    a class (`test/roses/` keeps `roses/` as what `test/` holds)."""
    content = folder
    while True:
        inner = _image_folders(content)
        loose = _images(content, deep=False)
        if loose or len(inner) != 1:
            return _Folder(folder, content, loose, inner)
        only = inner[0]
        if not (set_rank(only.name) or _image_folders(only)):
            return _Folder(folder, content, loose, inner)
        content = only


def _unwrap(unpacked: Path, fallback_name: str) -> tuple[Path, str]:
    """Descend through single top folders that wrap the dataset (`flower_photos/`,
    `outer/inner/`); not into a folder named as a set (a lone `train/` is read as one) or a
    folder of images only (a single class, which `split` then refuses)."""
    root, name = unpacked, fallback_name
    while True:
        folders = _image_folders(root)
        if len(folders) != 1 or _images(root, deep=False):
            return root, name
        (only,) = folders
        if set_rank(only.name) or not _image_folders(only):
            return root, name
        root, name = only, only.name


# ---------------------------------------------------------------------------- the reading


@dataclass
class Aside:
    folder: str  # relative to the dataset root, `/`-terminated; `` for loose images
    images: int
    why: str


@dataclass
class Reading:
    """What `fetch` read the archive as: stored as data/layout.json and printed."""

    asked: str  # data.layout
    layout: str  # classes | sets
    dataset: str  # the dataset folder's name
    top_folder: str  # the folder of the archive read as the dataset root ('' for the root)
    sets: list[dict] = field(default_factory=list)  # {folder, images}, in merge order
    classes: dict[str, int] = field(default_factory=dict)  # class -> images, by name
    unlabeled: list[Aside] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Where each class's images come from, for `arrange`: class -> source folders.
    sources: dict[str, list[Path]] = field(default_factory=dict, repr=False)
    moves: list[tuple[Path, Path]] = field(default_factory=list, repr=False)  # aside moves
    root: Path | None = field(default=None, repr=False)

    def as_json(self) -> dict:
        record = asdict(self)
        for key in ("sources", "moves", "root"):
            record.pop(key)
        return record


def read_layout(unpacked: Path, fallback_name: str, label: str, *, layout: str = "auto",
                unlabeled: tuple[str, ...] | list[str] = ()) -> Reading:
    """Read the unpacked tree; DataError (with the tree found) when it cannot be read as
    meant."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    root, name = _unwrap(unpacked, fallback_name)
    top = root.relative_to(unpacked).as_posix()
    reading = Reading(asked=layout, layout="classes", dataset=name,
                      top_folder="" if top == "." else top + "/", root=root)
    folders = [_survey(d) for d in _image_folders(root)]
    told, folders = _told_unlabeled(folders, unlabeled, root, unpacked, label)
    for folder in told:
        _set_aside(reading, root, folder.path, "named in data.unlabeled")
    kind = layout if layout != "auto" else _choose(folders, root, unpacked, label)
    if kind == "sets":
        _read_sets(reading, _expand_sets_of_sets(folders), root, unpacked, label,
                   forced=layout == "sets")
    else:
        _read_class_folders(reading, folders, root, unpacked, label,
                            forced=layout == "classes", within="")
    loose = _images(root, deep=False)
    if loose:
        _set_aside_files(reading, root, loose, "", "loose beside the class folders")
    _check_classes(reading, label)
    return reading


def _told_unlabeled(folders, names, root, unpacked, label):
    """Split off the folders `data.unlabeled` names (by name or by path from the root)."""
    wanted = {n.strip("/") for n in names}
    told = [f for f in folders if f.name in wanted or
            f.path.relative_to(root).as_posix() in wanted]
    for f in folders:  # a named folder inside a set
        for inner in f.inner:
            if inner.name in wanted or inner.relative_to(root).as_posix() in wanted:
                told.append(_Folder(inner, inner, [], []))
    missing = wanted - {f.name for f in told} - {f.path.relative_to(root).as_posix()
                                                  for f in told}
    if missing:
        raise DataError(f"{label}: data.unlabeled names {', '.join(sorted(missing))}, which "
                        "is not a folder of images in the archive (found: "
                        f"{', '.join(f.name + '/' for f in folders[:8]) or 'none'})")
    told_paths = {f.path for f in told}
    kept = []
    for f in folders:
        if f.path in told_paths:
            continue
        f.inner = [d for d in f.inner if d not in told_paths]
        kept.append(f)
    return told, kept


def _choose(folders: list[_Folder], root: Path, unpacked: Path, label: str) -> str:
    """`sets` or `classes` from the tree's shape and names; a refusal when both fit."""
    nested = [f for f in folders if f.inner]
    shared = _shared_inner_names(nested)
    repeating = [f for f in nested if _repeats(f, shared)]
    if repeating:
        # Subfolder names repeat across siblings: either sets of the same classes
        # (train/{cats,dogs} test/{cats,dogs}) or classes of the same sets
        # (cats/{train,test} dogs/{train,test}). The level named more like sets is the sets.
        outer = min(set_rank(f.name) for f in repeating)
        inner = min(set_rank(p.name) for f in repeating for p in f.inner
                    if class_key(p.name) in shared)
        if outer > inner:
            return "sets"
        if inner > outer:
            return "classes"
        shown = ", ".join(f"{f.name}/" for f in repeating[:3])
        same = sorted({p.name for f in repeating for p in f.inner
                       if class_key(p.name) in shared})[:4]
        raise layout_error(label, root, unpacked,
                           f"cannot tell classes from sets of classes: {shown} hold folders "
                           f"of the same names ({', '.join(same)})")
    named_sets = [f for f in nested if set_rank(f.name) > max(set_rank(p.name) for p in f.inner)]
    return "sets" if named_sets else "classes"


def _shared_inner_names(nested: list[_Folder]) -> set[str]:
    seen: dict[str, int] = {}
    for folder in nested:
        for key in {class_key(p.name) for p in folder.inner}:
            seen[key] = seen.get(key, 0) + 1
    return {key for key, count in seen.items() if count > 1}


def _repeats(folder: _Folder, shared: set[str]) -> bool:
    """Most of `folder`'s subfolders (two at least) are named as in a sibling: the mark of a
    set of the same classes, not of a class with a stray `misc/` shared with another."""
    count = sum(class_key(p.name) in shared for p in folder.inner)
    return count >= 2 and 2 * count >= len(folder.inner)


def _expand_sets_of_sets(folders: list[_Folder]) -> list[_Folder]:
    """`test_set/{test_set,unlabeled}/`: a set whose folders are all named as splits stands
    for those sets."""
    expanded = []
    for folder in folders:
        if (set_rank(folder.name) and folder.inner and not folder.loose
                and all(set_rank(p.name) == 2 for p in folder.inner)):
            expanded += _expand_sets_of_sets([_survey(d) for d in folder.inner])
        else:
            expanded.append(folder)
    return expanded


def _read_sets(reading: Reading, folders: list[_Folder], root: Path, unpacked: Path,
               label: str, *, forced: bool) -> None:
    reading.layout = "sets"
    sets = [f for f in folders if f.inner and (forced or set_rank(f.name))]
    for folder in folders:
        if folder in sets:
            continue
        if folder.inner and not forced:
            raise layout_error(label, root, unpacked,
                               f"{folder.name}/ is not named as a set but holds folders, next "
                               f"to the sets {_names(sets)}: a set of classes, or a class?")
        if not forced and not set_rank(folder.name):
            raise layout_error(label, root, unpacked,
                               f"{folder.name}/ holds images directly, next to the sets "
                               f"{_names(sets)}: a class of its own, or unlabeled images?")
        why = ("named as unlabeled" if named_unlabeled(folder.name)
               else "a set with no class folders")
        _set_aside(reading, root, folder.path, why)
    for folder in sorted(sets, key=_merge_rank):
        rel = folder.path.relative_to(root).as_posix() + "/"
        reading.sets.append({"folder": rel, "images": sum(1 for _ in _iter_images(folder.path))})
        _read_class_folders(reading, [_survey(d) for d in folder.inner], root, unpacked, label,
                            forced=forced, within=rel)
        if folder.loose:
            _set_aside_files(reading, root, folder.loose,
                             folder.content.relative_to(root).as_posix() + "/",
                             "loose in a set, beside its class folders")


def _read_class_folders(reading: Reading, folders: list[_Folder], root: Path, unpacked: Path,
                        label: str, *, forced: bool, within: str) -> None:
    """Folders read as classes (of the root, or of one set): a folder named as unlabeled is
    set aside; one named as a split that holds images directly could be either, and is
    refused unless the reading was forced."""
    doubtful = []
    for folder in folders:
        if not forced and named_unlabeled(folder.name):
            _set_aside(reading, root, folder.path, "named as unlabeled")
        elif not forced and set_rank(folder.name) == 2 and not folder.inner:
            doubtful.append(folder)
        else:
            _add_class(reading, folder.path, within)
    if doubtful:
        raise layout_error(label, root, unpacked, _doubt(doubtful, folders, within))


def _doubt(doubtful: list[_Folder], folders: list[_Folder], within: str) -> str:
    names = ", ".join(f"{within}{f.name}/" for f in doubtful[:3])
    classes = [f for f in folders if f not in doubtful and not named_unlabeled(f.name)]
    if len(doubtful) == 1:
        start = f"{names} is named as a split and holds images directly"
        end = "a class, or unlabeled images?"
    else:
        start = f"{names} are named as splits and hold images directly"
        end = "classes, or unlabeled images?"
    if classes:
        return f"{start}, beside the class folders {_names(classes)}: {end}"
    return f"{start}, and no folder here is named as a class: {end}"


def _add_class(reading: Reading, folder: Path, within: str) -> None:
    """Add `folder` to the class of its name, merging spellings that differ only in case or
    Unicode form."""
    name = unicodedata.normalize("NFC", folder.name)
    key = class_key(name)
    known = next((c for c in reading.classes if class_key(c) == key), None)
    count = sum(1 for _ in _iter_images(folder))
    if known is None:
        reading.classes[name] = count
        reading.sources[name] = [folder]
        return
    if folder.name != known:
        reading.notes.append(f"{within}{folder.name}/ merged into {known}/ (the same name but "
                             "for case or Unicode form)")
    reading.classes[known] += count
    reading.sources[known].append(folder)


def _set_aside(reading: Reading, root: Path, folder: Path, why: str) -> None:
    rel = folder.relative_to(root)
    count = sum(1 for _ in _iter_images(folder))
    reading.unlabeled.append(Aside(rel.as_posix() + "/", count, why))
    reading.moves.append((folder, rel))


def _set_aside_files(reading: Reading, root: Path, files: list[Path], where: str,
                     why: str) -> None:
    reading.unlabeled.append(Aside(where, len(files), why))
    reading.moves += [(f, f.relative_to(root)) for f in files]


def _check_classes(reading: Reading, label: str) -> None:
    if not reading.classes:
        raise DataError(f"{label}: no class folders with images (expected "
                        "[top folder/]<class>/<image files>)")


def _merge_rank(folder: _Folder) -> tuple[int, str]:
    found = set(words(folder.name))
    rank = next((i for i, group in enumerate(MERGE_ORDER) if found & group), len(MERGE_ORDER))
    return rank, folder.name


def _names(folders: list[_Folder]) -> str:
    shown = ", ".join(f"{f.name}/" for f in folders[:3])
    return shown + (f" and {len(folders) - 3} more" if len(folders) > 3 else "")


# ---------------------------------------------------------------------------- arranging


def arrange(reading: Reading, staging: Path, label: str) -> Path:
    """Move the files into `staging/<dataset>/<class>/...` as `reading` says; images set
    aside go to `<dataset>/.unlabeled/` under their path from the dataset root."""
    root = reading.root
    dataset = staging / reading.dataset
    dataset.mkdir()
    for source, rel in reading.moves:
        target = dataset / UNLABELED / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
    for name, sources in reading.sources.items():
        if len(sources) == 1 and not reading.sets:
            os.replace(sources[0], dataset / name)
        else:
            for source in sources:
                _merge_class(source, dataset / name, root, label)
    for entry in sorted(root.iterdir()):  # LICENSE.txt, README and the like
        if entry.is_file() and not is_image_name(entry):
            os.replace(entry, dataset / entry.name)
    return dataset


def _merge_class(class_dir: Path, merged: Path, root: Path, label: str) -> None:
    merged.mkdir(exist_ok=True)
    within = class_dir.relative_to(root).parts[0]
    for item in sorted(class_dir.iterdir()):
        target = merged / item.name
        if target.exists():
            target = merged / f"{within}_{item.name}"
        if target.exists():
            raise DataError(f"{label}: cannot merge {class_dir.relative_to(root).as_posix()}/"
                            f"{item.name}: {target.name} is already taken")
        os.replace(item, target)


# ---------------------------------------------------------------------------- showing it


def describe(reading: Reading, label: str) -> list[str]:
    """The reading in a few lines, as `fetch` prints it."""
    count = len(reading.sets)
    kind = ("class folders" if reading.layout == "classes"
            else "one set of class folders" if count == 1
            else f"{count} sets of the same class folders, merged by class name")
    top = f" under {reading.top_folder}" if reading.top_folder else ""
    lines = [f"read {label} as {kind}{top} (data.layout: {reading.asked})"]
    if reading.sets:
        lines.append("  sets merged: " + ", ".join(f"{s['folder']} ({s['images']:,})"
                                                   for s in reading.sets))
    shown = list(reading.classes.items())[:CLASSES_SHOWN]
    more = len(reading.classes) - len(shown)
    lines.append(f"  classes ({len(reading.classes)}): "
                 + ", ".join(f"{name} {count:,}" for name, count in shown)
                 + (f", and {more} more (data/layout.json lists all)" if more else ""))
    if reading.unlabeled:
        lines.append("  set aside as unlabeled: " + "; ".join(
            f"{a.folder or 'images'} ({a.images:,}: {a.why})" for a in reading.unlabeled))
    else:
        lines.append("  set aside as unlabeled: nothing")
    lines += [f"  note: {note}" for note in reading.notes]
    return lines


def layout_error(label: str, root: Path, unpacked: Path, problem: str) -> DataError:
    """A layout that cannot be read as meant: what was found, what was expected, what to set."""
    lines = [f"{label}: {problem}", "  found:"]
    lines += [f"    {line}" for line in tree(root, unpacked)]
    lines += ["  expected: [top folder/]<class>/<images>, or sets of the same class folders "
              "side by side, named as splits or sets (train/ val/ test/, training_set/ "
              "test_set/, set1/ set2/): <set>/<class>/<images>",
              f"  to read it otherwise, {HINT}"]
    return DataError("\n".join(lines))


def tree(root: Path, unpacked: Path, folders: int = 8, names: int = 5) -> list[str]:
    """A few lines sketching `root`: each image folder, where it leads, what it holds."""
    surveyed = [_survey(d) for d in _image_folders(root)]
    lines = []
    for folder in surveyed[:folders]:
        shown = folder.content.relative_to(unpacked).as_posix() + "/"
        held = [f"{d.name}/ ({sum(1 for _ in _iter_images(d))})" for d in folder.inner[:names]]
        if len(folder.inner) > names:
            held.append(f"{len(folder.inner) - names} more folders")
        if folder.loose:
            held.insert(0, f"{len(folder.loose)} images")
        lines.append(f"{shown}: {', '.join(held)}")
    if len(surveyed) > folders:
        lines.append(f"... and {len(surveyed) - folders} more folders")
    loose = _images(root, deep=False)
    if loose:
        lines.append(f"{len(loose)} images loose in {root.relative_to(unpacked).as_posix()}/")
    return lines
