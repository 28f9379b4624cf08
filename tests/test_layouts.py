"""The layout reading (retrain.layout): a table of archive layouts, each with the files it
must give under raw/ (and the classes read), or the refusal it must give."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import unicodedata

import pytest
from test_archive import archive_bytes, assert_nothing_written, d, f, hard, tar_bytes, tree

from retrain.archive import extract_dataset
from retrain.errors import DataError
from retrain.layout import describe, set_rank

NFD_CAFE = unicodedata.normalize("NFD", "café")
NFC_CAFE = unicodedata.normalize("NFC", "café")

# (id, entries, params {layout, unlabeled}, files expected under raw/). Archives are named
# pack.<ext>: a dataset without a single top folder is named `pack`.
LAYOUTS = [
    # Class folders, as most archives hold them.
    ("official layout", [d("flowers"), f("flowers/LICENSE.txt", b"CC-BY"),
                         f("flowers/roses/a.jpg"), f("flowers/tulips/b.jpg")], {},
     {"flowers/LICENSE.txt", "flowers/roses/a.jpg", "flowers/tulips/b.jpg"}),
    ("classes at root", [f("roses/a.jpg"), f("tulips/b.jpg")], {},
     {"pack/roses/a.jpg", "pack/tulips/b.jpg"}),
    ("./ prefixed names", [d("."), d("./roses"), f("./roses/a.jpg"), f("./tulips/b.jpg")], {},
     {"pack/roses/a.jpg", "pack/tulips/b.jpg"}),
    ("nested top folders", [f("outer/inner/roses/a.jpg"), f("outer/inner/tulips/b.jpg")], {},
     {"inner/roses/a.jpg", "inner/tulips/b.jpg"}),
    ("deep wrappers", [f("a/b/c/d/flowers/roses/a.jpg"), f("a/b/c/d/flowers/tulips/b.jpg"),
                       f("a/README.txt", b"x")], {},
     {"flowers/roses/a.jpg", "flowers/tulips/b.jpg"}),
    ("a wrapper named like nothing but data", [f("images/cats/a.jpg"), f("images/dogs/b.jpg")],
     {}, {"images/cats/a.jpg", "images/dogs/b.jpg"}),
    ("images nested in class folders", [f("roses/2019/a.jpg"), f("tulips/b.jpg")], {},
     {"pack/roses/2019/a.jpg", "pack/tulips/b.jpg"}),
    ("litter skipped", [f("flowers/roses/a.jpg"), f("flowers/roses/.DS_Store"),
                        f("flowers/.DS_Store"), f("__MACOSX/flowers/roses/._a.jpg"),
                        f("flowers/tulips/b.jpg"), f("flowers/tulips/Thumbs.db"),
                        f("flowers/.git/config")], {},
     {"flowers/roses/a.jpg", "flowers/tulips/b.jpg"}),
    ("hard link inside the archive", [f("flowers/roses/a.jpg"),
                                      hard("flowers/tulips/a.jpg", "flowers/roses/a.jpg")], {},
     {"flowers/roses/a.jpg", "flowers/tulips/a.jpg"}),
    ("classes holding splits", [f("cats/train/a.jpg"), f("cats/test/b.jpg"),
                                f("dogs/train/c.jpg"), f("dogs/test/d.jpg")], {},
     {"pack/cats/train/a.jpg", "pack/cats/test/b.jpg", "pack/dogs/train/c.jpg",
      "pack/dogs/test/d.jpg"}),
    ("classes holding numbered sets", [f("cats/set1/a.jpg"), f("cats/set2/b.jpg"),
                                       f("dogs/set1/c.jpg"), f("dogs/set2/d.jpg")], {},
     {"pack/cats/set1/a.jpg", "pack/cats/set2/b.jpg", "pack/dogs/set1/c.jpg",
      "pack/dogs/set2/d.jpg"}),
    ("classes holding one images/ folder each", [f("cats/images/a.jpg"), f("dogs/images/b.jpg")],
     {}, {"pack/cats/images/a.jpg", "pack/dogs/images/b.jpg"}),
    ("classes sharing one subfolder name", [f("roses/misc/a.jpg"), f("roses/2019/b.jpg"),
                                            f("tulips/misc/c.jpg"), f("tulips/d.jpg")], {},
     {"pack/roses/misc/a.jpg", "pack/roses/2019/b.jpg", "pack/tulips/misc/c.jpg",
      "pack/tulips/d.jpg"}),
    # Real class names with a split or set word in them are classes.
    ("class names holding split words", [f("test_tube/a.jpg"), f("beaker/b.jpg"),
                                         f("train_station/c.jpg"), f("validation_error/e.jpg")],
     {}, {"pack/test_tube/a.jpg", "pack/beaker/b.jpg", "pack/train_station/c.jpg",
          "pack/validation_error/e.jpg"}),
    ("class names holding set words", [f("tea_set/a.jpg"), f("drum_set/b.jpg"),
                                       f("setter/c.jpg"), f("part_ok/d.jpg")], {},
     {"pack/tea_set/a.jpg", "pack/drum_set/b.jpg", "pack/setter/c.jpg", "pack/part_ok/d.jpg"}),
    # Images outside every class folder are set aside, never a class.
    ("loose images beside class folders", [f("cats/a.jpg"), f("dogs/b.jpg"), f("x.jpg")], {},
     {"pack/cats/a.jpg", "pack/dogs/b.jpg", "pack/.unlabeled/x.jpg"}),
    ("a loose image inside a single top folder", [f("ds/roses/a.jpg"), f("ds/tulips/b.jpg"),
                                                  f("ds/photo.jpg")], {},
     {"ds/roses/a.jpg", "ds/tulips/b.jpg", "ds/.unlabeled/photo.jpg"}),
    ("a folder named unlabeled beside the classes", [f("cats/a.jpg"), f("dogs/b.jpg"),
                                                     f("unlabeled/c.jpg"), f("unlabeled/d.jpg")],
     {}, {"pack/cats/a.jpg", "pack/dogs/b.jpg", "pack/.unlabeled/unlabeled/c.jpg",
          "pack/.unlabeled/unlabeled/d.jpg"}),
    ("kaggle test/ beside the classes, named unlabeled by the user",
     [f("pets/cats/a.jpg"), f("pets/dogs/b.jpg"), f("pets/test/1.jpg")], {"unlabeled": ["test"]},
     {"pets/cats/a.jpg", "pets/dogs/b.jpg", "pets/.unlabeled/test/1.jpg"}),
    ("a class named train, forced", [f("train/a.jpg"), f("bus/b.jpg"), f("car/c.jpg")],
     {"layout": "classes"}, {"pack/train/a.jpg", "pack/bus/b.jpg", "pack/car/c.jpg"}),
    # Sets of the same class folders are merged by class name.
    ("train/val/test merged", [f("train/roses/a.jpg"), f("train/tulips/b.jpg"),
                               f("val/roses/a.jpg"), f("val/tulips/c.jpg"),
                               f("test/roses/d.jpg"), f("train/labels.csv", b"x")], {},
     {"pack/roses/a.jpg", "pack/roses/val_a.jpg", "pack/roses/d.jpg", "pack/tulips/b.jpg",
      "pack/tulips/c.jpg"}),
    ("splits under a top folder", [f("cars/LICENSE.txt"), f("cars/train/audi/a.jpg"),
                                   f("cars/validation/audi/a.jpg"),
                                   f("cars/validation/bmw/b.jpg")], {},
     {"cars/LICENSE.txt", "cars/audi/a.jpg", "cars/audi/validation_a.jpg", "cars/bmw/b.jpg"}),
    ("splits under deep wrappers", [f("export/v2/data/train/cats/a.jpg"),
                                    f("export/v2/data/train/dogs/b.jpg"),
                                    f("export/v2/data/test/cats/c.jpg"),
                                    f("export/v2/data/test/dogs/d.jpg")], {},
     {"data/cats/a.jpg", "data/cats/c.jpg", "data/dogs/b.jpg", "data/dogs/d.jpg"}),
    ("sets whose classes are named part_*", [f("train/part_ok/a.jpg"), f("train/part_ng/b.jpg"),
                                             f("test/part_ok/c.jpg"), f("test/part_ng/d.jpg")],
     {}, {"pack/part_ok/a.jpg", "pack/part_ok/c.jpg", "pack/part_ng/b.jpg",
          "pack/part_ng/d.jpg"}),
    ("sets whose classes are named *_set", [f("train/tea_set/a.jpg"), f("train/drum_set/b.jpg"),
                                            f("test/tea_set/c.jpg"), f("test/drum_set/d.jpg")],
     {}, {"pack/tea_set/a.jpg", "pack/tea_set/c.jpg", "pack/drum_set/b.jpg",
          "pack/drum_set/d.jpg"}),
    ("sets whose classes are named set_N", [f("train/set_1/a.jpg"), f("train/set_2/b.jpg"),
                                            f("test/set_1/c.jpg"), f("test/set_2/d.jpg")], {},
     {"pack/set_1/a.jpg", "pack/set_1/c.jpg", "pack/set_2/b.jpg", "pack/set_2/d.jpg"}),
    ("capitalised and camelCase set names", [f("Training/glioma/a.jpg"), f("Training/none/b.jpg"),
                                             f("testSet/glioma/c.jpg"), f("testSet/none/d.jpg")],
     {}, {"pack/glioma/a.jpg", "pack/glioma/c.jpg", "pack/none/b.jpg", "pack/none/d.jpg"}),
    ("numbered folds", [f("fold1/a/1.jpg"), f("fold1/b/2.jpg"), f("fold2/a/3.jpg"),
                        f("fold2/b/4.jpg")], {},
     {"pack/a/1.jpg", "pack/a/3.jpg", "pack/b/2.jpg", "pack/b/4.jpg"}),
    ("two sets side by side", [f("set1/cats/a.jpg"), f("set1/dogs/b.jpg"), f("set2/cats/c.jpg"),
                               f("set2/dogs/d.jpg"), f("set2/birds/e.jpg")], {},
     {"pack/cats/a.jpg", "pack/cats/c.jpg", "pack/dogs/b.jpg", "pack/dogs/d.jpg",
      "pack/birds/e.jpg"}),
    ("one-class sets", [f("train/roses/a.jpg"), f("test/roses/b.jpg")], {},
     {"pack/roses/a.jpg", "pack/roses/b.jpg"}),
    ("kaggle training_set/test_set", [f("training_set/training_set/cats/cat.1.jpg"),
                                      f("training_set/training_set/cats/_DS_Store", b"x"),
                                      f("training_set/training_set/dogs/dog.1.jpg"),
                                      f("test_set/test_set/cats/cat.1.jpg"),
                                      f("test_set/test_set/dogs/dog.4001.jpg")], {},
     {"pack/cats/cat.1.jpg", "pack/cats/_DS_Store", "pack/cats/test_set_cat.1.jpg",
      "pack/dogs/dog.1.jpg", "pack/dogs/dog.4001.jpg"}),
    ("seg_train, seg_test and unlabeled seg_pred",
     [f("seg_train/seg_train/forest/1.jpg"), f("seg_train/seg_train/sea/2.jpg"),
      f("seg_test/seg_test/forest/3.jpg"), f("seg_test/seg_test/sea/4.jpg"),
      f("seg_pred/seg_pred/5.jpg"), f("seg_pred/seg_pred/6.jpg")], {},
     {"pack/forest/1.jpg", "pack/forest/3.jpg", "pack/sea/2.jpg", "pack/sea/4.jpg",
      "pack/.unlabeled/seg_pred/seg_pred/5.jpg", "pack/.unlabeled/seg_pred/seg_pred/6.jpg"}),
    ("train classes beside an unlabeled test folder",
     [f("pets/train/cats/a.jpg"), f("pets/train/dogs/b.jpg"), f("pets/test/1.jpg"),
      f("pets/test/2.jpg"), f("pets/LICENSE.txt")], {},
     {"pets/cats/a.jpg", "pets/dogs/b.jpg", "pets/.unlabeled/test/1.jpg",
      "pets/.unlabeled/test/2.jpg", "pets/LICENSE.txt"}),
    ("sets inside a set", [f("training_set/cats/a.jpg"), f("training_set/dogs/b.jpg"),
                           f("test_set/test_set/cats/c.jpg"), f("test_set/test_set/dogs/d.jpg"),
                           f("test_set/unlabeled/e.jpg"), f("test_set/notes.txt")], {},
     {"pack/cats/a.jpg", "pack/cats/c.jpg", "pack/dogs/b.jpg", "pack/dogs/d.jpg",
      "pack/.unlabeled/test_set/unlabeled/e.jpg"}),
    ("loose images in a set", [f("train/cats/a.jpg"), f("train/dogs/b.jpg"), f("train/x.jpg"),
                               f("test/cats/c.jpg"), f("test/dogs/d.jpg")], {},
     {"pack/cats/a.jpg", "pack/cats/c.jpg", "pack/dogs/b.jpg", "pack/dogs/d.jpg",
      "pack/.unlabeled/train/x.jpg"}),
    ("an unlabeled folder inside a set", [f("train/cats/a.jpg"), f("train/dogs/b.jpg"),
                                          f("train/unlabelled/x.jpg"), f("test/cats/c.jpg"),
                                          f("test/dogs/d.jpg")], {},
     {"pack/cats/a.jpg", "pack/cats/c.jpg", "pack/dogs/b.jpg", "pack/dogs/d.jpg",
      "pack/.unlabeled/train/unlabelled/x.jpg"}),
    ("a folder inside a set named unlabeled by the user",
     [f("train/cats/a.jpg"), f("train/dogs/b.jpg"), f("train/extra/x.jpg"),
      f("test/cats/c.jpg"), f("test/dogs/d.jpg")], {"unlabeled": ["train/extra"]},
     {"pack/cats/a.jpg", "pack/cats/c.jpg", "pack/dogs/b.jpg", "pack/dogs/d.jpg",
      "pack/.unlabeled/train/extra/x.jpg"}),
    ("sets named like nothing, forced", [f("kaggle/cats/a.jpg"), f("kaggle/dogs/b.jpg"),
                                         f("scraped/cats/c.jpg"), f("scraped/dogs/d.jpg")],
     {"layout": "sets"}, {"pack/cats/a.jpg", "pack/cats/c.jpg", "pack/dogs/b.jpg",
                          "pack/dogs/d.jpg"}),
    ("classes with the same subfolders, forced", [f("roses/2019/a.jpg"), f("roses/2020/b.jpg"),
                                                  f("tulips/2019/c.jpg"), f("tulips/2020/d.jpg")],
     {"layout": "classes"}, {"pack/roses/2019/a.jpg", "pack/roses/2020/b.jpg",
                             "pack/tulips/2019/c.jpg", "pack/tulips/2020/d.jpg"}),
    # One class spelled two ways across sets is one class.
    ("one class in two Unicode forms", [f(f"train/{NFC_CAFE}/a.jpg"), f("train/tea/b.jpg"),
                                        f(f"test/{NFD_CAFE}/c.jpg"), f("test/tea/d.jpg")], {},
     {f"pack/{NFC_CAFE}/a.jpg", f"pack/{NFC_CAFE}/c.jpg", "pack/tea/b.jpg", "pack/tea/d.jpg"}),
    ("one class in two cases", [f("train/Cats/a.jpg"), f("train/Dogs/b.jpg"),
                                f("test/cats/c.jpg"), f("test/dogs/d.jpg")], {},
     {"pack/Cats/a.jpg", "pack/Cats/c.jpg", "pack/Dogs/b.jpg", "pack/Dogs/d.jpg"}),
    ("sibling folders in two cases", [f("Cats/a.jpg"), f("cats/b.jpg"), f("dogs/c.jpg")], {},
     {"pack/Cats/a.jpg", "pack/Cats/b.jpg", "pack/dogs/c.jpg"}),
]
FORMATS = {"w:gz": "pack.tgz", "w:": "pack.tar", "zip": "pack.zip"}


def layout_cases():
    for case_id, entries, params, expected in LAYOUTS:
        for fmt, name in FORMATS.items():
            if fmt == "zip" and any(entry[0] == "hard" for entry in entries):
                continue
            yield pytest.param(entries, params, fmt, name, expected, id=f"{case_id}-{name}")


@pytest.mark.parametrize("entries, params, fmt, name, expected", layout_cases())
def test_layout(tmp_path, entries, params, fmt, name, expected):
    archive = tmp_path / name
    archive.write_bytes(archive_bytes(entries, fmt))
    dataset, reading = extract_dataset(archive, tmp_path / "raw", **params)
    assert tree(tmp_path / "raw") == expected
    assert dataset == tmp_path / "raw" / sorted(expected)[0].split("/")[0]
    # The reading names exactly the class folders the dataset holds, with their counts.
    classes = {p.name: sum(1 for x in p.rglob("*") if x.suffix == ".jpg")
               for p in dataset.iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert reading.classes == classes
    aside = sum(1 for p in (dataset / ".unlabeled").rglob("*") if p.is_file())
    assert sum(a.images for a in reading.unlabeled) == aside


# Layouts read two ways, or no way: (id, entries, params, first line of the error after the
# archive name, a line of the tree it shows).
REFUSED = [
    ("sets named like nothing", [f("kaggle/cats/a.jpg"), f("kaggle/dogs/b.jpg"),
                                 f("scraped/cats/c.jpg"), f("scraped/dogs/d.jpg")], {},
     r"cannot tell classes from sets of classes: kaggle/, scraped/ hold folders of the "
     r"same names \(cats, dogs\)$", "kaggle/: cats/ (1), dogs/ (1)"),
    ("classes with the same subfolders", [f("roses/2019/a.jpg"), f("roses/2020/b.jpg"),
                                          f("tulips/2019/c.jpg"), f("tulips/2020/d.jpg")], {},
     r"cannot tell classes from sets of classes: roses/, tulips/ hold .*\(2019, 2020\)$",
     "tulips/: 2019/ (1), 2020/ (1)"),
    ("a class beside sets", [f("train/cats/a.jpg"), f("train/dogs/b.jpg"), f("birds/c.jpg")], {},
     r"birds/ holds images directly, next to the sets train/: a class of its own, or "
     r"unlabeled images\?$", "birds/: 1 images"),
    ("a class with subfolders beside sets", [f("data/train/cats/a.jpg"),
                                             f("data/train/dogs/b.jpg"),
                                             f("data/extra/misc/c.jpg"),
                                             f("data/extra/misc/d.jpg")], {},
     r"extra/ is not named as a set but holds folders, next to the sets train/",
     "data/extra/: misc/ (2)"),
    ("kaggle test/ of loose images beside the classes",
     [f("pets/cats/a.jpg"), f("pets/dogs/b.jpg"), f("pets/test/1.jpg"), f("pets/test/2.jpg")],
     {}, r"test/ is named as a split and holds images directly, beside the class folders "
         r"cats/, dogs/: a class, or unlabeled images\?$", "pets/test/: 2 images"),
    ("a flat pred/ beside the classes", [f("cats/a.jpg"), f("dogs/b.jpg"), f("pred/c.jpg")], {},
     r"pred/ is named as a split", "pred/: 1 images"),
    ("a class named train beside other classes", [f("train/a.jpg"), f("bus/b.jpg"),
                                                  f("car/c.jpg")], {},
     r"train/ is named as a split and holds images directly, beside the class folders bus/, "
     r"car/", "train/: 1 images"),
    ("splits of loose images only", [f("train/a.jpg"), f("test/b.jpg")], {},
     r"test/, train/ are named as splits and hold images directly, and no folder here is "
     r"named as a class: classes, or unlabeled images\?$", "train/: 1 images"),
    ("kaggle dogs-vs-cats, labels in file names", [f("train/cat.1.jpg"), f("train/dog.1.jpg"),
                                                   f("test1/1.jpg")], {},
     r"test1/, train/ are named as splits", "test1/: 1 images"),
    ("a split-named folder of loose images inside a set",
     [f("train/cats/a.jpg"), f("train/dogs/b.jpg"), f("train/test/x.jpg"),
      f("test/cats/c.jpg"), f("test/dogs/d.jpg")], {},
     r"train/test/ is named as a split and holds images directly, beside the class folders "
     r"cats/, dogs/", "train/: cats/ (1), dogs/ (1), test/ (1)"),
]


@pytest.mark.parametrize("entries, params, headline, tree_line",
                         [case[1:] for case in REFUSED], ids=[case[0] for case in REFUSED])
def test_unreadable_layout_refused_with_the_tree_and_params(place, tmp_path, entries, params,
                                                           headline, tree_line):
    with pytest.raises(DataError) as info:
        place(tar_bytes(entries), **params)
    first, *rest = str(info.value).splitlines()
    assert re.match(rf"{tmp_path}/pack\.tgz: {headline}", first), first
    assert rest[0] == "  found:" and f"    {tree_line}" in rest, rest
    assert rest[-2].startswith("  expected: [top folder/]<class>/<images>, or sets")
    assert "data.layout: classes" in rest[-1] and "data.unlabeled" in rest[-1]
    assert_nothing_written(tmp_path)


def test_unlabeled_param_naming_no_folder_is_refused(place, tmp_path):
    with pytest.raises(DataError, match=r"data.unlabeled names tset, which is not a folder of "
                                        r"images in the archive \(found: cats/, dogs/"):
        place(tar_bytes([f("cats/a.jpg"), f("dogs/b.jpg"), f("test/c.jpg")]),
              unlabeled=["tset"])
    assert_nothing_written(tmp_path)


def test_tree_in_a_layout_error_is_cut_short(place):
    shops = [f(f"shop_{i:02}/{animal}/{j}.jpg") for i in range(12)
             for animal in ("cats", "dogs", "birds", "mice", "rats", "owls", "fish")
             for j in range(2)]
    with pytest.raises(DataError) as info:
        place(tar_bytes(shops))
    lines = str(info.value).splitlines()
    assert len(lines) == 13  # headline, found:, 8 folders, "... more", expected, params
    assert "    shop_00/: birds/ (2), cats/ (2), dogs/ (2), fish/ (2), mice/ (2), " \
        "2 more folders" in lines
    assert "    ... and 4 more folders" in lines


@pytest.mark.parametrize("name, rank", [
    ("train", 2), ("Validation", 2), ("seg_test", 2), ("test_images", 2), ("trainSet", 2),
    ("Test Set 2", 2), ("unlabeled", 2), ("set1", 1), ("part_2", 1), ("fold-3", 1),
    ("test_tube", 0), ("tea_set", 0), ("part_ok", 0), ("setter", 0), ("images", 0), ("2019", 0),
    ("café", 0),
])
def test_set_rank_reads_only_names_made_of_split_or_set_words(name, rank):
    assert set_rank(name) == rank


def test_reading_is_printed_and_notes_merged_spellings(tmp_path):
    archive = tmp_path / "pack.tgz"
    archive.write_bytes(tar_bytes([f("train/Cats/a.jpg"), f("train/dogs/b.jpg"),
                                   f("train/x.jpg"), f("test/cats/c.jpg"), f("test/dogs/d.jpg"),
                                   f("pred/1.jpg"), f("pred/2.jpg")]))
    _, reading = extract_dataset(archive, tmp_path / "raw")
    assert describe(reading, "pack.tgz") == [
        "read pack.tgz as 2 sets of the same class folders, merged by class name "
        "(data.layout: auto)",
        "  sets merged: train/ (3), test/ (2)",
        "  classes (2): Cats 2, dogs 2",
        "  set aside as unlabeled: pred/ (2: a set with no class folders); "
        "train/ (1: loose in a set, beside its class folders)",
        "  note: test/cats/ merged into Cats/ (the same name but for case or Unicode form)",
    ]


def test_fetch_stage_prints_and_stores_the_reading(tmp_path):
    """The stage script: one short block on stdout, and data/layout.json."""
    import hashlib

    import yaml
    from conftest import REPO

    archive = tmp_path / "pets.tgz"
    archive.write_bytes(tar_bytes([f("pets/train/cats/a.jpg"), f("pets/train/dogs/b.jpg"),
                                   f("pets/test/1.jpg")]))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"] |= {"url": str(archive),
                       "sha256": hashlib.sha256(archive.read_bytes()).hexdigest()}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    run = subprocess.run([sys.executable, str(REPO / "stages" / "fetch.py"), "--out", "raw",
                          "--layout", "layout.json"], cwd=tmp_path, capture_output=True,
                         text=True, check=True)
    assert run.stdout.splitlines()[:4] == [
        "fetch: read pets.tgz as one set of class folders under pets/ (data.layout: auto)",
        "fetch:   sets merged: train/ (2)",
        "fetch:   classes (2): cats 1, dogs 1",
        "fetch:   set aside as unlabeled: test/ (1: a set with no class folders)",
    ]
    stored = json.loads((tmp_path / "layout.json").read_text())
    assert stored["layout"] == "sets" and stored["classes"] == {"cats": 1, "dogs": 1}
    assert stored["unlabeled"] == [{"folder": "test/", "images": 1,
                                    "why": "a set with no class folders"}]


def test_name_that_is_not_utf8_is_refused_before_extraction(place, tmp_path):
    latin1 = b"photos/caf\xe9/a.jpg".decode("utf-8", "surrogateescape")
    with pytest.raises(DataError, match=r"'photos/caf\ufffd/a.jpg' has a name that is not "
                                        r"UTF-8 .*`convmv -f latin1 -t utf8"):
        place(tar_bytes([f("photos/cats/a.jpg"), f(latin1)]))
    assert_nothing_written(tmp_path)
