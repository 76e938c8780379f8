"""Classifier-free guidance (Ho & Salimans 2022): one wrapper around the model function, for every sampler.

eps_guided = eps_uncond + scale * (eps_cond - eps_uncond): scale 0 is unconditional, 1 conditional,
> 1 guided. x0 follows from eps (it is affine in eps for a fixed x_t), so both stay consistent.
Both predictions come from one network call on the doubled batch.
"""

from typing import Any

import jax
import jax.numpy as jnp

from diffusion.parameterization import ModelFn


def classifier_free_guidance(model_fn: ModelFn, scale: float, null_cond: Any) -> ModelFn:
  """model_fn(x, t, cond) -> guided (x0, eps); `null_cond` is the condition meaning "no condition"."""

  def guided(x, t, cond):
    if cond is None or scale == 1.0:
      return model_fn(x, t, cond)
    null = jax.tree.map(lambda c, n: jnp.broadcast_to(n, c.shape).astype(c.dtype), cond, null_cond)
    both = lambda a, b: jnp.concatenate([a, b])
    x0, eps = model_fn(both(x, x), both(t, t), jax.tree.map(both, cond, null))
    b = x.shape[0]
    x0_c, x0_u, eps_c, eps_u = x0[:b], x0[b:], eps[:b], eps[b:]
    return x0_u + scale * (x0_c - x0_u), eps_u + scale * (eps_c - eps_u)

  return guided
