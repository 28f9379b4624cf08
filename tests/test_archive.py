"""Safe extraction and layout normalisation of dataset archives, built in the tests."""

from __future__ import annotations

import gzip
import io
import random
import re
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from retrain import archive
from retrain.archive import archive_stem, class_folders, extract_dataset
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


@pytest.fixture
def place(tmp_path):
    """Write archive bytes to tmp_path and extract them to tmp_path/raw, beside a sentinel
    folder that a path-traversal attack would write into."""
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "secret.txt").write_text("untouched")

    def extract(data: bytes, name: str = "pack.tgz", **limits) -> Path:
        archive = tmp_path / name
        archive.write_bytes(data)
        return extract_dataset(archive, tmp_path / "raw", **limits)

    extract.sentinel = sentinel
    return extract


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


@pytest.mark.parametrize("fmt, planner", [("w:gz", "_plan_tar"), ("zip", "_plan_zip")])
def test_limits_enforced_while_extracting(place, tmp_path, monkeypatch, fmt, planner):
    """Should declared sizes ever get past the check before extraction, the bytes and members
    actually written are counted against the same limits."""
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


# --------------------------------------------------------------------------- layouts

# (id, entries, files expected under raw/); archives are named pack.<ext>.
LAYOUTS = [
    ("official layout", [d("flowers"), f("flowers/LICENSE.txt", b"CC-BY"),
                         f("flowers/roses/a.jpg"), f("flowers/tulips/b.jpg")],
     {"flowers/LICENSE.txt", "flowers/roses/a.jpg", "flowers/tulips/b.jpg"}),
    ("classes at root", [f("roses/a.jpg"), f("tulips/b.jpg")],
     {"pack/roses/a.jpg", "pack/tulips/b.jpg"}),
    ("./ prefixed names", [d("."), d("./roses"), f("./roses/a.jpg"), f("./tulips/b.jpg")],
     {"pack/roses/a.jpg", "pack/tulips/b.jpg"}),
    ("nested top folders", [f("outer/inner/roses/a.jpg"), f("outer/inner/tulips/b.jpg")],
     {"inner/roses/a.jpg", "inner/tulips/b.jpg"}),
    ("images nested in class folders", [f("roses/2019/a.jpg"), f("tulips/b.jpg")],
     {"pack/roses/2019/a.jpg", "pack/tulips/b.jpg"}),
    ("litter skipped", [f("flowers/roses/a.jpg"), f("flowers/roses/.DS_Store"),
                        f("flowers/.DS_Store"), f("__MACOSX/flowers/roses/._a.jpg"),
                        f("flowers/tulips/b.jpg"), f("flowers/tulips/Thumbs.db"),
                        f("flowers/.git/config")],
     {"flowers/roses/a.jpg", "flowers/tulips/b.jpg"}),
    ("train/val/test flattened", [f("train/roses/a.jpg"), f("train/tulips/b.jpg"),
                                  f("val/roses/a.jpg"), f("val/tulips/c.jpg"),
                                  f("test/roses/d.jpg"), f("train/labels.csv", b"x")],
     {"pack/roses/a.jpg", "pack/roses/val_a.jpg", "pack/roses/d.jpg", "pack/tulips/b.jpg",
      "pack/tulips/c.jpg"}),
    ("splits under a top folder", [f("cars/LICENSE.txt"), f("cars/train/audi/a.jpg"),
                                   f("cars/validation/audi/a.jpg"),
                                   f("cars/validation/bmw/b.jpg")],
     {"cars/LICENSE.txt", "cars/audi/a.jpg", "cars/audi/validation_a.jpg", "cars/bmw/b.jpg"}),
    ("classes named like splits", [f("train/a.jpg"), f("test/b.jpg")],
     {"pack/train/a.jpg", "pack/test/b.jpg"}),
    # Sets of the same class folders side by side are merged by class name; images outside
    # every class folder are set aside in .unlabeled/ (split lists them as excluded).
    ("kaggle training_set/test_set", [f("training_set/training_set/cats/cat.1.jpg"),
                                      f("training_set/training_set/cats/_DS_Store", b"x"),
                                      f("training_set/training_set/dogs/dog.1.jpg"),
                                      f("test_set/test_set/cats/cat.1.jpg"),
                                      f("test_set/test_set/dogs/dog.4001.jpg")],
     {"pack/cats/cat.1.jpg", "pack/cats/_DS_Store", "pack/cats/test_set_cat.1.jpg",
      "pack/dogs/dog.1.jpg", "pack/dogs/dog.4001.jpg"}),
    ("seg_train, seg_test and unlabeled seg_pred",
     [f("seg_train/seg_train/forest/1.jpg"), f("seg_train/seg_train/sea/2.jpg"),
      f("seg_test/seg_test/forest/3.jpg"), f("seg_test/seg_test/sea/4.jpg"),
      f("seg_pred/seg_pred/5.jpg"), f("seg_pred/seg_pred/6.jpg")],
     {"pack/forest/1.jpg", "pack/forest/3.jpg", "pack/sea/2.jpg", "pack/sea/4.jpg",
      "pack/.unlabeled/seg_pred/seg_pred/5.jpg", "pack/.unlabeled/seg_pred/seg_pred/6.jpg"}),
    ("two sets side by side", [f("set1/cats/a.jpg"), f("set1/dogs/b.jpg"), f("set2/cats/c.jpg"),
                               f("set2/dogs/d.jpg"), f("set2/birds/e.jpg")],
     {"pack/cats/a.jpg", "pack/cats/c.jpg", "pack/dogs/b.jpg", "pack/dogs/d.jpg",
      "pack/birds/e.jpg"}),
    ("train classes beside an unlabeled test folder",
     [f("pets/train/cats/a.jpg"), f("pets/train/dogs/b.jpg"), f("pets/test/1.jpg"),
      f("pets/test/2.jpg"), f("pets/LICENSE.txt")],
     {"pets/cats/a.jpg", "pets/dogs/b.jpg", "pets/.unlabeled/test/1.jpg",
      "pets/.unlabeled/test/2.jpg", "pets/LICENSE.txt"}),
    ("sets inside a set", [f("training_set/cats/a.jpg"), f("training_set/dogs/b.jpg"),
                           f("test_set/test_set/cats/c.jpg"), f("test_set/test_set/dogs/d.jpg"),
                           f("test_set/unlabeled/e.jpg"), f("test_set/notes.txt")],
     {"pack/cats/a.jpg", "pack/cats/c.jpg", "pack/dogs/b.jpg", "pack/dogs/d.jpg",
      "pack/.unlabeled/test_set/unlabeled/e.jpg"}),
    ("loose images in a set", [f("train/cats/a.jpg"), f("train/dogs/b.jpg"), f("train/x.jpg"),
                               f("test/cats/c.jpg"), f("test/dogs/d.jpg")],
     {"pack/cats/a.jpg", "pack/cats/c.jpg", "pack/dogs/b.jpg", "pack/dogs/d.jpg",
      "pack/.unlabeled/train/x.jpg"}),
    # Classes with subfolders of their own stay classes.
    ("classes holding splits", [f("cats/train/a.jpg"), f("cats/test/b.jpg"),
                                f("dogs/train/c.jpg"), f("dogs/test/d.jpg")],
     {"pack/cats/train/a.jpg", "pack/cats/test/b.jpg", "pack/dogs/train/c.jpg",
      "pack/dogs/test/d.jpg"}),
    ("classes holding one images/ folder each", [f("cats/images/a.jpg"), f("dogs/images/b.jpg")],
     {"pack/cats/images/a.jpg", "pack/dogs/images/b.jpg"}),
    ("classes sharing one subfolder name", [f("roses/misc/a.jpg"), f("roses/2019/b.jpg"),
                                            f("tulips/misc/c.jpg"), f("tulips/d.jpg")],
     {"pack/roses/misc/a.jpg", "pack/roses/2019/b.jpg", "pack/tulips/misc/c.jpg",
      "pack/tulips/d.jpg"}),
    ("hard link inside the archive", [f("flowers/roses/a.jpg"),
                                      hard("flowers/tulips/a.jpg", "flowers/roses/a.jpg")],
     {"flowers/roses/a.jpg", "flowers/tulips/a.jpg"}),
]
FORMATS = {"w:gz": "pack.tgz", "w:": "pack.tar", "zip": "pack.zip"}


def layout_cases():
    for case_id, entries, expected in LAYOUTS:
        for fmt, name in FORMATS.items():
            if fmt == "zip" and any(entry[0] == "hard" for entry in entries):
                continue
            yield pytest.param(entries, fmt, name, expected, id=f"{case_id}-{name}")


@pytest.mark.parametrize("entries, fmt, name, expected", layout_cases())
def test_layout(tmp_path, entries, fmt, name, expected):
    archive = tmp_path / name
    archive.write_bytes(archive_bytes(entries, fmt))
    dataset = extract_dataset(archive, tmp_path / "raw")
    assert tree(tmp_path / "raw") == expected
    assert dataset == tmp_path / "raw" / sorted(expected)[0].split("/")[0]


# Layouts that cannot be read as meant: (id, entries, first line of the error after the
# archive name, a line of the tree it shows).
UNREADABLE_LAYOUTS = [
    ("sets named like nothing", [f("kaggle/cats/a.jpg"), f("kaggle/dogs/b.jpg"),
                                 f("scraped/cats/c.jpg"), f("scraped/dogs/d.jpg")],
     r"cannot tell classes from sets of classes: kaggle/, scraped/ hold folders of the "
     r"same names \(cats, dogs\)$", "kaggle/: cats/ (1), dogs/ (1)"),
    ("classes with the same subfolders", [f("roses/2019/a.jpg"), f("roses/2020/b.jpg"),
                                          f("tulips/2019/c.jpg"), f("tulips/2020/d.jpg")],
     r"cannot tell classes from sets of classes: roses/, tulips/ hold .*\(2019, 2020\)$",
     "tulips/: 2019/ (1), 2020/ (1)"),
    ("a class beside sets", [f("train/cats/a.jpg"), f("train/dogs/b.jpg"), f("birds/c.jpg")],
     r"birds/ is neither a set of class folders nor a set of unlabeled images, next to "
     r"train/$", "birds/: 1 images"),
    ("a class with subfolders beside sets", [f("data/train/cats/a.jpg"),
                                             f("data/train/dogs/b.jpg"),
                                             f("data/extra/misc/c.jpg"),
                                             f("data/extra/misc/d.jpg")],
     r"extra/ is neither .*, next to train/$", "data/extra/: misc/ (2)"),
]


@pytest.mark.parametrize("entries, headline, tree_line",
                         [case[1:] for case in UNREADABLE_LAYOUTS],
                         ids=[case[0] for case in UNREADABLE_LAYOUTS])
def test_unreadable_layout_refused_with_the_tree_found(place, tmp_path, entries, headline,
                                                       tree_line):
    with pytest.raises(DataError) as info:
        place(tar_bytes(entries))
    first, *rest = str(info.value).splitlines()
    assert re.match(rf"{tmp_path}/pack\.tgz: {headline}", first), first
    assert rest[0] == "  found:" and f"    {tree_line}" in rest
    assert rest[-1].startswith("  expected: [top folder/]<class>/<images>, or sets")
    assert_nothing_written(tmp_path)


def test_tree_in_a_layout_error_is_cut_short(place):
    shops = [f(f"shop_{i:02}/{animal}/{j}.jpg") for i in range(12)
             for animal in ("cats", "dogs", "birds", "mice", "rats", "owls", "fish")
             for j in range(2)]
    with pytest.raises(DataError) as info:
        place(tar_bytes(shops))
    lines = str(info.value).splitlines()
    assert len(lines) == 12  # headline, found:, 8 folders, "... more", expected
    assert "    shop_00/: birds/ (2), cats/ (2), dogs/ (2), fish/ (2), mice/ (2), " \
        "2 more folders" in lines
    assert "    ... and 4 more folders" in lines


@pytest.mark.parametrize("mode", ["w:bz2", "w:xz"])
def test_other_tar_compressions(tmp_path, mode):
    archive = tmp_path / "pack.tar"
    archive.write_bytes(tar_bytes(GOOD, mode))
    dataset = extract_dataset(archive, tmp_path / "raw")
    assert tree(dataset) == {"good/a.jpg", "good/b.jpg", "other/c.jpg"}


def test_format_comes_from_content_not_name(tmp_path):
    archive = tmp_path / "pack.tgz"
    archive.write_bytes(zip_bytes(GOOD))
    assert tree(extract_dataset(archive, tmp_path / "raw")) == {"good/a.jpg", "good/b.jpg",
                                                              "other/c.jpg"}


def test_synthetic_tarball_and_given_name(tmp_path):
    archive = write_dataset(tmp_path / "download", classes=3, per_class=2, size=32,
                            top_folder=None)
    dataset = extract_dataset(archive, tmp_path / "raw", name="shapes", label="http://x/y")
    assert dataset == tmp_path / "raw" / "shapes"
    assert [p.name for p in class_folders(dataset)] == ["class_000", "class_001", "class_002"]


def test_previous_dest_replaced_only_on_success(place, tmp_path):
    old = tmp_path / "raw" / "old.txt"
    old.parent.mkdir()
    old.write_text("previous run")
    with pytest.raises(DataError):
        place(b"not an archive")
    assert old.read_text() == "previous run"
    place(tar_bytes(GOOD))
    assert tree(tmp_path / "raw") == {"pack/good/a.jpg", "pack/good/b.jpg", "pack/other/c.jpg"}


def test_class_folders_need_images(tmp_path):
    for name in ("roses/a.jpg", "notes/readme.txt", "empty/.keep", "deep/x/y.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(JPEG)
    assert [p.name for p in class_folders(tmp_path)] == ["deep", "roses"]


@pytest.mark.parametrize("file_name, stem", [
    ("flower_photos.tgz", "flower_photos"), ("cars.TAR.GZ", "cars"), ("v1.2.zip", "v1.2"),
    ("set.tar", "set"), ("set.tar.xz", "set"), ("download", "download"), (".tgz", "dataset"),
    ("", "dataset"), ("dir/sub/pets.zip", "pets"),
])
def test_archive_stem(file_name, stem):
    assert archive_stem(file_name) == stem


def test_real_flower_photos_sample(tmp_path):
    from conftest import real_flowers_or_skip

    dataset = extract_dataset(real_flowers_or_skip(), tmp_path / "raw")
    assert dataset.name == "flower_photos"
    assert (dataset / "LICENSE.txt").is_file()
    counts = {p.name: len(list(p.iterdir())) for p in class_folders(dataset)}
    assert counts == dict.fromkeys(["daisy", "dandelion", "roses", "sunflowers", "tulips"], 40)
