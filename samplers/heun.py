"""EDM's stochastic Heun sampler (Karras et al. 2022, Algorithm 2) on any process.

It runs in the scaled variable x_hat = x / alpha with noise level s = sigma / alpha, where every process
is dx_hat = sqrt(d s^2 / dt) dW; the denoiser is D(x_hat; s) = E[x0 | x_t] at the time t(s). Steps follow
Karras' rho-schedule from T to t_end, then a last Euler step to s = 0 without Heun's correction, so
NFE = 2 * num_steps - 1. Churn (S_churn, S_min, S_max, S_noise) adds noise before each step.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from diffusion.parameterization import ModelFn
from diffusion.processes import Process
from samplers import base


@dataclasses.dataclass(frozen=True)
class HeunSettings:
  num_steps: int = 18  # noise levels before the final s = 0
  rho: float = 7.0
  time_shift: float = 1.0  # sigma / alpha of every grid time times this (Process.shift_time)
  t_end: float | None = None
  timesteps: tuple[float, ...] | None = None  # an explicit decreasing grid (overrides num_steps / spacing)
  s_churn: float = 0.0
  s_min: float = 0.0
  s_max: float = float('inf')
  s_noise: float = 1.0


def sample(rng: jax.Array, model_fn: ModelFn, process: Process, shape: tuple[int, ...], settings: HeunSettings,
           cond: Any = None) -> tuple[jax.Array, int]:
  k = settings.num_steps
  ts = base.settings_grid(process, settings, 'karras')  # [K]
  levels = process.sigma(ts) / process.alpha(ts)  # [K] noise levels s_i, decreasing
  rng_prior, rng_loop = jax.random.split(rng)
  x_hat = process.prior_sample(rng_prior, shape) / process.alpha(ts[0])
  gamma_max = min(settings.s_churn / k, math.sqrt(2.0) - 1.0)

  def denoise(x_hat, s, t):
    return model_fn(process.alpha(t) * x_hat, base.broadcast_t(t, x_hat), cond)[0]

  def churn(x_hat, i, rng):
    s = levels[i]
    gamma = jnp.where((s >= settings.s_min) & (s <= settings.s_max), gamma_max, 0.0)
    s_hat = s * (1 + gamma)
    t_hat = jnp.where(gamma > 0, process.t_from_log_snr(-2 * jnp.log(s_hat)), ts[i])
    noise = jax.random.normal(rng, x_hat.shape) * settings.s_noise
    return x_hat + s * jnp.sqrt(gamma * (2 + gamma)) * noise, s_hat, t_hat  # sqrt(s_hat^2 - s^2), exact at 0

  def body(i, x_hat):
    x_hat, s_hat, t_hat = churn(x_hat, i, jax.random.fold_in(rng_loop, i))
    d = (x_hat - denoise(x_hat, s_hat, t_hat)) / s_hat
    x_next = x_hat + (levels[i + 1] - s_hat) * d
    d_next = (x_next - denoise(x_next, levels[i + 1], ts[i + 1])) / levels[i + 1]
    return x_hat + (levels[i + 1] - s_hat) * 0.5 * (d + d_next)

  x_hat = base.step_loop(k - 1, body, x_hat)
  x_hat, s_hat, t_hat = churn(x_hat, k - 1, jax.random.fold_in(rng_loop, k - 1))
  return denoise(x_hat, s_hat, t_hat), 2 * k - 1  # the Euler step to s = 0 lands on D(x_hat; s_hat)
