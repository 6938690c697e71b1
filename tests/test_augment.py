"""On-device augmentation and the dropout layer whose rate may differ per stacked model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlab import augment, models


def test_rotation_by_quarter_turns_matches_numpy():
    images = jax.random.uniform(jax.random.key(0), (3, 9, 9, 2))
    quarter = augment.rotate(images, jnp.full((3,), np.pi / 2))
    np.testing.assert_allclose(quarter, np.rot90(np.asarray(images), 1, axes=(1, 2)), atol=1e-5)
    np.testing.assert_allclose(augment.rotate(images, jnp.zeros(3)), images, atol=1e-6)


def test_random_rotation_stays_within_its_range():
    # a horizontal bar rotated by at most 20 degrees never reaches the image's top rows
    image = np.zeros((1, 29, 29, 1), np.float32)
    image[0, 14, 4:25] = 1.0
    images = jnp.asarray(np.repeat(image, 64, axis=0))
    out = np.asarray(jax.jit(lambda k, x: augment.random_rotate(k, x, 20.0)[0])(jax.random.key(1), images))
    assert out[:, :8].max() == 0 and out[:, 21:].max() == 0
    assert len({round(float(np.abs(o - image[0]).sum()), 3) for o in out}) > 50  # a fresh angle per image


def test_make_augment_is_none_without_options_and_flips_half():
    assert augment.make_augment({"rotate": 0.0, "flip_lr": False, "flip_ud": False}) is None
    images = jnp.broadcast_to(jnp.arange(4.0)[None, None, :, None], (1000, 2, 4, 1))
    flipped, maps = augment.make_augment({"flip_lr": True})(jax.random.key(0), images)
    assert maps is None
    share = float((flipped[:, 0, 0, 0] == 3.0).mean())
    assert 0.45 < share < 0.55


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.6])
def test_dropout_takes_a_traced_rate(rate):
    layer = models.Dropout(0.0)
    x = jnp.ones((200, 100))
    run = jax.jit(lambda r: layer.apply({}, x, train=True, rate=r, rngs={"dropout": jax.random.key(0)}))
    y = np.asarray(run(jnp.float32(rate)))
    assert abs((y == 0).mean() - rate) < 0.02
    np.testing.assert_allclose(y[y != 0], 1 / (1 - rate), rtol=1e-6)
    assert np.array_equal(layer.apply({}, x, train=False, rate=rate), x)


def test_dropout_mask_is_the_keys_own_and_gates_the_gradient():
    layer = models.Dropout(0.5)
    x = jnp.ones((64, 64))
    apply = lambda key, x=x: layer.apply({}, x, train=True, rngs={"dropout": key})
    a, b, again = (np.asarray(jax.jit(apply)(jax.random.key(seed))) for seed in (0, 1, 0))
    assert np.array_equal(a, again) and 0.4 < (a != b).mean() < 0.6
    stacked = np.asarray(jax.jit(jax.vmap(apply))(jax.random.split(jax.random.key(0), 3)))  # stacked models
    assert all(0.4 < (stacked[i] != stacked[j]).mean() < 0.6 for i, j in ((0, 1), (0, 2), (1, 2)))
    grad = jax.jit(jax.grad(lambda x: apply(jax.random.key(0), x).sum()))(x)
    np.testing.assert_array_equal(grad, a)  # 1 / keep where kept, as the output of ones is


def test_random_crop_is_a_shift_of_at_most_the_padding():
    images = jax.random.uniform(jax.random.key(2), (256, 8, 8, 3)) + 1.0  # no zeros of its own
    out = np.asarray(jax.jit(lambda k, x: augment.random_crop(k, x, 2)[0])(jax.random.key(3), images))
    shifts = set()
    for original, cropped in zip(np.asarray(images), out):
        padded = np.pad(original, ((2, 2), (2, 2), (0, 0)))
        match = [(dy, dx) for dy in range(5) for dx in range(5)
                 if np.array_equal(padded[dy:dy + 8, dx:dx + 8], cropped)]
        assert len(match) == 1
        shifts.add(match[0])
    assert len(shifts) == 25  # every offset of the 5x5 range occurs
    assert augment.make_augment({"crop": 0}) is None and augment.make_augment({"crop": 4}) is not None


def test_jitter_scales_brightness_and_contrast_within_range():
    images = jax.random.uniform(jax.random.key(4), (512, 6, 6, 3), minval=0.3, maxval=0.6)
    out = np.asarray(augment.random_jitter(jax.random.key(5), images, 0.3)[0])
    assert out.min() >= 0 and out.max() <= 1
    ratio = out.mean(axis=(1, 2, 3)) / np.asarray(images).mean(axis=(1, 2, 3))  # contrast keeps the mean
    assert 0.69 < ratio.min() < 0.75 and 1.25 < ratio.max() < 1.31


def test_jitter_is_torchvisions_color_jitter():
    """torchvision's adjust_brightness and adjust_contrast (about the mean of rgb_to_grayscale), each clamped, in
    a random order per image; the factors drawn as random_jitter draws them."""
    images = jax.random.uniform(jax.random.key(4), (64, 5, 5, 3), minval=0.2, maxval=0.9)
    key, strength = jax.random.key(7), 0.5
    out = np.asarray(augment.random_jitter(key, images, strength)[0])
    bright_key, contrast_key, order_key = jax.random.split(key, 3)
    draw = lambda k: np.asarray(jax.random.uniform(k, (64,), minval=1 - strength, maxval=1 + strength))  # noqa: E731
    brightness = lambda x, f: np.clip(f * x, 0, 1)  # noqa: E731
    contrast = lambda x, f: np.clip(f * x + (1 - f) * (x @ np.array([0.2989, 0.587, 0.114])).mean(), 0, 1)  # noqa
    first = np.asarray(jax.random.bernoulli(order_key, 0.5, (64,)))
    for image, b, c, brightness_first, got in zip(np.asarray(images), draw(bright_key), draw(contrast_key), first, out):
        want = contrast(brightness(image, b), c) if brightness_first else brightness(contrast(image, c), b)
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert 0 < first.sum() < 64


@pytest.mark.parametrize("options", [{"flip_lr": True, "flip_ud": True}, {"crop": 3}, {"rotate": 30.0}])
def test_masks_move_with_their_images(options):
    # the mask marks exactly the bright pixels of each image: after augmentation it still must
    rng = np.random.default_rng(0)
    masks = (rng.random((64, 12, 12)) > 0.7).astype(np.uint8)
    images = jnp.asarray(masks[..., None] * np.ones((1, 1, 1, 3), np.float32))
    out, out_masks = jax.jit(augment.make_augment(options))(jax.random.key(6), images, jnp.asarray(masks))
    out, out_masks = np.asarray(out), np.asarray(out_masks)
    assert out_masks.dtype == np.uint8 and out_masks.shape == masks.shape
    changed = (out_masks != masks).any(axis=(1, 2)).mean()
    assert changed > 0.3  # most images were moved
    if "rotate" in options:  # bilinear image vs nearest mask: they agree away from edges
        assert ((out[..., 0] > 0.5) == (out_masks == 1)).mean() > 0.9
    else:
        np.testing.assert_array_equal(out[..., 0], out_masks.astype(np.float32))
