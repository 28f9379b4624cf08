"""Safe extraction of dataset archives into the one folder layout every later stage reads.

Safety. An archive from the internet is untrusted input, so every member is checked before
anything is written, and an unsafe member rejects the whole archive (DataError) rather than
being skipped: a half-extracted dataset that silently lacks files is worse than an error.
Rejected: absolute names, `..` components, symbolic links (a dataset of images has no use
for them, and the layout step below moves folders, which would break relative links), hard
links to anything but an earlier file of the same archive, device files and FIFOs, encrypted
zip members. Tar members are then extracted with tarfile's `data` filter as a second line of
defence. Archive bombs: more than `max_members` members, or more than `max_extracted_bytes`
declared, fail before extraction; bytes are counted again while writing, in case a size
lies.

The format comes from the content (magic bytes), never the file name: gzip/bzip2/xz
compressed or plain tar, and zip.

Layout. The result is always `<dest_dir>/<dataset_name>/<class>/<images...>`:
- one top folder (the official flower_photos/ layout: class folders plus a LICENSE.txt):
  the dataset is named after that folder, and non-class files such as LICENSE.txt stay;
- class folders at the archive root: the dataset is named after the archive file name
  without its extension (.tgz, .tar.gz, .tar, .zip, ...);
- sets of the same class folders side by side (`train/` `test/`, `training_set/` `test_set/`,
  `set1/` `set2/`: see "containers" below) are merged into one folder per class, because the
  split stage makes its own seeded, stratified, duplicate-aware splits and a publisher's
  split would bypass those checks. Where two sets hold the same file name for a class, the
  later one (train, then val, then the rest by name) is renamed `<set>_<name>`. Images
  outside every class folder go to `<dataset>/.unlabeled/`, where `split` reports them;
  a layout that reads two ways is refused with the tree found.
Hidden names (starting with a dot: .DS_Store, ._AppleDouble files) and `__MACOSX`,
`Thumbs.db` and `desktop.ini` litter are not extracted at all.
"""

from __future__ import annotations

import lzma
import os
import re
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from retrain.atomic import atomic_path, remove
from retrain.errors import DataError, first_line
from retrain.images import is_image_name

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar", ".zip")
LITTER = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
CHUNK_BYTES = 1 << 20
# What a damaged archive raises from tarfile, zipfile or a decompressor, depending on where
# the damage is; all of them mean the same thing to a user.
CORRUPT = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, OSError,
           NotImplementedError)
# tarfile open modes by leading bytes: gzip, bzip2, xz.
_COMPRESSED_TAR_MAGIC = {b"\x1f\x8b": "r:gz", b"BZh": "r:bz2", b"\xfd7zXZ\x00": "r:xz"}
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def extract_dataset(
    archive: str | Path,
    dest_dir: str | Path,
    *,
    name: str | None = None,
    label: str | None = None,
    max_members: int = 1_000_000,
    max_extracted_bytes: float = 20e9,
) -> Path:
    """Extract `archive` to `dest_dir/<dataset_name>/<class>/...` and return that dataset folder.

    `dest_dir` appears whole or not at all: a previous one is replaced only on success.
    `name` is the dataset name used when the archive has no single top folder (default: the
    archive file name without extension); `label` is how errors name the archive (the URL,
    say, rather than a cache path).
    """
    archive = Path(archive)
    label = label or str(archive)
    name = name or archive_stem(archive.name)
    with atomic_path(dest_dir, directory=True) as staging:
        staging.chmod(0o755)  # a temporary folder starts private; the dataset is not
        unpacked = staging / ".unpacked"
        unpacked.mkdir()
        unpack(archive, unpacked, label=label, max_members=max_members,
               max_extracted_bytes=max_extracted_bytes)
        dataset = _arrange(unpacked, staging, name, label)
        if unpacked.exists():
            remove(unpacked)
        dataset_name = dataset.name
    return Path(dest_dir) / dataset_name


def unpack(
    archive: str | Path,
    dest: str | Path,
    *,
    label: str | None = None,
    max_members: int = 1_000_000,
    max_extracted_bytes: float = 20e9,
) -> None:
    """Safely extract every non-litter member of a tar or zip `archive` into the folder `dest`."""
    archive, dest = Path(archive), Path(dest)
    label = label or str(archive)
    limits = (label, max_members, max_extracted_bytes)
    mode = archive_format(archive, label)
    if mode == "zip":
        _unpack_zip(archive, dest, limits)
    else:
        _unpack_tar(archive, mode, dest, limits)


def archive_format(archive: Path, label: str) -> str:
    """'zip', or the tarfile mode that reads the archive ('r:gz', 'r:', ...), from its content."""
    try:
        with open(archive, "rb") as f:
            head = f.read(tarfile.BLOCKSIZE)
    except FileNotFoundError:
        raise DataError(f"{label}: archive not found") from None
    if not head:
        raise DataError(f"{label}: archive is empty (0 bytes)")
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    for magic, mode in _COMPRESSED_TAR_MAGIC.items():
        if head.startswith(magic):
            return mode
    if head[257:262] == b"ustar":
        return "r:"
    if len(head) == tarfile.BLOCKSIZE and _valid_tar_header(head):
        return "r:"  # pre-POSIX (v7) tar: no magic, only a header checksum
    if len(head) == tarfile.BLOCKSIZE and not head.strip(b"\0"):
        raise DataError(f"{label}: archive is empty")  # an empty plain tar: zero blocks
    raise DataError(f"{label}: not a tar or zip archive (unrecognised content)")


def archive_stem(file_name: str) -> str:
    """The archive's file name without its archive extension: flower_photos.tgz -> flower_photos."""
    name = PurePosixPath(file_name.replace("\\", "/")).name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name if name and not name.startswith(".") else "dataset"


def class_folders(dataset: str | Path) -> list[Path]:
    """Subfolders of `dataset` holding at least one image file, at any depth, sorted."""
    return [d for d in _subfolders(Path(dataset)) if _holds_images(d, deep=True)]


# ---------------------------------------------------------------------------- member checks


class _Budget:
    """Counts members and bytes against the archive-bomb limits."""

    def __init__(self, label: str, max_members: int, max_bytes: float):
        self.label, self.max_members, self.max_bytes = label, max_members, max_bytes
        self.members = 0
        self.bytes = 0

    def add_member(self) -> None:
        self.members += 1
        if self.members > self.max_members:
            raise DataError(f"{self.label}: more than {self.max_members:,} members "
                            "(limit data.max_members)")

    def add_bytes(self, count: int) -> None:
        self.bytes += count
        if self.bytes > self.max_bytes:
            raise DataError(f"{self.label}: more than {self.max_bytes:,.0f} bytes when extracted "
                            "(limit data.max_extracted_mb)")


def _safe_parts(name: str, label: str, role: str = "member") -> tuple[str, ...]:
    """The path components of a member name; DataError if it could land outside the folder."""
    unified = name.replace("\\", "/")  # Windows zip tools write backslashes
    if "\0" in name:
        raise DataError(f"{label}: {role} {name!r} has a NUL byte in its name")
    if unified.startswith("/") or re.match(r"[A-Za-z]:", unified):
        raise DataError(f"{label}: {role} {name!r} is an absolute path")
    parts = tuple(part for part in unified.split("/") if part not in ("", "."))
    if ".." in parts:
        raise DataError(f"{label}: {role} {name!r} points outside the archive folder ('..')")
    return parts


def _is_litter(parts: tuple[str, ...]) -> bool:
    return any(part.startswith(".") or part in LITTER for part in parts)


# ---------------------------------------------------------------------------- tar


def _unpack_tar(archive: Path, mode: str, dest: Path, limits: tuple) -> None:
    label = limits[0]
    if not hasattr(tarfile, "data_filter"):
        raise RuntimeError("safe tar extraction needs tarfile filters: Python 3.10.12+, "
                           "3.11.4+ or 3.12+")
    try:
        tar = tarfile.open(archive, mode)
    except CORRUPT as exc:
        raise DataError(f"{label}: not a readable tar archive ({first_line(exc)})") from None
    with tar:
        members = _plan_tar(tar, limits)
        budget = _Budget(*limits)

        def guard(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
            budget.add_member()
            budget.add_bytes(member.size if member.isreg() else 0)
            return tarfile.data_filter(member, path)

        try:
            tar.extractall(dest, members=members, filter=guard)
        except tarfile.FilterError as exc:
            raise DataError(f"{label}: unsafe member ({exc})") from None
        except CORRUPT as exc:
            raise DataError(f"{label}: cannot extract ({first_line(exc)})") from None


def _plan_tar(tar: tarfile.TarFile, limits: tuple) -> list[tarfile.TarInfo]:
    """Check every member before extraction; return those to extract (litter left out)."""
    label = limits[0]
    budget = _Budget(*limits)
    files: set[tuple[str, ...]] = set()
    keep = []
    for member in _members(tar, label):
        budget.add_member()
        parts = _safe_parts(member.name, label)
        _check_tar_type(member, files, label)
        if member.isreg():
            files.add(parts)
        if parts and not _is_litter(parts):
            budget.add_bytes(member.size if member.isreg() else 0)
            keep.append(member)
    _check_end_of_archive(tar, label)
    if budget.members == 0:
        raise DataError(f"{label}: archive is empty")
    return keep


def _members(tar: tarfile.TarFile, label: str):
    try:
        yield from tar
    except CORRUPT as exc:
        raise DataError(f"{label}: truncated or corrupt archive ({first_line(exc)})") from None


def _check_tar_type(member: tarfile.TarInfo, files: set, label: str) -> None:
    if member.issym():
        raise DataError(f"{label}: member {member.name!r} is a symbolic link "
                        f"(to {member.linkname!r}); links are not allowed in dataset archives")
    if member.islnk():
        target = _safe_parts(member.linkname, label, f"hard link {member.name!r} to")
        if target not in files:
            raise DataError(f"{label}: hard link {member.name!r} points to {member.linkname!r}, "
                            "which is not a file earlier in the archive")
    elif not (member.isreg() or member.isdir()):
        raise DataError(f"{label}: member {member.name!r} is a device file or FIFO")


def _check_end_of_archive(tar: tarfile.TarFile, label: str) -> None:
    """tarfile stops quietly at a damaged header after the first member; a real end of archive
    is a zero block, so its absence means truncation or corruption. Reading on to the end also
    makes a compressed stream check its trailer (length and CRC)."""
    try:
        tar.fileobj.seek(tar.offset)
        block = tar.fileobj.read(tarfile.BLOCKSIZE)
        while tar.fileobj.read(CHUNK_BYTES):
            pass
    except CORRUPT as exc:
        raise DataError(f"{label}: truncated or corrupt archive ({first_line(exc)})") from None
    if len(block) < tarfile.BLOCKSIZE or block.strip(b"\0"):
        raise DataError(f"{label}: truncated or corrupt archive (no end-of-archive marker "
                        f"after byte {tar.offset:,})")


def _valid_tar_header(block: bytes) -> bool:
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        return True
    except tarfile.HeaderError:
        return False


# ---------------------------------------------------------------------------- zip


def _unpack_zip(archive: Path, dest: Path, limits: tuple) -> None:
    label = limits[0]
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = _plan_zip(zf, limits)
            budget = _Budget(*limits)
            for info in infos:
                budget.add_member()
                _extract_zip_member(zf, info, dest.joinpath(*_safe_parts(info.filename, label)),
                                    budget)
    except CORRUPT as exc:
        raise DataError(f"{label}: truncated or corrupt zip archive ({first_line(exc)})") \
            from None


def _plan_zip(zf: zipfile.ZipFile, limits: tuple) -> list[zipfile.ZipInfo]:
    """Check every member before extraction; return those to extract (litter left out)."""
    label = limits[0]
    infos = zf.infolist()
    if not infos:
        raise DataError(f"{label}: archive is empty")
    budget = _Budget(*limits)
    keep = []
    for info in infos:
        budget.add_member()
        parts = _safe_parts(info.filename, label)
        _check_zip_type(info, label)
        if parts and not _is_litter(parts):
            budget.add_bytes(info.file_size)
            keep.append(info)
    return keep


def _check_zip_type(info: zipfile.ZipInfo, label: str) -> None:
    mode = info.external_attr >> 16  # Unix mode, when a Unix tool wrote the archive
    if stat.S_ISLNK(mode):
        raise DataError(f"{label}: member {info.filename!r} is a symbolic link; "
                        "links are not allowed in dataset archives")
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise DataError(f"{label}: member {info.filename!r} is a device file or FIFO")
    if info.flag_bits & 0x1:
        raise DataError(f"{label}: member {info.filename!r} is encrypted")


def _extract_zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path,
                        budget: _Budget) -> None:
    if info.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(info) as src, open(target, "wb") as out:
        while chunk := src.read(CHUNK_BYTES):
            budget.add_bytes(len(chunk))
            out.write(chunk)


# ---------------------------------------------------------------------------- layout


def _arrange(unpacked: Path, staging: Path, fallback_name: str, label: str) -> Path:
    """Move the unpacked tree to `staging/<dataset_name>` in the one layout, and check it."""
    root, name = _dataset_root(unpacked, fallback_name)
    dataset = staging / name
    layout = _read_layout(root, unpacked, label)
    if layout.containers:
        _merge_containers(root, layout, dataset, label)
    else:
        os.replace(root, dataset)
    if not class_folders(dataset):
        raise DataError(f"{label}: no class folders with images (expected "
                        "[top folder/]<class>/<image files>)")
    return dataset


def _dataset_root(unpacked: Path, fallback_name: str) -> tuple[Path, str]:
    """Descend through single top folders that are neither a class nor a split folder."""
    root, name = unpacked, fallback_name
    while True:
        subfolders = _subfolders(root)
        if len(subfolders) != 1 or _holds_images(root, deep=False):
            return root, name
        (only,) = subfolders
        if _holds_images(only, deep=False) or _words(only.name) & SPLIT_WORDS:
            return root, name
        root, name = only, only.name


# ---------------------------------------------------------------------------- containers
# A container is a folder of class folders (`train/`, `test_set/`, `set1/`): archives often
# hold several, each with the same classes. Their class folders are merged by class name.
# Telling one from a class that merely has subfolders takes two clues: its name (a split or
# a numbered set) and its subfolders' names repeating in a sibling; a layout where the clues
# disagree is refused rather than guessed, since a wrong guess trains on the wrong labels.

# Words (of a folder name split at `_`, `-`, digits, ...) naming a publisher's split...
SPLIT_WORDS = frozenset({"train", "training", "trn", "val", "valid", "validation", "dev",
                         "test", "testing", "tst", "eval", "evaluation", "holdout", "pred",
                         "predict", "prediction", "unlabeled", "unlabelled"})
# ... or one of several sets side by side.
SET_WORDS = frozenset({"set", "subset", "split", "part", "fold", "batch", "chunk", "shard"})
MERGE_ORDER = ({"train", "training", "trn"}, {"val", "valid", "validation", "dev"})
UNLABELED = ".unlabeled"  # images outside every class folder, set aside for `split` to report


@dataclass
class _Folder:
    path: Path  # a folder of the dataset root
    content: Path  # the same, or where its single-subfolder wrappers lead (seg_train/seg_train)
    loose: bool  # image files directly in `content`
    inner: list[Path]  # subfolders of `content` holding images

    @property
    def inner_names(self) -> set[str]:
        return {folder.name for folder in self.inner}


@dataclass
class _Layout:
    containers: list[_Folder] = field(default_factory=list)  # in merge order
    unlabeled: list[_Folder] = field(default_factory=list)  # image folders without classes


def _words(name: str) -> set[str]:
    return set(re.findall(r"[a-z]+", name.lower()))


def _set_like(name: str) -> bool:
    return bool(_words(name) & (SPLIT_WORDS | SET_WORDS))


def _survey(folder: Path) -> _Folder:
    """Descend through wrappers: a single subfolder that holds no images itself
    (`training_set/training_set/<class>/`) or is named as a set (`seg_pred/seg_pred/`), but
    never into a single class (`test/roses/`)."""
    content = folder
    while True:
        inner = [d for d in _subfolders(content) if _holds_images(d, deep=True)]
        loose = _holds_images(content, deep=False)
        if loose or len(inner) != 1 or not (_set_like(inner[0].name)
                                            or not _holds_images(inner[0], deep=False)):
            return _Folder(folder, content, loose, inner)
        content = inner[0]


def _read_layout(root: Path, unpacked: Path, label: str) -> _Layout:
    """Which folders of `root` are containers and which hold unlabeled images; empty when
    `root` holds class folders (a class may have subfolders of its own)."""
    folders = _expand_sets_of_sets(
        [_survey(d) for d in _subfolders(root) if _holds_images(d, deep=True)])
    nested = [f for f in folders if f.inner]
    repeated = {name for f in nested for g in nested if f is not g
                for name in f.inner_names & g.inner_names}
    repeated = {name for name in repeated if not _set_like(name)}  # cats/{train,test}: classes
    # Images directly inside make a folder a class, unless its name says it is a set.
    evidence = [f for f in nested if (not f.loose and _repeats(f, repeated))
                or (_set_like(f.path.name) and not all(map(_set_like, f.inner_names)))]
    if not evidence:
        return _Layout()
    if unnamed := [f for f in evidence if not _set_like(f.path.name)]:
        shown = ", ".join(f"{f.path.name}/" for f in unnamed[:3])
        same = sorted(set.intersection(*(f.inner_names for f in unnamed)))[:4]
        raise _layout_error(label, root, unpacked,
                            f"cannot tell classes from sets of classes: {shown} hold folders "
                            f"of the same names ({', '.join(same) or 'see below'})")
    layout = _Layout(containers=sorted(evidence, key=_merge_rank))
    for folder in folders:
        if folder in evidence:
            continue
        if not (folder.loose and not folder.inner and _set_like(folder.path.name)):
            raise _layout_error(label, root, unpacked,
                                f"{folder.path.name}/ is neither a set of class folders nor "
                                f"a set of unlabeled images, next to "
                                f"{', '.join(f.path.name + '/' for f in evidence[:3])}")
        layout.unlabeled.append(folder)
    return layout


def _expand_sets_of_sets(folders: list[_Folder]) -> list[_Folder]:
    """`test_set/{test_set,unlabeled}/`: a set whose folders are all named as sets stands
    for those sets."""
    expanded = []
    for folder in folders:
        if (_set_like(folder.path.name) and folder.inner and not folder.loose
                and all(map(_set_like, folder.inner_names))):
            expanded += _expand_sets_of_sets([_survey(d) for d in folder.inner])
        else:
            expanded.append(folder)
    return expanded


def _repeats(folder: _Folder, repeated: set[str]) -> bool:
    """Most of `folder`'s subfolders (two at least) are named as in a sibling: the mark of a
    set of the same classes, not of a class with a stray `misc/` shared with another."""
    shared = len(folder.inner_names & repeated)
    return shared >= 2 and 2 * shared >= len(folder.inner)


def _merge_rank(folder: _Folder) -> tuple[int, str]:
    words = _words(folder.path.name)
    rank = next((i for i, group in enumerate(MERGE_ORDER) if words & group), len(MERGE_ORDER))
    return rank, folder.path.name


def _merge_containers(root: Path, layout: _Layout, dataset: Path, label: str) -> None:
    """One folder per class in `dataset`, merged from every container; images outside any
    class folder go to `dataset/.unlabeled/`, under their path in the archive."""
    dataset.mkdir()
    aside = dataset / UNLABELED
    moved = {root / f.path.relative_to(root).parts[0]
             for f in layout.containers + layout.unlabeled}
    for entry in root.iterdir():
        if entry not in moved:  # LICENSE.txt, README and the like
            os.replace(entry, dataset / entry.name)
    for folder in layout.unlabeled:
        target = aside / folder.path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(folder.path, target)
    for container in layout.containers:
        for item in sorted(container.content.iterdir()):
            if item in container.inner:
                _merge_class(item, dataset / item.name, container.path.name, label)
            elif is_image_name(item) and item.is_file():
                target = aside / item.relative_to(root)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(item, target)


def _merge_class(class_dir: Path, merged: Path, container: str, label: str) -> None:
    merged.mkdir(exist_ok=True)
    for item in sorted(class_dir.iterdir()):
        target = merged / item.name
        if target.exists():
            target = merged / f"{container}_{item.name}"
        if target.exists():
            raise DataError(f"{label}: cannot merge {container}/{class_dir.name}/"
                            f"{item.name}: {target.name} is already taken")
        os.replace(item, target)


def _layout_error(label: str, root: Path, unpacked: Path, problem: str) -> DataError:
    """A layout that cannot be read as meant: what was found and what was expected."""
    lines = [f"{label}: {problem}", "  found:"]
    lines += [f"    {line}" for line in _tree(root, unpacked)]
    lines += ["  expected: [top folder/]<class>/<images>, or sets of the same class folders "
              "side by side, named as splits or sets (train/ val/ test/, training_set/ "
              "test_set/, set1/ set2/): <set>/<class>/<images>"]
    return DataError("\n".join(lines))


def _tree(root: Path, unpacked: Path, folders: int = 8, names: int = 5) -> list[str]:
    """A few lines sketching `root`: each image folder, where it leads, what it holds."""
    surveyed = [_survey(d) for d in _subfolders(root) if _holds_images(d, deep=True)]
    lines = []
    for folder in surveyed[:folders]:
        shown = folder.content.relative_to(unpacked).as_posix() + "/"
        held = [f"{d.name}/ ({_count_images(d)})" for d in folder.inner[:names]]
        if len(folder.inner) > names:
            held.append(f"{len(folder.inner) - names} more folders")
        if folder.loose:
            held.insert(0, f"{_count_images(folder.content, deep=False)} images")
        lines.append(f"{shown}: {', '.join(held)}")
    if len(surveyed) > folders:
        lines.append(f"... and {len(surveyed) - folders} more folders")
    return lines


def _count_images(folder: Path, *, deep: bool = True) -> int:
    candidates = folder.rglob("*") if deep else folder.iterdir()
    return sum(1 for p in candidates if is_image_name(p) and p.is_file())


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_litter((p.name,)))


def _holds_images(folder: Path, *, deep: bool) -> bool:
    candidates = folder.rglob("*") if deep else folder.iterdir()
    return any(is_image_name(p) and p.is_file() for p in candidates)
