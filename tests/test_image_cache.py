"""images.cached_image_array: fine-tuning input decoded once into a uint8 memmap, then reused."""

import hashlib

import numpy as np
import pytest

from retrain import images
from retrain.errors import DataError
from retrain.images import cached_image_array, load_image
from retrain.synthetic import draw_image, jpeg_bytes


@pytest.fixture
def photos(tmp_path):
    """Seven small JPEGs of different sizes (one not square), with their sha256 digests."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    folder.mkdir()
    paths, digests = [], []
    for i, size in enumerate([40, 48, 56, 40, 64, 72, 44]):
        img = draw_image(i % 3, size, rng)
        if i == 4:
            img = img.resize((64, 40))
        data = jpeg_bytes(img)
        path = folder / f"img_{i}.jpg"
        path.write_bytes(data)
        paths.append(path)
        digests.append(hashlib.sha256(data).hexdigest())
    return paths, digests


def cache_files(cache_dir):
    return sorted(p.name for p in cache_dir.iterdir())


def test_same_pixels_as_load_image(photos, tmp_path):
    paths, digests = photos
    array = cached_image_array(paths, digests, 32, tmp_path / "cache")
    assert array.shape == (len(paths), 32, 32, 3)
    assert array.dtype == np.uint8
    assert isinstance(array, np.memmap) and not array.flags.writeable
    np.testing.assert_array_equal(array, np.stack([load_image(p, 32) for p in paths]))


def test_second_call_reuses_the_file_without_decoding(photos, tmp_path, monkeypatch):
    paths, digests = photos
    cache = tmp_path / "cache"
    first = np.array(cached_image_array(paths, digests, 32, cache))
    files = cache_files(cache)
    assert len(files) == 1 and files[0].startswith("images-32px-")

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an image although the cache file exists")

    monkeypatch.setattr(images, "load_image", no_decoding)
    second = cached_image_array(paths, digests, 32, cache)
    np.testing.assert_array_equal(second, first)
    assert cache_files(cache) == files


def test_different_size_or_data_gives_a_different_file(photos, tmp_path):
    paths, digests = photos
    cache = tmp_path / "cache"
    small = cached_image_array(paths, digests, 32, cache)
    large = cached_image_array(paths, digests, 48, cache)
    assert large.shape == (len(paths), 48, 48, 3)
    np.testing.assert_array_equal(large, np.stack([load_image(p, 48) for p in paths]))
    assert len(cache_files(cache)) == 2
    # Fewer images (different digests): a third file, never the first one sliced.
    fewer = cached_image_array(paths[:3], digests[:3], 32, cache)
    assert len(fewer) == 3 and len(cache_files(cache)) == 3
    np.testing.assert_array_equal(fewer, small[:3])


def test_failed_decode_leaves_no_cache_file(photos, tmp_path):
    paths, digests = photos
    paths[5].write_bytes(b"not a jpeg")
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="img_5.jpg"):
        cached_image_array(paths, digests, 32, cache)
    assert cache_files(cache) == []  # no partial file, not even a temporary one


def test_empty_list(tmp_path):
    array = cached_image_array([], [], 32, tmp_path / "cache")
    assert array.shape == (0, 32, 32, 3)


# What else decides the decoded pixels: a change to any of them must not reuse old pixels.
LOADER_CHANGES = [
    ("loader version", images, "LOADER_VERSION", images.LOADER_VERSION + 1),
    ("Pillow upgrade", images.PIL, "__version__", "99.0.0"),
    ("resampling filter", images, "RESAMPLING", images.Image.Resampling.NEAREST),
]


@pytest.mark.parametrize("module, name, value", [case[1:] for case in LOADER_CHANGES],
                         ids=[case[0] for case in LOADER_CHANGES])
def test_a_changed_loader_gets_a_new_cache_file(photos, tmp_path, monkeypatch, module, name,
                                                 value):
    paths, digests = photos
    cache = tmp_path / "cache"
    cached_image_array(paths, digests, 32, cache)
    monkeypatch.setattr(module, name, value)
    after = cached_image_array(paths, digests, 32, cache)
    assert len(cache_files(cache)) == 2  # decoded afresh, not the old file reused
    np.testing.assert_array_equal(after, np.stack([load_image(p, 32) for p in paths]))


def test_image_rows_read_what_the_memmap_holds(tmp_path):
    from retrain.images import ImageRows

    array = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=np.uint8,
                                      shape=(7, 4, 5, 3))
    array[...] = np.random.default_rng(0).integers(0, 256, array.shape)
    array.flush()
    cached = np.load(tmp_path / "a.npy", mmap_mode="r")
    rows = ImageRows(cached)
    assert len(rows) == 7 and rows.shape == cached.shape
    for indices in (np.array([0, 3, 6]), np.array([5]), slice(2, 5), np.arange(7)):
        np.testing.assert_array_equal(rows[indices], cached[indices])


def new_process(monkeypatch):
    """What a later stage's process sees: none of the cache files is its own yet."""
    from retrain import cache

    monkeypatch.setattr(cache, "_used_by_this_process", set())


def test_the_folder_stays_within_its_budget_least_recently_used_first(photos, tmp_path,
                                                                       monkeypatch, capsys):
    """Each new set of images makes a new file; beyond $RETRAIN_IMAGE_CACHE_GB the files
    used longest ago go first, a file just reused stays, and a deleted one is decoded again
    with the same pixels."""
    import os

    paths, digests = photos
    cache = tmp_path / "cache"
    one_file = len(paths[:4]) * 32 * 32 * 3  # bytes of pixels in a 4-image file
    monkeypatch.setenv("RETRAIN_IMAGE_CACHE_GB", str(2.5 * (one_file + 128) / 1e9))
    sets = [(paths[i:i + 4], digests[i:i + 4]) for i in range(3)]  # three versions of the data
    new_process(monkeypatch)
    first = np.array(cached_image_array(*sets[0], 32, cache))
    new_process(monkeypatch)
    cached_image_array(*sets[1], 32, cache)
    (older,) = [p for p in cache.iterdir() if p.stat().st_size and p.name.startswith("images-")
                and np.array_equal(np.load(p), first)]
    os.utime(older, (1, 1))  # used long ago ...
    new_process(monkeypatch)
    cached_image_array(*sets[0], 32, cache)  # ... and reused now: the other is the oldest
    assert len(cache_files(cache)) == 2
    capsys.readouterr()
    new_process(monkeypatch)
    cached_image_array(*sets[2], 32, cache)  # a third file: one must go
    assert older.exists() and len(cache_files(cache)) == 2
    assert "removed 1 decoded-image file(s)" in capsys.readouterr().err
    new_process(monkeypatch)
    again = cached_image_array(*sets[1], 32, cache)  # the evicted version, decoded again
    assert np.array_equal(again, np.stack([load_image(p, 32) for p in sets[1][0]]))
    assert sum(p.stat().st_size for p in cache.iterdir()) <= 2.5 * (one_file + 128)


def test_a_budget_of_zero_keeps_only_the_files_the_running_stage_uses(photos, tmp_path,
                                                                       monkeypatch):
    """A stage decoding its training images and then its validation images keeps both while
    it runs; the next stage's first new file removes them."""
    paths, digests = photos
    cache = tmp_path / "cache"
    monkeypatch.setenv("RETRAIN_IMAGE_CACHE_GB", "0")
    new_process(monkeypatch)
    train = cached_image_array(paths[:4], digests[:4], 32, cache)
    val = cached_image_array(paths[4:], digests[4:], 32, cache)
    assert len(cache_files(cache)) == 2
    np.testing.assert_array_equal(train, np.stack([load_image(p, 32) for p in paths[:4]]))
    np.testing.assert_array_equal(val, np.stack([load_image(p, 32) for p in paths[4:]]))
    new_process(monkeypatch)
    cached_image_array(paths[1:5], digests[1:5], 32, cache)
    assert len(cache_files(cache)) == 1


def test_a_stage_s_own_files_count_towards_the_budget(photos, tmp_path, monkeypatch):
    """A stage's own files are never deleted, but they count: its second file makes room
    by deleting another run's file where the folder would otherwise go over."""
    import os

    paths, digests = photos
    cache = tmp_path / "cache"
    one_file = len(paths[:3]) * 32 * 32 * 3 + 128  # bytes of a 3-image file and its header
    monkeypatch.setenv("RETRAIN_IMAGE_CACHE_GB", str(2.5 * one_file / 1e9))
    new_process(monkeypatch)
    cached_image_array(paths[4:7], digests[4:7], 32, cache)  # an earlier run's file
    (other,) = cache.iterdir()
    os.utime(other, (1, 1))
    new_process(monkeypatch)
    cached_image_array(paths[:3], digests[:3], 32, cache)  # this stage: training images ...
    assert other.exists()  # two files fit
    cached_image_array(paths[1:4], digests[1:4], 32, cache)  # ... then validation images
    assert not other.exists() and len(cache_files(cache)) == 2
    assert sum(p.stat().st_size for p in cache.iterdir()) <= 2.5 * one_file


def test_rows_of_a_file_deleted_after_it_was_mapped_are_still_read(photos, tmp_path):
    """Another process may delete a cache file between its load and `image_rows`: the
    mapping still holds the file's pixels."""
    paths, digests = photos
    array = cached_image_array(paths, digests, 32, tmp_path / "cache")
    expected = np.array(array)
    for path in (tmp_path / "cache").iterdir():
        path.unlink()
    np.testing.assert_array_equal(images.image_rows(array)[np.arange(len(paths))], expected)


@pytest.mark.parametrize("value", ["-1", "lots", "nan", "inf", "1e300"])
def test_a_bad_cache_budget_is_refused_by_name(photos, tmp_path, monkeypatch, value):
    from retrain.errors import UserError

    monkeypatch.setenv("RETRAIN_IMAGE_CACHE_GB", value)
    paths, digests = photos
    with pytest.raises(UserError, match="RETRAIN_IMAGE_CACHE_GB"):
        cached_image_array(paths, digests, 32, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_a_bad_cache_budget_is_refused_where_the_images_are_cached_already(photos, tmp_path,
                                                                           monkeypatch):
    from retrain.errors import UserError

    paths, digests = photos
    cached_image_array(paths, digests, 32, tmp_path / "cache")
    monkeypatch.setenv("RETRAIN_IMAGE_CACHE_GB", "20GB")
    with pytest.raises(UserError, match="RETRAIN_IMAGE_CACHE_GB='20GB'"):
        cached_image_array(paths, digests, 32, tmp_path / "cache")
