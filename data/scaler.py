"""Pixel scaling between uint8 images at the edges and the model's range, done on device in the step.

Images travel from the host as uint8 [B, H, W, C]; scaling, uniform dequantization and random flips run
inside the jitted step, so the host ships 4x fewer bytes and does no per-pixel work.
"""

import jax
import jax.numpy as jnp

Array = jax.Array


def to_model(images: Array, *, centered: bool = True, dequantize: bool = False, rng: Array | None = None) -> Array:
  """uint8 [0, 255] -> [-1, 1] (centered) or [0, 1]; with dequantize, (x + U[0, 1)) / 256 as score_sde."""
  x = images.astype(jnp.float32)
  if dequantize:
    x = (x + jax.random.uniform(rng, x.shape)) / 256.0
  else:
    x = x / 255.0
  return 2.0 * x - 1.0 if centered else x


def to_uint8(x: Array, *, centered: bool = True) -> Array:
  """Model range -> uint8, rounding and clipping."""
  x = (x + 1.0) / 2.0 if centered else x
  return jnp.clip(jnp.round(x * 255.0), 0, 255).astype(jnp.uint8)


def data_range(centered: bool) -> tuple[float, float]:
  return (-1.0, 1.0) if centered else (0.0, 1.0)


def random_flip(x: Array, rng: Array) -> Array:
  """Flips each image of x [B, H, W, C] left-right with probability 1/2."""
  flip = jax.random.bernoulli(rng, 0.5, (x.shape[0], 1, 1, 1))
  return jnp.where(flip, x[:, :, ::-1, :], x)
