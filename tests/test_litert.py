"""The LiteRT extraction engine: same features as Keras, converted once, deterministic."""

import keras
import numpy as np
import pytest
from conftest import TINY_MODEL, real_weights_or_skip

from retrain import litert
from retrain.features import KerasEngine, build_extractor, extract_to_file, make_engine
from retrain.synthetic import draw_image, jpeg_bytes

pytestmark = pytest.mark.skipif(not litert.litert_available(),
                                reason="ai-edge-litert is not installed")

SMALL = dict(TINY_MODEL)  # MobileNetV2, alpha 0.35, 32 px, random weights


def small_extractor(seed: int = 0, **changes) -> keras.Model:
    # weights "none": the base's random initialisation comes from this seed alone
    return build_extractor({**SMALL, **changes}, seed)[1]


def pixels(n: int, size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def assert_features_agree(actual, expected):
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    error = np.max(np.abs(actual - expected))
    assert error <= 1e-4
    # Randomly initialised features are tiny: also compare relative to their scale.
    assert error <= 1e-4 * np.max(np.abs(expected))


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrain-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RETRAIN_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def small(cache_root):
    extractor = small_extractor()
    return extractor, litert.LiteRTEngine(extractor, SMALL, chunk_size=4)


def tflite_files(cache_root):
    return sorted((cache_root / "litert").glob("*.tflite"))


def test_features_agree_with_keras_small_random_weights(small):
    extractor, engine = small
    assert engine.name == "litert" and engine.feature_size == 1280
    batch = pixels(10, 32)  # chunks of 4, 4 and 2
    assert_features_agree(engine(batch), KerasEngine(extractor)(batch))
    # float input in [0, 255] gives the same features as uint8 and is not modified
    floats = batch.astype(np.float32)
    np.testing.assert_array_equal(engine(floats), engine(batch))
    np.testing.assert_array_equal(floats, batch)


def test_resizes_only_when_the_batch_size_changes(small, monkeypatch):
    _, engine = small
    engine(pixels(4, 32))
    resizes = []
    original = engine._interpreter.resize_tensor_input
    monkeypatch.setattr(engine._interpreter, "resize_tensor_input",
                        lambda *args, **kwargs: resizes.append(args[1]) or original(*args,
                                                                                     **kwargs))
    batches = [pixels(4, 32, seed) for seed in range(3)] + [pixels(3, 32, 9)]
    outputs = [engine(batch) for batch in batches]
    assert [tuple(shape) for shape in resizes] == [(3, 32, 32, 3)]  # only the last batch
    assert [len(out) for out in outputs] == [4, 4, 4, 3]
    assert engine(pixels(0, 32)).shape == (0, 1280)
    with pytest.raises(ValueError, match="expects batches"):
        engine(pixels(2, 48))


def test_converted_once_and_reused_across_builds(small, cache_root, monkeypatch):
    _, engine = small
    files = tflite_files(cache_root)
    assert engine.model_path in files
    assert not list((cache_root / "litert").glob(".tmp-*"))  # written atomically

    def no_conversion(extractor):
        raise AssertionError("converted again although the cached file fits")

    monkeypatch.setattr(litert, "convert", no_conversion)
    # The same configuration built again (Keras renames unnamed layers per process).
    rebuilt = litert.LiteRTEngine(small_extractor(), SMALL)
    assert rebuilt.model_path == engine.model_path
    assert tflite_files(cache_root) == files


def test_other_image_size_or_weights_get_their_own_file(small, cache_root):
    extractor, engine = small
    key = litert.model_fingerprint(extractor)
    assert litert.model_fingerprint(small_extractor(seed=1)) != key  # other weights
    params = {**SMALL, "image_size": 48}
    larger = small_extractor(image_size=48)
    assert litert.model_fingerprint(larger) != key
    other = litert.LiteRTEngine(larger, params)
    assert other.model_path != engine.model_path
    assert other.model_path.name.startswith("mobilenet_v2-48px-")
    assert other(pixels(2, 48)).shape == (2, 1280)


def test_another_litert_runtime_gets_another_key(small, monkeypatch):
    extractor, _ = small
    key = litert.model_fingerprint(extractor)
    assert litert.litert_version() != "none"  # the installed runtime is part of the key
    monkeypatch.setattr(litert, "litert_version", lambda: "0.0.1")
    assert litert.model_fingerprint(extractor) != key


def brightness_detector(threshold: float) -> keras.Model:
    """Output relu(mean pixel - threshold): zero on noise (mean ~127) for a threshold above it,
    positive on a bright image."""
    pixels_in = keras.Input((8, 8, 3))
    mean = keras.layers.GlobalAveragePooling2D()(pixels_in)
    out = keras.layers.Dense(1, activation="relu", kernel_initializer=keras.initializers.Constant(
        1 / 3), bias_initializer=keras.initializers.Constant(-threshold))(mean)
    return keras.Model(pixels_in, out)


def test_conversion_check_catches_on_real_images_what_noise_does_not():
    right, wrong = brightness_detector(200.0), brightness_detector(300.0)
    flatbuffer = litert._convert_concrete_function(wrong)  # zero on every image
    litert._check_against_keras(flatbuffer, right)  # noise alone: both give 0, accepted
    bright = np.full((1, 8, 8, 3), 250, np.uint8)  # like a photo of snow: right gives 50
    with pytest.raises(litert.ConversionError, match="1 real image"):
        litert._check_against_keras(flatbuffer, right, images=bright)
    litert._check_against_keras(litert._convert_concrete_function(right), right, images=bright)


def test_engine_passes_its_real_images_to_the_conversion_check(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRAIN_CACHE", str(tmp_path))
    checked = []
    check = litert._check_against_keras
    monkeypatch.setattr(litert, "_check_against_keras", lambda *args: checked.append(args[3])
                        or check(*args))
    images = pixels(3, 32, seed=4)
    make_engine("litert", small_extractor(seed=2), SMALL, probe_images=images)
    assert len(checked) == 1 and checked[0] is images


def test_wrong_conversion_is_refused_and_not_cached(small, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRAIN_CACHE", str(tmp_path))
    # A valid flatbuffer, but of a network with other weights than the one converted.
    wrong = small[1].model_path.read_bytes()

    def saved_model_fails(extractor):
        raise RuntimeError("no SavedModel today")

    monkeypatch.setattr(litert, "_convert_concrete_function", lambda extractor: wrong)
    monkeypatch.setattr(litert, "_convert_saved_model", saved_model_fails)
    with pytest.raises(litert.ConversionError, match="differ from Keras"):
        litert.LiteRTEngine(small_extractor(seed=7), SMALL)
    assert list(tmp_path.rglob("*.tflite")) == []


@pytest.mark.slow
def test_saved_model_recipe_agrees_with_keras(small):
    extractor, _ = small
    flatbuffer = litert._convert_saved_model(extractor)
    litert._check_against_keras(flatbuffer, extractor)  # raises when features differ


def test_extraction_is_deterministic(small, tmp_path):
    _, engine = small
    rng = np.random.default_rng(3)
    paths = []
    for i in range(11):
        path = tmp_path / f"img_{i}.jpg"
        path.write_bytes(jpeg_bytes(draw_image(i % 5, 40, rng)))
        paths.append(path)
    extract_to_file(engine, paths, 32, 4, tmp_path / "a.npy")
    extract_to_file(engine, paths, 32, 4, tmp_path / "b.npy")
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()
    assert np.load(tmp_path / "a.npy").shape == (11, 1280)


def test_make_engine_dispatch(small, monkeypatch):
    extractor, _ = small
    assert make_engine("litert", extractor, SMALL).name == "litert"
    assert make_engine("keras", extractor, SMALL).name == "keras"
    monkeypatch.setattr(litert, "litert_available", lambda: False)
    assert make_engine("litert", extractor, SMALL).name == "keras"  # falls back
    assert make_engine("auto", extractor, SMALL).name == "keras"


@pytest.mark.slow
def test_features_agree_with_keras_real_weights(cache_root):
    params = {"backbone": "mobilenet_v2", "weights": str(real_weights_or_skip()), "image_size": 224,
              "alpha": 0.35}
    _, extractor = build_extractor(params)
    engine = litert.LiteRTEngine(extractor, params)
    rng = np.random.default_rng(5)
    drawn = np.stack([np.asarray(draw_image(i, 224, rng)) for i in range(5)])
    batch = np.concatenate([drawn, pixels(4, 224)])  # 9: a full chunk of 8, then 1
    expected = KerasEngine(extractor)(batch)
    assert np.max(np.abs(expected)) > 1.0  # real features, not near-zero ones
    assert_features_agree(engine(batch), expected)
