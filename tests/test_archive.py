"""Safe extraction of dataset archives, built in the tests (layouts: test_layouts.py)."""

from __future__ import annotations

import gzip
import io
import random
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from retrain import archive
from retrain.archive import archive_stem, extract_dataset
from retrain.errors import DataError
from retrain.synthetic import write_dataset

JPEG = b"\xff\xd8\xff\xe0 pixels are not decoded by fetch"


# --------------------------------------------------------------------------- archive builders
# An entry is a tuple: ("file", name, data), ("dir", name), ("sym", name, target),
# ("hard", name, target) or ("dev", name, tar type). Builders write it as tar or zip.


def f(name: str, data: bytes = JPEG) -> tuple:
    return ("file", name, data)


def d(name: str) -> tuple:
    return ("dir", name)


def sym(name: str, target: str) -> tuple:
    return ("sym", name, target)


def hard(name: str, target: str) -> tuple:
    return ("hard", name, target)


def dev(name: str, kind: bytes = tarfile.CHRTYPE) -> tuple:
    return ("dev", name, kind)


GOOD = [f("good/a.jpg"), f("good/b.jpg"), f("other/c.jpg")]


def tar_bytes(entries: list[tuple], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for kind, name, *rest in entries:
            info = tarfile.TarInfo(name)
            data = rest[0] if kind == "file" else b""
            info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE,
                         "hard": tarfile.LNKTYPE}.get(kind) or rest[0]
            info.linkname = rest[0] if kind in ("sym", "hard") else ""
            info.size = len(data)
            info.mode = 0o755 if kind == "dir" else 0o644
            tar.addfile(info, io.BytesIO(data) if kind == "file" else None)
    return buffer.getvalue()


ZIP_TYPES = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "sym": stat.S_IFLNK}


def zip_bytes(entries: list[tuple]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for kind, name, *rest in entries:
            assert kind != "hard", "zip has no hard links"
            info = zipfile.ZipInfo(name + ("/" if kind == "dir" and not name.endswith("/")
                                           else ""))
            file_type = ZIP_TYPES.get(kind, stat.S_IFCHR)
            info.external_attr = (file_type | 0o644) << 16
            data = rest[0] if kind in ("file", "sym") else b""
            zf.writestr(info, data if isinstance(data, bytes) else data.encode())
    return buffer.getvalue()


def archive_bytes(entries: list[tuple], fmt: str) -> bytes:
    return zip_bytes(entries) if fmt == "zip" else tar_bytes(entries, fmt)


def assert_nothing_written(tmp_path: Path) -> None:
    """Only the archive and the untouched sentinel are left: no dest, no temporary folder,
    nothing outside."""
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == ["pack.tgz", "sentinel", "sentinel/secret.txt"], left
    assert (tmp_path / "sentinel" / "secret.txt").read_text() == "untouched"


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- unsafe members

# (id, entries added to GOOD; {s} is the sentinel folder's absolute path, error pattern).
# From the extraction folder (raw's temporary sibling, then .unpacked) ../../ is tmp_path.
UNSAFE_TAR = [
    ("absolute path", [f("{s}/evil.txt")], r"is an absolute path"),
    ("dot-dot", [f("../../sentinel/evil.txt")], r"outside the archive folder"),
    ("dot-dot inside a class", [f("good/../../../sentinel/evil.txt")], r"outside the archive"),
    ("backslash dot-dot", [f("..\\..\\sentinel\\evil.txt")], r"outside the archive folder"),
    ("symlink outside", [sym("good/evil", "../../../sentinel"), f("good/evil/x.txt")],
     r"symbolic link"),
    ("absolute symlink", [sym("good/evil", "{s}/secret.txt")], r"symbolic link"),
    ("symlink inside", [sym("good/c.jpg", "a.jpg")], r"symbolic link"),
    ("hardlink outside", [hard("good/evil", "../../sentinel/secret.txt")],
     r"hard link 'good/evil' to .* outside the archive folder"),
    ("absolute hardlink", [hard("good/evil", "{s}/secret.txt")], r"is an absolute path"),
    ("hardlink to a missing member", [hard("good/evil", "good/missing.jpg")],
     r"not a file earlier in the archive"),
    ("character device", [dev("good/null", tarfile.CHRTYPE)], r"device file or FIFO"),
    ("block device", [dev("good/disk", tarfile.BLKTYPE)], r"device file or FIFO"),
    ("fifo", [dev("good/pipe", tarfile.FIFOTYPE)], r"device file or FIFO"),
]

UNSAFE_ZIP = [
    ("absolute path", [f("{s}/evil.txt")], r"is an absolute path"),
    ("dot-dot", [f("../../sentinel/evil.txt")], r"outside the archive folder"),
    ("backslash dot-dot", [f("..\\..\\sentinel\\evil.txt")], r"outside the archive folder"),
    ("drive letter", [f("C:/evil.txt")], r"is an absolute path"),
    ("symlink", [sym("good/evil", "../../sentinel")], r"symbolic link"),
    ("device", [dev("good/null")], r"device file or FIFO"),
]


def fill(entries: list[tuple], sentinel: Path) -> list[tuple]:
    return [tuple(x.format(s=sentinel) if isinstance(x, str) else x for x in entry)
            for entry in entries]


@pytest.mark.parametrize("entries, pattern", [case[1:] for case in UNSAFE_TAR],
                         ids=[case[0] for case in UNSAFE_TAR])
def test_unsafe_tar_member_rejected(place, tmp_path, entries, pattern):
    data = tar_bytes(GOOD + fill(entries, place.sentinel))
    with pytest.raises(DataError, match=rf"^{tmp_path}/pack\.tgz: .*{pattern}"):
        place(data)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("entries, pattern", [case[1:] for case in UNSAFE_ZIP],
                         ids=[case[0] for case in UNSAFE_ZIP])
def test_unsafe_zip_member_rejected(place, tmp_path, entries, pattern):
    data = zip_bytes(GOOD + fill(entries, place.sentinel))
    with pytest.raises(DataError, match=rf"^{tmp_path}/pack\.tgz: .*{pattern}"):
        place(data)
    assert_nothing_written(tmp_path)


def test_encrypted_zip_member_rejected(place, tmp_path):
    data = bytearray(zip_bytes(GOOD))
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        data[data.find(signature) + flag_offset] |= 0x1  # the first member claims encryption
    with pytest.raises(DataError, match=r"'good/a.jpg' is encrypted"):
        place(bytes(data))
    assert_nothing_written(tmp_path)


# --------------------------------------------------------------------------- broken archives


def plain_tar_cut_after_first_member() -> bytes:
    data = tar_bytes(GOOD, "w:")
    return data[: 2 * tarfile.BLOCKSIZE]  # header + one block of data, then nothing


def zip_with_damaged_member() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("good/a.jpg", b"A" * 100)
        zf.writestr("other/b.jpg", JPEG)
    return buffer.getvalue().replace(b"A" * 100, b"A" * 50 + b"B" * 50)


# (id, function making the archive bytes, error pattern). One line per case.
BROKEN = [
    ("random bytes", lambda: random.Random(0).randbytes(4096), r"not a tar or zip archive"),
    ("zero bytes", lambda: b"", r"archive is empty \(0 bytes\)"),
    ("truncated tgz", lambda: tar_bytes(GOOD)[:150], r"truncated or corrupt"),
    ("plain tar cut at a member", plain_tar_cut_after_first_member, r"truncated or corrupt"),
    ("plain tar cut mid-file", lambda: tar_bytes(GOOD, "w:")[:600], r"truncated or corrupt"),
    ("gzip, not a tar", lambda: gzip.compress(b"hello " * 100), r"not a readable tar archive"),
    ("empty tgz", lambda: tar_bytes([]), r"archive is empty$"),
    ("empty zip", lambda: zip_bytes([]), r"archive is empty$"),
    ("empty plain tar", lambda: tar_bytes([], "w:"), r"archive is empty$"),
    ("truncated zip", lambda: zip_bytes(GOOD)[:-30], r"truncated or corrupt zip archive"),
    ("zip with a damaged member", zip_with_damaged_member, r"truncated or corrupt zip archive"),
    ("no class folders", lambda: tar_bytes([f("README.txt", b"hi"), f("a.jpg")]),
     r"no class folders with images"),
    ("empty class folders", lambda: tar_bytes([d("roses"), d("tulips")]), r"no class folders"),
    ("only litter", lambda: tar_bytes([f("__MACOSX/roses/._a.jpg"), f(".hidden/roses/a.jpg")]),
     r"no class folders"),
]


@pytest.mark.parametrize("make, pattern", [case[1:] for case in BROKEN],
                         ids=[case[0] for case in BROKEN])
def test_broken_archive_rejected(place, tmp_path, make, pattern):
    with pytest.raises(DataError, match=rf"^{tmp_path}/pack\.tgz: .*{pattern}") as info:
        place(make())
    assert "\n" not in str(info.value)
    assert_nothing_written(tmp_path)


# --------------------------------------------------------------------------- archive bombs

MANY = [f(f"class_{i % 2}/{i}.jpg") for i in range(20)]
BIG = [f("good/a.jpg", b"\0" * 2_000_000), f("other/b.jpg")]

# (id, archive bytes, limits, error pattern)
BOMBS = [
    ("tar: too many members", lambda: tar_bytes(MANY), {"max_members": 10}, r"than 10 members"),
    ("zip: too many members", lambda: zip_bytes(MANY), {"max_members": 10}, r"than 10 members"),
    ("tar: too many bytes", lambda: tar_bytes(BIG), {"max_extracted_bytes": 1e6},
     r"more than 1,000,000 bytes when extracted"),
    ("zip: too many bytes", lambda: zip_bytes(BIG), {"max_extracted_bytes": 1e6},
     r"more than 1,000,000 bytes when extracted"),
    # zipfile never writes more than a member declares; the CRC check then fails.
    ("zip understating a size", lambda: understated_zip(), {}, r"Bad CRC-32 for file 'good/a"),
]


def understated_zip() -> bytes:
    """A zip whose central directory declares 10 bytes for a 100,000-byte member."""
    data = bytearray(zip_bytes([f("good/a.jpg", b"\0" * 100_000), f("other/b.jpg")]))
    central = data.find(b"PK\x01\x02")
    data[central + 24 : central + 28] = (10).to_bytes(4, "little")  # uncompressed size
    return bytes(data)


@pytest.mark.parametrize("make, limits, pattern", [case[1:] for case in BOMBS],
                         ids=[case[0] for case in BOMBS])
def test_archive_bomb_rejected(place, tmp_path, make, limits, pattern):
    with pytest.raises(DataError, match=pattern):
        place(make(), **limits)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("fmt, planner", [("zip", "_plan_zip")])
def test_limits_enforced_while_extracting(place, tmp_path, monkeypatch, fmt, planner):
    """Should a zip's declared sizes ever get past the check before extraction, the bytes and
    members actually written are counted against the same limits. (A tar is checked member by
    member as it is read, in the one pass that extracts it: test_archive_bomb_rejected.)"""
    plan = getattr(archive, planner)
    monkeypatch.setattr(archive, planner,
                        lambda source, limits: plan(source, (limits[0], 1e9, 1e18)))
    with pytest.raises(DataError, match="more than 1,000,000 bytes when extracted"):
        place(archive_bytes(BIG, fmt), max_extracted_bytes=1e6)
    with pytest.raises(DataError, match="more than 10 members"):
        place(archive_bytes(MANY, fmt), max_members=10)
    assert_nothing_written(tmp_path)


def test_limits_allow_an_archive_within_them(place):
    dataset = place(tar_bytes(MANY), max_members=20, max_extracted_bytes=20 * len(JPEG))
    assert len(tree(dataset)) == 20


@pytest.mark.parametrize("mode", ["w:bz2", "w:xz"])
def test_other_tar_compressions(tmp_path, mode):
    archive = tmp_path / "pack.tar"
    archive.write_bytes(tar_bytes(GOOD, mode))
    dataset, _ = extract_dataset(archive, tmp_path / "raw")
    assert tree(dataset) == {"good/a.jpg", "good/b.jpg", "other/c.jpg"}


def test_format_comes_from_content_not_name(tmp_path):
    archive = tmp_path / "pack.tgz"
    archive.write_bytes(zip_bytes(GOOD))
    assert tree(extract_dataset(archive, tmp_path / "raw")[0]) == {"good/a.jpg", "good/b.jpg",
                                                              "other/c.jpg"}


def test_synthetic_tarball_and_given_name(tmp_path):
    archive = write_dataset(tmp_path / "download", classes=3, per_class=2, size=32,
                            top_folder=None)
    dataset, reading = extract_dataset(archive, tmp_path / "raw", name="shapes",
                                       label="http://x/y")
    assert dataset == tmp_path / "raw" / "shapes"
    assert list(reading.classes) == ["class_000", "class_001", "class_002"]


def test_previous_dest_replaced_only_on_success(place, tmp_path):
    old = tmp_path / "raw" / "old.txt"
    old.parent.mkdir()
    old.write_text("previous run")
    with pytest.raises(DataError):
        place(b"not an archive")
    assert old.read_text() == "previous run"
    place(tar_bytes(GOOD))
    assert tree(tmp_path / "raw") == {"pack/good/a.jpg", "pack/good/b.jpg", "pack/other/c.jpg"}


@pytest.mark.parametrize("file_name, stem", [
    ("flower_photos.tgz", "flower_photos"), ("cars.TAR.GZ", "cars"), ("v1.2.zip", "v1.2"),
    ("set.tar", "set"), ("set.tar.xz", "set"), ("download", "download"), (".tgz", "dataset"),
    ("", "dataset"), ("dir/sub/pets.zip", "pets"),
])
def test_archive_stem(file_name, stem):
    assert archive_stem(file_name) == stem


def test_real_flower_photos_sample(tmp_path):
    from conftest import real_flowers_or_skip

    dataset, reading = extract_dataset(real_flowers_or_skip(), tmp_path / "raw")
    assert reading.layout == "classes" and not reading.unlabeled
    assert dataset.name == "flower_photos"
    assert (dataset / "LICENSE.txt").is_file()
    counts = {p.name: len(list(p.iterdir())) for p in dataset.iterdir() if p.is_dir()}
    assert counts == dict.fromkeys(["daisy", "dandelion", "roses", "sunflowers", "tulips"], 40)
