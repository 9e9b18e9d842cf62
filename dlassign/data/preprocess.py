"""Preprocessing: geometry on the host once, scaling and augmentation inside the jitted step.

Images stay uint8 on the host (a quarter of float32's bytes to move); `Normalizer` turns a batch
into floats inside the compiled step, so the pipeline only gathers rows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dlassign.data.sources import Split
from dlassign.errors import ConfigError, one_of

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("scale", "standardize", "imagenet")


def transform_geometry(split: Split, pad_to: int = 0, image_size: int = 0,
                       channels: int = 0) -> Split:
    """Pads, resizes and repeats channels, in that order; 0 leaves a step out.

    Args:
      split: uint8[N, H, W, C] images.
      pad_to: zero-pad symmetrically to pad_to x pad_to (MNIST's 28 to LeNet's 32).
      image_size: bilinear resize (antialiased when shrinking) to image_size x image_size.
      channels: 3 repeats a grayscale channel for ImageNet-shaped models.

    Returns:
      The split with uint8[N, H', W', C'] images.
    """
    x = split.images
    n, h, w, c = x.shape
    if pad_to:
        if pad_to < max(h, w):
            raise ConfigError(f"data.pad_to={pad_to} is smaller than the images ({h}x{w})")
        top, left = (pad_to - h) // 2, (pad_to - w) // 2
        x = np.pad(x, ((0, 0), (top, pad_to - h - top), (left, pad_to - w - left), (0, 0)))
    if image_size and x.shape[1:3] != (image_size, image_size):
        x = _resize(x, image_size)
    if channels and channels != x.shape[-1]:
        if x.shape[-1] != 1:
            raise ConfigError(f"data.channels={channels} needs single-channel images; these have "
                              f"{x.shape[-1]}")
        x = np.repeat(x, channels, axis=-1)
    return Split(x, split.labels)


def _resize(x: np.ndarray, size: int, chunk: int = 2048) -> np.ndarray:
    out = []
    resize = jax.jit(lambda b: jax.image.resize(
        b.astype(jnp.float32), (b.shape[0], size, size, b.shape[-1]), "bilinear", antialias=True))
    for i in range(0, x.shape[0], chunk):
        y = np.asarray(resize(x[i:i + chunk]))
        out.append(np.clip(np.round(y), 0, 255).astype(np.uint8))
    return np.concatenate(out)


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """Maps uint8 images to floats: `(x / 255 - mean) / std`, per channel.

    Attributes:
      mean: per-channel means, in [0, 1] units.
      std: per-channel standard deviations, in [0, 1] units.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: jax.Array, dtype=jnp.float32) -> jax.Array:
        """images: uint8[..., C] -> dtype[..., C]."""
        x = images.astype(dtype) / 255.0
        return (x - jnp.asarray(self.mean, dtype)) / jnp.asarray(self.std, dtype)

    @classmethod
    def from_config(cls, kind: str, train_images: np.ndarray) -> Normalizer:
        """Statistics for `kind`, computed from the training images only (never the test split).

        Args:
          kind: 'scale' (to [0, 1]), 'standardize' (per-channel mean 0, std 1 on the training
            split) or 'imagenet' (torchvision's ImageNet statistics, for pretrained starts).
          train_images: uint8[N, H, W, C].
        """
        c = train_images.shape[-1]
        if kind == "scale":
            return cls((0.0,) * c, (1.0,) * c)
        if kind == "standardize":
            mean, std = channel_stats(train_images)
            return cls(tuple(map(float, mean)), tuple(map(float, np.maximum(std, 1e-6))))
        if kind == "imagenet":
            if c != 3:
                raise ConfigError(f"data.normalization='imagenet' needs 3 channels; images have {c}"
                                  " (set data.channels=3)")
            return cls(IMAGENET_MEAN, IMAGENET_STD)
        raise one_of("data.normalization", kind, NORMALIZATIONS)


def channel_stats(images: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8[N, H, W, C] images in [0, 1] units, in float64."""
    c = images.shape[-1]
    total, sq, count = np.zeros(c), np.zeros(c), 0
    for i in range(0, images.shape[0], chunk):
        b = images[i:i + chunk].reshape(-1, c).astype(np.float64) / 255.0
        total += b.sum(0)
        sq += (b * b).sum(0)
        count += b.shape[0]
    mean = total / count
    return mean, np.sqrt(np.maximum(sq / count - mean**2, 0.0))


def random_crop(rng: jax.Array, images: jax.Array, padding: int) -> jax.Array:
    """Shifts each image by up to `padding` pixels (edge padding, then a random crop).

    Digits are not mirror-symmetric, so there is deliberately no horizontal flip.

    Args:
      rng: a PRNG key.
      images: [B, H, W, C].
      padding: the largest shift, in pixels.
    """
    if padding == 0:
        return images
    b, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)), mode="edge")
    offsets = jax.random.randint(rng, (b, 2), 0, 2 * padding + 1)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))
    return jax.vmap(crop)(padded, offsets)
