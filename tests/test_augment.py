"""Augmented views drawn per image and epoch, transformed as Keras' preprocessing layers do."""

import numpy as np

from retrain.augment import Augmentation, epoch_views

AUGMENT = Augmentation(flip=True, brightness=0.2, contrast=0.3)


def test_an_images_view_depends_on_seed_epoch_and_image_only():
    small, large = (epoch_views(7, 2, n, AUGMENT) for n in (10, 50))
    for name in ("flip", "shift", "factor"):
        np.testing.assert_array_equal(getattr(small, name), getattr(large, name)[:10])
    again = epoch_views(7, 2, 50, AUGMENT)
    np.testing.assert_array_equal(again.order, large.order)
    other_epoch, other_seed = epoch_views(7, 3, 50, AUGMENT), epoch_views(8, 2, 50, AUGMENT)
    for other in (other_epoch, other_seed):
        assert not np.array_equal(other.shift, large.shift)
        assert not np.array_equal(other.order, large.order)
    assert sorted(large.order) == list(range(50))
    assert 0.3 < large.flip.mean() < 0.7
    assert np.abs(large.shift).max() <= 0.2 * 255 and np.ptp(large.shift) > 0
    assert ((0.7 <= large.factor) & (large.factor <= 1.3)).all()


def test_a_batch_gets_each_images_own_view_wherever_it_lands():
    images = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    views = epoch_views(1, 0, 12, AUGMENT)
    together = views.pixels(images, np.arange(12))
    for i in (0, 5, 11):
        np.testing.assert_array_equal(views.pixels(images, np.array([i]))[0], together[i])


def test_views_are_keras_flip_brightness_and_contrast():
    import keras

    images = np.random.default_rng(0).integers(0, 256, (16, 9, 7, 3), dtype=np.uint8)
    views = epoch_views(3, 1, 16, AUGMENT)
    indices = np.arange(16)
    ours = views.pixels(images, indices)

    expected = keras.layers.RandomFlip("horizontal").transform_images(
        images.astype("float32"), {"flips": views.flip[:, None, None, None],
                                   "input_shape": images.shape}, training=True)
    expected = keras.layers.RandomBrightness(0.2, value_range=(0, 255)).transform_images(
        expected, {"rgb_delta": views.shift[:, None, None, None].astype("float32")},
        training=True)
    expected = keras.layers.RandomContrast(0.3, value_range=(0, 255)).transform_images(
        expected, {"contrast_factor": views.factor[:, None, None, None].astype("float32")},
        training=True)
    np.testing.assert_allclose(ours, keras.ops.convert_to_numpy(expected), atol=1e-3)
    assert ours.dtype == np.float32 and ours.min() >= 0 and ours.max() <= 255


def test_without_augmentation_views_are_the_images():
    images = np.random.default_rng(0).integers(0, 256, (6, 5, 5, 3), dtype=np.uint8)
    views = epoch_views(0, 4, 6, Augmentation())
    np.testing.assert_array_equal(views.pixels(images, np.arange(6)), images.astype("float32"))
    np.testing.assert_array_equal(views.view_keys(np.arange(6)), 2 * np.arange(6))
    assert not Augmentation(flip=True).continuous and AUGMENT.continuous


def test_bounded_views_come_back_in_turn_in_a_new_order():
    bounded = Augmentation(flip=True, brightness=0.2, contrast=0.3, views=2)
    epochs = [epoch_views(7, e, 50, bounded) for e in range(5)]
    assert [v.draw for v in epochs] == [0, 1, 0, 1, 0]
    for name in ("flip", "shift", "factor"):
        np.testing.assert_array_equal(getattr(epochs[0], name), getattr(epochs[2], name))
        np.testing.assert_array_equal(getattr(epochs[1], name), getattr(epochs[3], name))
    assert not np.array_equal(epochs[0].shift, epochs[1].shift)
    assert not np.array_equal(epochs[0].order, epochs[2].order)  # each epoch its own order
    # The first draws are those of new views every epoch: views: 2 changes epochs 2 and up.
    unbounded = epoch_views(7, 1, 50, AUGMENT)
    np.testing.assert_array_equal(epochs[1].shift, unbounded.shift)
    np.testing.assert_array_equal(epochs[1].order, unbounded.order)
    assert not np.array_equal(epochs[2].shift, epoch_views(7, 2, 50, AUGMENT).shift)
    assert bounded.draws(5) == 2 and bounded.draws(1) == 1 and AUGMENT.draws(5) == 5
