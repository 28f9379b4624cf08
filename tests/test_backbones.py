import numpy as np
import pytest
from conftest import real_weights_or_skip

from retrain.backbones import REGISTRY, check_model_params
from retrain.base import build_base
from retrain.errors import DownloadError, ParamsError


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_backbone_builds_frozen_without_weights(name):
    size = 71 if name == "xception" else 32
    params = {"backbone": name, "weights": "none", "image_size": size, "alpha": 1.0}
    base = build_base(params)
    assert base.trainable_weights == []
    features = np.asarray(base(np.zeros((1, size, size, 3), np.float32)))
    assert features.ndim == 4 and np.isfinite(features).all()


def test_mobilenet_v2_facts(tiny_model_params):
    base = build_base({**tiny_model_params, "image_size": 224, "alpha": 1.0})
    backbone = base.get_layer("backbone")
    assert len(backbone.layers) == 154
    assert backbone.layers[135].name == "block_15_expand_BN"
    assert backbone.count_params() == 2_257_984
    assert tuple(base.output.shape[1:]) == (7, 7, 1280)


@pytest.mark.parametrize("change, message", [
    ({"image_size": 100, "weights": "imagenet"}, "ImageNet weights for mobilenet_v2 exist for"),
    ({"backbone": "xception", "image_size": 64}, "xception needs at least 71 px"),
    ({"backbone": "vgg16", "alpha": 0.5}, "only mobilenet_v2 has a width multiplier"),
    ({"weights": "/no/such/weights.h5"}, "model.weights: /no/such/weights.h5: file not found"),
])
def test_model_params_that_cannot_work(tiny_model_params, change, message):
    with pytest.raises(ParamsError, match=message):
        check_model_params({**tiny_model_params, **change})


def test_weights_file_for_another_width_is_a_clear_error():
    path = real_weights_or_skip()  # alpha 0.35 weights loaded into an alpha 0.5 network
    params = {"backbone": "mobilenet_v2", "weights": str(path), "image_size": 224,
              "alpha": 0.5}
    with pytest.raises(ParamsError, match="does not fit mobilenet_v2"):
        build_base(params)


def test_real_weights_file_loads():
    path = real_weights_or_skip()
    base = build_base({"backbone": "mobilenet_v2", "weights": str(path), "image_size": 224,
                       "alpha": 0.35})
    kernel = base.get_layer("backbone").get_layer("Conv1").get_weights()[0]
    assert np.abs(kernel).sum() > 0 and kernel.std() > 0.05  # trained, not a fresh init


def test_imagenet_weights_that_cannot_be_downloaded_are_a_clear_error(monkeypatch):
    from keras.src.utils import file_utils

    def offline(fname, origin, **kwargs):
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno -3] name resolution")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(DownloadError, match=r"model.weights: imagenet: cannot get the "
                       r"mobilenet_v2 ImageNet weights \(URL fetch failure .*~/.keras/models"):
        build_base({"backbone": "mobilenet_v2", "weights": "imagenet", "image_size": 96,
                    "alpha": 0.35})


def save_legacy_h5(network, path):
    """A no-top weights file in the legacy .h5 format Keras's ImageNet files use."""
    import h5py
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    with h5py.File(path, "w") as f:
        save_weights_to_hdf5_group(f, network)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".h5", ".weights.h5"])
def test_efficientnet_from_a_weights_file_is_the_imagenet_network(suffix, tmp_path, monkeypatch):
    """Offline, "imagenet" is Keras's own imagenet code path with the download replaced by
    a local file: the same file given as `model.weights` must give the same network."""
    import keras
    from keras.src.utils import file_utils

    params = {"backbone": "efficientnet_b0", "weights": "none", "image_size": 32, "alpha": 1.0}
    network = build_base(params, seed=5).get_layer("backbone")
    normalization = next(layer for layer in network.layers
                         if isinstance(layer, keras.layers.Normalization))
    mean, variance, count = normalization.get_weights()  # ImageNet's, as in Keras's files
    normalization.set_weights([np.array([0.485, 0.456, 0.406], mean.dtype),
                               np.array([0.229, 0.224, 0.225], variance.dtype) ** 2, count])
    path = tmp_path / f"efficientnetb0_notop{suffix}"
    save_legacy_h5(network, path) if suffix == ".h5" else network.save_weights(path)

    monkeypatch.setattr(file_utils, "get_file", lambda *args, **kwargs: str(path))
    imagenet = build_base({**params, "weights": "imagenet"})
    from_file = build_base({**params, "weights": str(path)})

    def layer_kinds(base):
        return [type(layer).__name__ for layer in base.get_layer("backbone").layers]

    assert layer_kinds(from_file) == layer_kinds(imagenet)
    assert layer_kinds(imagenet).count("Rescaling") == 2  # 1/255, then 1/sqrt(std)
    pixels = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    expected = np.asarray(imagenet(pixels))
    scale = np.abs(expected).max()  # random EfficientNet features are ~1e-6: compare relatively
    np.testing.assert_allclose(np.asarray(from_file(pixels)), expected, atol=1e-4 * scale)
    from_file.save(tmp_path / "base.keras")  # the graph survives saving, as finetune does
    reloaded = keras.models.load_model(tmp_path / "base.keras")
    np.testing.assert_allclose(np.asarray(reloaded(pixels)), expected, atol=1e-4 * scale)
    # ...and the file's weights were loaded, not a random initialisation kept.
    assert not np.allclose(np.asarray(build_base(params, seed=6)(pixels)), expected,
                           atol=1e-2 * scale)
