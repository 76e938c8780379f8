"""DDPM ancestral sampling (Ho et al. 2020) on any process.

Each step draws x_s ~ q(x_s | x_t, x0 = x0_hat), the Gaussian posterior of the forward process:
  mean = (alpha_s beta_ts / sigma_t^2) x0 + (alpha_ts sigma_s^2 / sigma_t^2) x_t,
  var  = beta_ts sigma_s^2 / sigma_t^2,    alpha_ts = alpha_t / alpha_s,
  beta_ts = sigma_t^2 - alpha_ts^2 sigma_s^2   ("fixed small" variance).
On the discrete DDPM grid with all N steps this is exactly Ho et al.'s sampler (diffusers' DDPMScheduler);
on VE it is score_sde's ancestral-sampling predictor.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from diffusion.parameterization import ModelFn
from diffusion.processes import Process
from samplers import base


@dataclasses.dataclass(frozen=True)
class AncestralSettings:
  num_steps: int = 1000
  spacing: str = 'linspace'
  t_end: float | None = None
  timesteps: tuple[float, ...] | None = None  # an explicit decreasing grid (overrides num_steps / spacing)
  rho: float = 7.0  # karras spacing
  time_shift: float = 1.0  # sigma / alpha of every grid time times this (Process.shift_time)
  denoise: bool = True
  clip_range: tuple[float, float] | None = None


def posterior_step(process: Process, x: jax.Array, x0: jax.Array, t, s, z: jax.Array) -> jax.Array:
  """A draw of x_s ~ q(x_s | x_t = x, x_0 = x0), with standard normal noise z."""
  a_t, s_t, a_s, s_s = process.alpha(t), process.sigma(t), process.alpha(s), process.sigma(s)
  a_ts = a_t / a_s
  beta_ts = s_t ** 2 - a_ts ** 2 * s_s ** 2
  mean = (a_s * beta_ts / s_t ** 2) * x0 + (a_ts * s_s ** 2 / s_t ** 2) * x
  return mean + jnp.sqrt(jnp.maximum(beta_ts * s_s ** 2 / s_t ** 2, 0.0)) * z


def make_step(model_fn: ModelFn, process: Process, settings: AncestralSettings, cond: Any = None):
  """step(x, t, s, rng) -> x_s."""

  def step(x, t, s, rng):
    x0, _ = model_fn(x, base.broadcast_t(t, x), cond)
    return posterior_step(process, x, base.clip_x0(x0, settings.clip_range), t, s, jax.random.normal(rng, x.shape))

  return step


def sample(rng: jax.Array, model_fn: ModelFn, process: Process, shape: tuple[int, ...],
           settings: AncestralSettings, cond: Any = None) -> tuple[jax.Array, int]:
  ts = base.settings_grid(process, settings)
  return base.run_grid(rng, model_fn, process, shape, ts, make_step(model_fn, process, settings, cond),
                       nfe_per_step=1, denoise=settings.denoise, clip_range=settings.clip_range, cond=cond)
