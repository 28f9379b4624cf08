"""Safe extraction of dataset archives into the one folder layout every later stage reads.

Safety. An archive from the internet is untrusted input, so every member is checked before
it is written (a zip's all before the first, from its central directory; a tar's each as the
one pass over it reads it, into a staging folder that a refusal discards), and an unsafe
member rejects the whole archive (DataError) rather than being skipped: a half-extracted
dataset that silently lacks files is worse than an error.
Rejected: absolute names, `..` components, symbolic links (a dataset of images has no use
for them, and the layout step below moves folders, which would break relative links), hard
links to anything but an earlier file of the same archive, device files and FIFOs, encrypted
zip members. Tar members are then extracted with tarfile's `data` filter as a second line of
defence. Archive bombs: more than `max_members` members, or more than `max_extracted_bytes`
declared, fail before they are written; a zip's bytes are counted again while writing, in
case a declared size lies (a tar member's data is as long as its header says).

The format comes from the content (magic bytes), never the file name: gzip/bzip2/xz
compressed or plain tar, and zip.

Layout. The result is always `<dest_dir>/<dataset_name>/<class>/<images...>`, as
`retrain.layout` reads the unpacked tree (class folders, or sets of the same class folders
merged by class name; images without a class set aside in `<dataset>/.unlabeled/`; a tree
that reads two ways refused). The dataset is named after the archive's single top folder
(the official flower_photos/ layout, whose LICENSE.txt stays), or after the archive file
name without its extension (.tgz, .tar.gz, .zip, ...) when class folders are at its root.
Hidden names (starting with a dot: .DS_Store, ._AppleDouble files) and `__MACOSX`,
`Thumbs.db` and `desktop.ini` litter are not extracted at all.
"""

from __future__ import annotations

import lzma
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from retrain.atomic import atomic_path, remove
from retrain.errors import DataError, first_line
from retrain.images import is_utf8, utf8_shown
from retrain.layout import UNLABELED, Reading, arrange, read_layout

__all__ = ["UNLABELED", "extract_dataset", "unpack"]

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
    layout: str = "auto",
    unlabeled: tuple[str, ...] | list[str] = (),
) -> tuple[Path, Reading]:
    """Extract `archive` to `dest_dir/<dataset_name>/<class>/...`; return that dataset folder
    and the layout reading that arranged it (`retrain.layout`: `layout` is `data.layout`,
    `unlabeled` is `data.unlabeled`).

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
        reading = read_layout(unpacked, name, label, layout=layout, unlabeled=unlabeled)
        dataset = arrange(reading, staging, label)
        if unpacked.exists():
            remove(unpacked)
        dataset_name = dataset.name
    return Path(dest_dir) / dataset_name, reading


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
    if not is_utf8(name):
        shown = utf8_shown(name)
        raise DataError(f"{label}: {role} {shown!r} has a name that is not UTF-8 (an archive "
                        "made where names are Latin-1 or another encoding), which DVC cannot "
                        "record; re-create the archive with UTF-8 names, e.g. convert them "
                        "with `convmv -f latin1 -t utf8 -r --notest <folder>` and pack again")
    if ".." in parts:
        raise DataError(f"{label}: {role} {name!r} points outside the archive folder ('..')")
    return parts


def _is_litter(parts: tuple[str, ...]) -> bool:
    return any(part.startswith(".") or part in LITTER for part in parts)


# ---------------------------------------------------------------------------- tar


def _unpack_tar(archive: Path, mode: str, dest: Path, limits: tuple) -> None:
    """Extract in one pass over the archive: each member is checked as it is read, before it
    is written; a member that fails stops the extraction, and `extract_dataset` discards its
    staging folder, so nothing of a refused archive is kept. (Checking every member first and
    then extracting read a compressed archive twice: a fifth of `fetch`'s time.)"""
    label = limits[0]
    if not hasattr(tarfile, "data_filter"):
        raise RuntimeError("safe tar extraction needs tarfile filters: Python 3.10.12+, "
                           "3.11.4+ or 3.12+")
    try:
        tar = tarfile.open(archive, mode)
    except CORRUPT as exc:
        raise DataError(f"{label}: not a readable tar archive ({first_line(exc)})") from None
    with tar:
        budget = _Budget(*limits)
        try:
            tar.extractall(dest, members=_checked_members(tar, budget, label),
                           filter="data")
        except tarfile.FilterError as exc:
            raise DataError(f"{label}: unsafe member ({exc})") from None
        except CORRUPT as exc:
            raise DataError(f"{label}: cannot extract ({first_line(exc)})") from None
        _check_end_of_archive(tar, label)
    if budget.members == 0:
        raise DataError(f"{label}: archive is empty")


def _checked_members(tar: tarfile.TarFile, budget: _Budget, label: str
                     ) -> Iterator[tarfile.TarInfo]:
    """The members to extract (litter left out), each checked as the archive is read: safe
    name, allowed type, within the member and byte limits."""
    files: set[tuple[str, ...]] = set()
    for member in _members(tar, label):
        budget.add_member()
        parts = _safe_parts(member.name, label)
        _check_tar_type(member, files, label)
        if member.isreg():
            files.add(parts)
        if parts and not _is_litter(parts):
            budget.add_bytes(member.size if member.isreg() else 0)
            yield member


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
