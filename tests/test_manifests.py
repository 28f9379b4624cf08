import os
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import REPO
from hypothesis import given, settings
from hypothesis import strategies as st

from retrain.errors import DataError, ParamsError
from retrain.manifests import (
    assign_splits,
    build_manifests,
    data_metrics,
    read_split,
    write_manifests,
)

SPLIT = {"val_fraction": 0.2, "test_fraction": 0.1, "seed": 7}


def dataset(raw):
    return next(raw.iterdir())


def test_manifests_are_byte_identical_across_runs(class_tree, tmp_path):
    for run in ("a", "b"):
        write_manifests(build_manifests(class_tree, **SPLIT), tmp_path / run)
    for name in ("train.csv", "val.csv", "test.csv", "classes.txt", "excluded.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_splits_are_stratified_disjoint_and_complete(class_tree):
    manifests = build_manifests(class_tree, **SPLIT)
    frames = manifests.splits
    assert manifests.classes == ["class_000", "class_001", "class_002"]
    for frame in frames.values():
        assert (frame["label_index"] == frame["label"].map(manifests.classes.index)).all()
    # 12 per class: val 0.2 of 12 ~ 2.4, test 0.1 of the rest ~ 1, never a class left out
    for name, frame in frames.items():
        counts = frame["label"].value_counts()
        assert set(counts.index) == set(manifests.classes), name
    all_paths = [p for f in frames.values() for p in f["path"]]
    assert len(all_paths) == len(set(all_paths)) == 36
    # scikit-learn rounds the held-out share up: ceil(0.2 * 36), then ceil(0.1 * 28)
    assert (len(frames["val"]), len(frames["test"]), len(frames["train"])) == (8, 3, 25)
    assert list(frames["train"].columns) == ["path", "label", "label_index", "sha256",
                                             "width", "height"]
    assert (frames["train"]["width"] == 32).all()


def test_seed_changes_the_split(class_tree):
    a = build_manifests(class_tree, **SPLIT).splits["val"]["path"].tolist()
    b = build_manifests(class_tree, **{**SPLIT, "seed": 8}).splits["val"]["path"].tolist()
    assert a != b


def test_duplicates_stay_together_and_cross_class_copies_are_excluded(class_tree):
    root = dataset(class_tree)
    first = sorted((root / "class_000").iterdir())
    for i in range(3):  # three identical copies within one class
        shutil.copy(first[i], root / "class_000" / f"copy_{i}.jpg")
    shutil.copy(first[5], root / "class_001" / "misfiled.jpg")  # same bytes, other class
    manifests = build_manifests(class_tree, **SPLIT)
    split_of = {p: name for name, f in manifests.splits.items() for p in f["path"]}
    for i in range(3):
        original = first[i].relative_to(class_tree).as_posix()
        copy = f"{root.name}/class_000/copy_{i}.jpg"
        assert split_of[original] == split_of[copy]
    excluded = dict(zip(manifests.excluded["path"], manifests.excluded["reason"]))
    assert excluded[f"{root.name}/class_001/misfiled.jpg"] == \
        "identical file under classes class_000, class_001"
    assert first[5].relative_to(class_tree).as_posix() in excluded
    assert data_metrics(manifests)["excluded"]["cross_class_duplicates"] == 2


def test_bad_files_are_excluded_with_a_reason(class_tree):
    folder = dataset(class_tree) / "class_002"
    good = sorted(folder.iterdir())[0].read_bytes()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "notes.jpg").write_text("this is text")
    (folder / "readme.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0\0")
    manifests = build_manifests(class_tree, **SPLIT)
    reasons = dict(zip(manifests.excluded["path"].str.rsplit("/", n=1).str[-1],
                       manifests.excluded["reason"]))
    assert set(reasons) == {"empty.jpg", "truncated.jpg", "notes.jpg", "readme.txt"}
    assert reasons["readme.txt"] == "not an image file name"
    assert "cannot decode" in reasons["truncated.jpg"] or "image" in reasons["truncated.jpg"]
    metrics = data_metrics(manifests)
    assert metrics["excluded"] == {"total": 4, "cross_class_duplicates": 0,
                                   "prefiltered": 0, "unselected_class": 0, "not_image_files": 1,
                                   "unsupported_formats": 0, "bad_file_names": 0,
                                   "unlabeled_images": 0, "user_excluded": 0,
                                   "unreadable_images": 3}
    assert metrics["empty_class_folders"] == 0


def test_unsupported_format_is_excluded_in_the_loader_s_words(class_tree):
    from PIL import Image

    from retrain.images import unsupported_format

    Image.new("RGB", (8, 8)).save(dataset(class_tree) / "class_000" / "scan.tiff")
    manifests = build_manifests(class_tree, **SPLIT)
    assert manifests.excluded["reason"].tolist() == [unsupported_format("TIFF")]
    assert data_metrics(manifests)["excluded"]["unsupported_formats"] == 1


def test_sets_of_classes_beside_unlabeled_images_give_the_inner_classes(tmp_path):
    """pets/train/{cats,dogs} beside an unlabeled pets/test/ (as fetch extracts it): the
    classes are cats and dogs, and every unlabeled image is excluded with its reason."""
    import io
    import tarfile

    import numpy as np

    from retrain.archive import extract_dataset
    from retrain.synthetic import draw_image, jpeg_bytes

    rng = np.random.default_rng(0)
    members = {f"pets/train/{name}/{i}.jpg": draw_image(label, 32, rng)
               for label, name in enumerate(["cats", "dogs"]) for i in range(12)}
    members |= {f"pets/test/{i}.jpg": draw_image(i % 2, 32, rng) for i in range(3)}
    archive = tmp_path / "pets.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, image in members.items():
            data = jpeg_bytes(image)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    extract_dataset(archive, tmp_path / "raw")
    manifests = build_manifests(tmp_path / "raw", **SPLIT)
    assert manifests.classes == ["cats", "dogs"]
    assert manifests.excluded.to_dict("records") == [
        {"path": f"pets/.unlabeled/test/{i}.jpg",
         "reason": "unlabeled image (not inside a class folder)"} for i in range(3)]
    assert data_metrics(manifests)["excluded"]["unlabeled_images"] == 3


def test_image_loose_in_the_dataset_root_is_excluded_as_unlabeled(class_tree):
    image = sorted((dataset(class_tree) / "class_000").iterdir())[0]
    shutil.copy(image, dataset(class_tree) / "cover.jpg")
    manifests = build_manifests(class_tree, **SPLIT)
    assert manifests.excluded.to_dict("records") == [
        {"path": "synthetic_photos/cover.jpg",
         "reason": "unlabeled image (not inside a class folder)"}]
    assert data_metrics(manifests)["excluded"]["unlabeled_images"] == 1


def test_file_name_that_is_not_utf8_is_excluded_and_written_readably(class_tree, tmp_path):
    folder = dataset(class_tree) / "class_000"
    source = sorted(folder.iterdir())[0]
    latin1 = os.fsdecode(bytes(folder) + b"/caf\xe9.jpg")  # as tar extracts a Latin-1 name
    source.rename(latin1)
    manifests = build_manifests(class_tree, **SPLIT)
    assert manifests.excluded.to_dict("records") == [
        {"path": "synthetic_photos/class_000/caf\ufffd.jpg", "reason": "file name is not UTF-8"}]
    assert data_metrics(manifests)["excluded"]["bad_file_names"] == 1
    write_manifests(manifests, tmp_path / "manifests")  # UTF-8 CSVs, no encoding error
    assert "caf\ufffd.jpg" in (tmp_path / "manifests" / "excluded.csv").read_text()


@pytest.mark.parametrize("name", ["a\nb", "tab\there", "line\u2028separator"])
def test_class_folder_with_a_control_character_is_refused(class_tree, name):
    dataset(class_tree).joinpath("class_001").rename(dataset(class_tree) / name)
    with pytest.raises(DataError, match=r"class folder .* cannot be a class label"):
        build_manifests(class_tree, **SPLIT)


def test_class_folder_without_a_usable_image_is_counted_and_named(class_tree, tmp_path):
    for path in (dataset(class_tree) / "class_002").iterdir():
        path.write_bytes(b"not a jpeg")
    manifests = build_manifests(class_tree, **SPLIT)
    assert manifests.classes == ["class_000", "class_001"]
    assert manifests.empty_classes == ["class_002"]
    assert data_metrics(manifests)["empty_class_folders"] == 1


@pytest.mark.parametrize("selection, message", [
    ({"min_images_per_class": 100}, "no class is left by split.min_images_per_class=100 and "
                                    "split.top_classes=0"),
    ({"top_classes": 1}, r"only one class \(class_000\) is left by "
                         "split.min_images_per_class=0 and split.top_classes=1"),
])
def test_class_selection_that_leaves_too_few_classes_names_the_params(class_tree, selection,
                                                                      message):
    with pytest.raises(DataError, match=message):
        build_manifests(class_tree, **SPLIT, **selection)


def test_nested_folders_belong_to_their_class(class_tree):
    folder = dataset(class_tree) / "class_001"
    (folder / "more" / "deeper").mkdir(parents=True)
    source = sorted(folder.glob("*.jpg"))[0]
    source.rename(folder / "more" / "deeper" / "moved é.jpg")
    manifests = build_manifests(class_tree, **SPLIT)
    rows = [r for f in manifests.splits.values() for r in f.itertuples()
            if r.path.endswith("moved é.jpg")]
    assert len(rows) == 1 and rows[0].label == "class_001"


def test_class_too_small_is_named(class_tree):
    folder = dataset(class_tree) / "class_001"
    for path in sorted(folder.iterdir())[2:]:
        path.unlink()
    with pytest.raises(DataError, match="class 'class_001' has 2 distinct image"):
        build_manifests(class_tree, **SPLIT)
    # ...and min_images_per_class drops it instead
    manifests = build_manifests(class_tree, **SPLIT, min_images_per_class=3)
    assert manifests.classes == ["class_000", "class_002"]
    assert data_metrics(manifests)["excluded"]["unselected_class"] == 2


def test_top_classes_keeps_the_most_frequent(class_tree):
    folder = dataset(class_tree) / "class_000"
    for path in sorted(folder.iterdir())[:4]:
        path.unlink()
    manifests = build_manifests(class_tree, **SPLIT, top_classes=2)
    assert manifests.classes == ["class_001", "class_002"]


def test_empty_class_folder_and_no_classes(class_tree, tmp_path):
    (dataset(class_tree) / "empty_class").mkdir()
    assert "empty_class" not in build_manifests(class_tree, **SPLIT).classes
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        build_manifests(tmp_path / "nothing", **SPLIT)


@pytest.mark.slow
def test_split_stage_on_the_real_flower_sample(tmp_path):
    import tarfile

    from conftest import real_flowers_or_skip

    with tarfile.open(real_flowers_or_skip()) as tar:
        tar.extractall(tmp_path / "raw", filter="data")
    (tmp_path / "params.yaml").write_bytes((REPO / "params.yaml").read_bytes())
    subprocess.run([sys.executable, REPO / "stages" / "split.py", "--raw", "raw", "--out",
                    "manifests", "--metrics", "data", "--details", "details.json"],
                   cwd=tmp_path, check=True)
    assert {path.name: yaml.safe_load(path.read_text()) for path in
            (tmp_path / "data").iterdir()} == {"included.json": {"classes": 5, "images": 200},
                                              "excluded.json": {"images": 0}}
    metrics = yaml.safe_load((tmp_path / "details.json").read_text())
    assert [metrics["images"][s]["total"] for s in ("train", "val", "test")] == [144, 40, 16]
    for label in ("daisy", "dandelion", "roses", "sunflowers", "tulips"):
        assert metrics["images"]["val"][label] == 8
        assert metrics["images"]["test"][label] in (3, 4)
        assert metrics["images"]["train"][label] in (28, 29)
    assert len(read_split(tmp_path / "manifests", "test")) == 16


def extracted_tree(tmp_path, name: str, **dataset_args):
    """raw/<dataset>/<class>/*.jpg from a generated tarball."""
    import tarfile

    from retrain.synthetic import write_dataset

    tarball = write_dataset(tmp_path / f"{name}.tgz", **dataset_args)
    raw = tmp_path / name
    with tarfile.open(tarball) as tar:
        tar.extractall(raw, filter="data")
    return raw


def split_of_paths(manifests) -> dict[str, str]:
    return {path: name for name, frame in manifests.splits.items() for path in frame["path"]}


@pytest.fixture(scope="module")
def lopsided_tree(tmp_path_factory):
    """Classes of 200, 200 and 3 images: stratification alone leaves the small one out of a
    split."""
    return extracted_tree(tmp_path_factory.mktemp("lopsided"), "raw", classes=3,
                          per_class=[200, 200, 3], size=16, seed=3)


@pytest.mark.parametrize("method", ["stratified", "hash"])
@pytest.mark.parametrize("val_fraction, test_fraction", [(0.2, 0.1), (0.2, 0.8)])
def test_every_class_gets_an_image_in_every_split(lopsided_tree, method, val_fraction,
                                                  test_fraction):
    # The default fractions used to give the 3-image class no test image; 0.2/0.8 no train.
    manifests = build_manifests(lopsided_tree, val_fraction=val_fraction,
                                test_fraction=test_fraction, seed=42, method=method)
    counts = data_metrics(manifests)["images"]
    for name in ("train", "val", "test"):
        assert counts[name]["class_002"] >= 1, (name, counts)
    assert sum(counts[name]["class_002"] for name in counts) == 3
    # The move is reported, naming the class (the split stage prints these notes).
    assert any("class 'class_002' (3 images)" in note for note in manifests.top_ups)
    assert not any("class_000" in note or "class_001" in note for note in manifests.top_ups)


@pytest.mark.parametrize("val_fraction, test_fraction, message", [
    (0.1, 0.1, "split.val_fraction=0.1 and split.test_fraction=0.1 give val 6 of 60 distinct "
               "images, fewer than the 10 classes .*: raise split.val_fraction"),
    (0.3, 0.1, "split.val_fraction=0.3 and split.test_fraction=0.1 give test 5 of 60 distinct "
               "images, fewer than the 10 classes .*: raise split.test_fraction"),
    (0.6, 0.7, "split.val_fraction=0.6 and split.test_fraction=0.7 give train 7 of 60 "
               "distinct images, .*: lower split.val_fraction or split.test_fraction"),
])
def test_impossible_fractions_name_the_params_and_values(val_fraction, test_fraction, message):
    rows = [{"sha256": f"{label}-{i}", "label": label} for label in "abcdefghij"
            for i in range(6)]
    with pytest.raises(ParamsError, match=message) as error:
        assign_splits(rows, val_fraction, test_fraction, seed=42)
    assert "train_size" not in str(error.value) and "test_size" not in str(error.value)


def test_hash_split_keeps_every_earlier_image_where_it_was(tmp_path):
    raw = extracted_tree(tmp_path, "raw", classes=3, per_class=20, size=24, seed=1)
    hashed = {"val_fraction": 0.3, "test_fraction": 0.3, "seed": 5, "method": "hash"}
    stratified = {**hashed, "method": "stratified"}
    before = build_manifests(raw, **hashed)
    before_stratified = split_of_paths(build_manifests(raw, **stratified))
    # A new data version: 10 more images per class.
    more = extracted_tree(tmp_path, "more", classes=3, per_class=10, size=24, seed=2)
    for image in dataset(more).glob("*/*.jpg"):
        image.rename(dataset(raw) / image.parent.name / f"new_{image.name}")
    after = build_manifests(raw, **hashed)

    assert before.top_ups == [] and after.top_ups == []  # pure hash draws on both versions
    old, new = split_of_paths(before), split_of_paths(after)
    assert len(new) == len(old) + 30
    assert {path: new[path] for path in old} == old
    # What the hash method is for: a stratified split moves earlier images.
    new_stratified = split_of_paths(build_manifests(raw, **stratified))
    assert {path: new_stratified[path] for path in old} != before_stratified


def test_hash_split_is_seeded_and_keeps_identical_files_together(class_tree):
    hashed = {"val_fraction": 0.3, "test_fraction": 0.3, "method": "hash"}
    root = dataset(class_tree)
    first = sorted((root / "class_000").iterdir())[0]
    shutil.copy(first, root / "class_000" / "copy.jpg")
    a = split_of_paths(build_manifests(class_tree, **hashed, seed=1))
    b = split_of_paths(build_manifests(class_tree, **hashed, seed=2))
    assert a != b
    original = first.relative_to(class_tree).as_posix()
    assert a[original] == a[f"{root.name}/class_000/copy.jpg"]


def run_split_stage(workspace, raw, **split):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["split"].update(split)
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    return subprocess.run([sys.executable, REPO / "stages" / "split.py", "--raw", raw, "--out",
                           "manifests", "--metrics", "data", "--details",
                           "details.json"], cwd=workspace,
                          capture_output=True, text=True, env={**os.environ,
                                                              "PYTHONPATH": str(REPO / "src")})


def test_split_stage_stops_on_impossible_fractions_with_one_line(class_tree, tmp_path):
    result = run_split_stage(tmp_path, class_tree, val_fraction=0.05)
    assert result.returncode == 2  # a params error
    assert result.stderr.strip().splitlines() == [
        "error: split.val_fraction=0.05 and split.test_fraction=0.1 give val 2 of 36 distinct "
        "images, fewer than the 3 classes (each split needs one image per class): raise "
        "split.val_fraction"]
    assert not (tmp_path / "manifests").exists() and not (tmp_path / "data").exists()


def test_split_stage_notes_each_image_it_moves(lopsided_tree, tmp_path):
    result = run_split_stage(tmp_path, lopsided_tree)
    assert result.returncode == 0, result.stderr
    assert "split: note: class 'class_002' (3 images) drew 0 for test: moved one image there " \
           "from train" in result.stderr


def test_a_seed_keeps_its_stratified_split_when_no_class_needs_a_top_up():
    # Two seeded scikit-learn draws, validation from all, test from the rest in the order the
    # first draw returned it: a seed's split stays the one earlier versions made, so their
    # test metrics stay paired with today's.
    from sklearn.model_selection import train_test_split

    rows = [{"sha256": f"{label}-{i:02d}", "label": label} for label in "abcde"
            for i in range(40)]
    split_of, notes = assign_splits(rows, 0.2, 0.1, seed=42)

    groups = sorted((row["sha256"], row["label"]) for row in rows)
    digests, labels = [d for d, _ in groups], [label for _, label in groups]
    rest, val, rest_labels, _ = train_test_split(digests, labels, test_size=0.2,
                                                 stratify=labels, random_state=42)
    train, test = train_test_split(rest, test_size=0.1, stratify=rest_labels, random_state=42)
    assert notes == []
    assert split_of == {**dict.fromkeys(train, "train"), **dict.fromkeys(val, "val"),
                        **dict.fromkeys(test, "test")}


@pytest.mark.parametrize("file_name, text, message", [
    ("exclude.txt", "data/raw/{path}\n", r"exclude.txt:1: data/raw/.* matches no image"),
    ("exclude.txt", "# removed since\n{digest_typo}\n", r"exclude.txt:2: 0+ matches no image"),
    ("relabel.csv", "sha256,class\n{digest_typo},class_001\n",
     r"relabel.csv:2: 0+ is the sha256 of no image"),
])
def test_a_user_edit_that_matches_no_image_stops_split(class_tree, tmp_path, file_name, text,
                                                        message):
    """A line that names no image would look like a decision taken and do nothing."""
    from retrain.manifests import read_user_edits

    first = build_manifests(class_tree, **SPLIT).splits["train"].iloc[0]
    edits = {"exclude.txt": "", "relabel.csv": "sha256,class\n"}
    edits[file_name] = text.format(path=first["path"], digest_typo="0" * 64)
    for name, content in edits.items():
        (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        build_manifests(class_tree, **SPLIT, user_edits=read_user_edits(
            tmp_path / "exclude.txt", tmp_path / "relabel.csv"))


def test_a_near_duplicate_group_across_two_classes_splits_per_class(class_tree):
    """A re-encoded copy filed under another class: grouping keeps each class's share of
    the group together, and every class still gets an image in every split."""
    from PIL import Image

    dataset = next(class_tree.iterdir())
    source = sorted((dataset / "class_000").glob("*.jpg"))[0]
    with Image.open(source) as image:
        image.save(dataset / "class_001" / "copy_of_class_000.jpg", quality=70)
    for method in ("stratified", "hash"):
        manifests = build_manifests(class_tree, **{**SPLIT, "method": method},
                                    group_near_duplicates=True)
        for frame in manifests.splits.values():
            assert set(frame["label"]) == set(manifests.classes)


# --- near-duplicate keys: the Hamming radius graph by pigeonhole, against brute force ---


def brute_force_groups(hashes: list[int], max_bits: int) -> set[frozenset[int]]:
    """Connected components of "at most max_bits bits apart", every pair compared."""
    import numpy as np
    from scipy.sparse.csgraph import connected_components

    from retrain.manifests import _bits_set

    values = np.array(hashes, dtype=np.uint64)
    near = _bits_set(values[:, None] ^ values[None, :]) <= max_bits
    _, labels = connected_components(near, directed=False)
    return {frozenset(np.flatnonzero(labels == label).tolist()) for label in set(labels)}


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), max_bits=st.sampled_from([0, 1, 4, 7, 15, 16, 30]),
       count=st.integers(2, 60))
def test_near_duplicate_keys_group_exactly_as_every_pair_compared(seed, max_bits, count):
    """Random hashes with planted near copies (a few bits flipped, chained, some equal):
    the groups are those of the brute-force comparison of every pair."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_hash_groups import generated_hashes

    from retrain.manifests import near_duplicate_keys

    hashes = generated_hashes(count, max_bits, seed)
    rows = [{"sha256": f"{i:064x}", "dhash": h} for i, h in enumerate(hashes)]
    keys = near_duplicate_keys(rows, max_bits)
    found = {}
    for i in range(count):
        found.setdefault(keys[f"{i:064x}"], set()).add(i)
    assert {frozenset(group) for group in found.values()} == brute_force_groups(hashes, max_bits)
    assert all(key == min(f"{i:064x}" for i in group) for key, group in found.items())


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), data=st.data())
def test_components_merged_batch_by_batch_are_those_of_all_pairs_at_once(rows, data):
    """Linking pairs a batch at a time (as the audit's duplicate search does), from rows
    alone or from components already formed, ends in the connected components of the
    first components and every pair, each named by its first row."""
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from retrain.manifests import merged_components

    pairs = data.draw(st.lists(st.tuples(st.integers(0, rows - 1), st.integers(0, rows - 1)),
                               max_size=60))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(pairs)), max_size=5)))
    # The start: each row in a drawn group, every group named by its first row
    group_of = np.array(data.draw(st.lists(st.integers(0, 5), min_size=rows, max_size=rows)))
    first_row = {group: int(np.flatnonzero(group_of == group)[0]) for group in set(group_of)}
    component = np.array([first_row[group] for group in group_of])
    start_links = [(row, int(first)) for row, first in enumerate(component)]
    for low, high in zip([0, *cuts], [*cuts, len(pairs)]):
        batch = np.array(pairs[low:high], dtype=np.int64).reshape(-1, 2)
        component = merged_components(component, batch[:, 0], batch[:, 1])

    edges = np.array(pairs + start_links, dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(rows, rows))
    _, labels = connected_components(graph, directed=False)
    first = {label: int(np.flatnonzero(labels == label)[0]) for label in set(labels)}
    assert component.tolist() == [first[label] for label in labels]
