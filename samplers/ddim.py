"""DDIM (Song, Meng & Ermon 2021) on any process.

From t to s < t with x0, eps predicted at t:
  x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z,   c^2 = eta^2 * Var[x_s | x_t, x0]
where Var[x_s | x_t, x0] = sigma_s^2 (sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2) / sigma_t^2 is the DDPM
posterior variance: eta = 0 is deterministic, eta = 1 matches DDPM ancestral sampling in distribution.
As in diffusers, a clipped x0 does not change the eps used for the direction term.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from diffusion.parameterization import ModelFn
from diffusion.processes import Process
from samplers import base


@dataclasses.dataclass(frozen=True)
class DDIMSettings:
  num_steps: int = 50
  eta: float = 0.0
  spacing: str = 'linspace'
  t_end: float | None = None
  timesteps: tuple[float, ...] | None = None  # an explicit decreasing grid (overrides num_steps / spacing)
  rho: float = 7.0  # karras spacing
  time_shift: float = 1.0  # sigma / alpha of every grid time times this (Process.shift_time)
  denoise: bool = True
  clip_range: tuple[float, float] | None = None  # clip predicted x0 (pixel space), e.g. (-1, 1)


def posterior_variance(process: Process, t, s):
  """Var[x_s | x_t, x_0] of the forward process, s < t."""
  a_t, s_t, a_s, s_s = process.alpha(t), process.sigma(t), process.alpha(s), process.sigma(s)
  return s_s ** 2 * (s_t ** 2 - (a_t / a_s) ** 2 * s_s ** 2) / s_t ** 2


def make_step(model_fn: ModelFn, process: Process, settings: DDIMSettings, cond: Any = None):
  """step(x, t, s, rng) -> x_s."""

  def step(x, t, s, rng):
    x0, eps = model_fn(x, base.broadcast_t(t, x), cond)
    x0 = base.clip_x0(x0, settings.clip_range)
    std = settings.eta * jnp.sqrt(posterior_variance(process, t, s))  # (eta a constant: finite grads at 0)
    direction = jnp.sqrt(jnp.maximum(process.sigma(s) ** 2 - std ** 2, 0.0)) * eps
    return process.alpha(s) * x0 + direction + std * jax.random.normal(rng, x.shape)

  return step


def sample(rng: jax.Array, model_fn: ModelFn, process: Process, shape: tuple[int, ...],
           settings: DDIMSettings, cond: Any = None) -> tuple[jax.Array, int]:
  ts = base.settings_grid(process, settings)
  return base.run_grid(rng, model_fn, process, shape, ts, make_step(model_fn, process, settings, cond),
                       nfe_per_step=1, denoise=settings.denoise, clip_range=settings.clip_range, cond=cond)
