"""Classifier-free guidance (Ho & Salimans 2022): one wrapper around the model function, for every sampler.

eps_guided = eps_uncond + scale * (eps_cond - eps_uncond): scale 0 is unconditional, 1 conditional,
> 1 guided. x0 follows from eps (it is affine in eps for a fixed x_t), so both stay consistent.
Both predictions come from one network call on the doubled batch.

Guidance rescale (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed", as
diffusers' guidance_rescale): eps_rescaled = eps_guided * std(eps_cond) / std(eps_guided), per example, and
eps = phi * eps_rescaled + (1 - phi) * eps_guided; it counters the over-exposure of large scales.
"""

from typing import Any

import jax
import jax.numpy as jnp

from diffusion.parameterization import ModelFn


def classifier_free_guidance(model_fn: ModelFn, scale: float, null_cond: Any, rescale: float = 0.0,
                             process=None) -> ModelFn:
  """model_fn(x, t, cond) -> guided (x0, eps); `null_cond` is the condition meaning "no condition".

  rescale (phi) in [0, 1] needs the process: x0 follows the rescaled eps through x0 = (x - sigma eps) / alpha.
  """
  if not 0.0 <= rescale <= 1.0:
    raise ValueError(f'guidance rescale must lie in [0, 1], got {rescale}')
  if rescale > 0 and process is None:
    raise ValueError('guidance rescale needs the process (to keep x0 consistent with the rescaled eps)')

  def guided(x, t, cond):
    if cond is None or scale == 1.0:
      return model_fn(x, t, cond)
    null = jax.tree.map(lambda c, n: jnp.broadcast_to(n, c.shape).astype(c.dtype), cond, null_cond)
    both = lambda a, b: jnp.concatenate([a, b])
    x0, eps = model_fn(both(x, x), both(t, t), jax.tree.map(both, cond, null))
    b = x.shape[0]
    x0_c, x0_u, eps_c, eps_u = x0[:b], x0[b:], eps[:b], eps[b:]
    x0_g, eps_g = x0_u + scale * (x0_c - x0_u), eps_u + scale * (eps_c - eps_u)
    if rescale == 0.0:
      return x0_g, eps_g
    axes = tuple(range(1, eps.ndim))
    ratio = jnp.std(eps_c, axis=axes, keepdims=True) / jnp.std(eps_g, axis=axes, keepdims=True)
    eps_r = rescale * eps_g * ratio + (1.0 - rescale) * eps_g
    shape = (-1,) + (1,) * (x.ndim - 1)
    alpha, sigma = process.alpha(t).reshape(shape), process.sigma(t).reshape(shape)
    return x0_g - sigma / alpha * (eps_r - eps_g), eps_r

  return guided
