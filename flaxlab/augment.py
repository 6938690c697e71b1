"""Data augmentation on the device, inside the jitted train step: no host work, no stored copies.

`make_augment(config["augment"])` returns None (no augmentation, no ops traced) or a function
(key, images NHWC float, maps) -> (images, maps), drawing fresh parameters for every image of every
step. `maps` (segmentation masks, NHW) move with their images (flips, shifts, rotations, the latter
by nearest neighbour so labels stay labels); None for classification.
"""
import math

import jax
import jax.numpy as jnp

DEFAULTS = {"rotate": 0.0, "flip_lr": False, "flip_ud": False, "crop": 0, "jitter": 0.0}


def rotate(images, radians, order=1):
    """Rotates each image about its centre by its angle (counter-clockwise as displayed), zero outside;
    bilinear (order 1) or nearest (order 0)."""
    n, h, w, c = images.shape
    y, x = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) - (h - 1) / 2,
                        jnp.arange(w, dtype=jnp.float32) - (w - 1) / 2, indexing="ij")

    def one(image, angle):
        cos, sin = jnp.cos(angle), jnp.sin(angle)
        # each output pixel samples the input where the inverse rotation takes it
        source = [cos * y + sin * x + (h - 1) / 2, cos * x - sin * y + (w - 1) / 2]
        sample = lambda channel: jax.scipy.ndimage.map_coordinates(channel, source, order=order, mode="constant")
        return jax.vmap(sample, in_axes=2, out_axes=2)(image)
    return jax.vmap(one)(images, radians)


def _maps_op(maps, op):
    """Applies an NHWC op to NHW label maps (None passes through)."""
    return None if maps is None else op(maps[..., None])[..., 0]


def random_rotate(key, images, max_degrees, maps=None):
    radians = jax.random.uniform(key, images.shape[:1], minval=-max_degrees, maxval=max_degrees) * (math.pi / 180)
    return rotate(images, radians), _maps_op(maps, lambda m: rotate(m, radians, order=0).astype(m.dtype))


def random_flip(key, images, axis, maps=None):
    flip = jax.random.bernoulli(key, 0.5, images.shape[:1])[:, None, None, None]
    return (jnp.where(flip, jnp.flip(images, axis), images),
            _maps_op(maps, lambda m: jnp.where(flip, jnp.flip(m, axis), m)))


def _crop(images, offsets, padding):
    n, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    crop = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, c))  # noqa: E731
    return jax.vmap(crop)(padded, offsets)


def random_crop(key, images, padding, maps=None):
    """Zero-pads by `padding` pixels and crops back to size at a random offset per image
    (torchvision's RandomCrop(size, padding)); shifts of up to `padding` pixels each way."""
    offsets = jax.random.randint(key, (images.shape[0], 2), 0, 2 * padding + 1)
    return _crop(images, offsets, padding), _maps_op(maps, lambda m: _crop(m, offsets, padding))


GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def random_jitter(key, images, strength, maps=None):
    """Brightness and contrast each scaled by a random factor in [1 - strength, 1 + strength] per image, as
    torchvision's ColorJitter(brightness, contrast) does: the two in a random order, each clipped to [0, 1],
    contrast about the mean grey level. Lighting varies far more between photos than shape."""
    n = images.shape[0]
    bright_key, contrast_key, order_key = jax.random.split(key, 3)
    bright = jax.random.uniform(bright_key, (n, 1, 1, 1), minval=1 - strength, maxval=1 + strength)
    contrast = jax.random.uniform(contrast_key, (n, 1, 1, 1), minval=1 - strength, maxval=1 + strength)

    def brightness(x):
        return jnp.clip(x * bright, 0.0, 1.0)

    def contrasted(x):
        grey = x @ jnp.asarray(GREY, x.dtype) if x.shape[-1] == 3 else x.mean(-1)
        mean = grey.mean(axis=(1, 2))[:, None, None, None]
        return jnp.clip((x - mean) * contrast + mean, 0.0, 1.0)
    brightness_first = jax.random.bernoulli(order_key, 0.5, (n, 1, 1, 1))
    return jnp.where(brightness_first, contrasted(brightness(images)), brightness(contrasted(images))), maps


def make_augment(cfg):
    """The config's augment section as one function, or None when it asks for nothing."""
    cfg = {**DEFAULTS, **(cfg or {})}
    ops = []
    if cfg["crop"]:
        ops.append(lambda key, x, m: random_crop(key, x, cfg["crop"], m))
    if cfg["jitter"]:
        ops.append(lambda key, x, m: random_jitter(key, x, cfg["jitter"], m))
    if cfg["rotate"]:
        ops.append(lambda key, x, m: random_rotate(key, x, cfg["rotate"], m))
    if cfg["flip_lr"]:
        ops.append(lambda key, x, m: random_flip(key, x, 2, m))
    if cfg["flip_ud"]:
        ops.append(lambda key, x, m: random_flip(key, x, 1, m))
    if not ops:
        return None

    def augment(key, images, maps=None):
        for op, k in zip(ops, jax.random.split(key, len(ops))):
            images, maps = op(k, images, maps)
        return images, maps
    return augment
