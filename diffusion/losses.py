"""Denoising losses: one mechanism, the weighted eps-space error, covers the classic objectives.

For x_t = alpha x0 + sigma eps and a model's (x0_hat, eps_hat), the errors of every target are multiples
of the eps error:  x0 err = -(sigma / alpha) eps err,  v err = ((alpha^2 + sigma^2) / alpha) eps err,
score err = -(1 / sigma) eps err. So each objective is  w(t) * |eps_hat - eps|^2  with
  eps         w = 1                                 DDPM "simple" loss; score_sde's uniform DSM
  likelihood  w = g(t)^2 / sigma^2                  score_sde's likelihood weighting (Song et al. 2021b)
  x0          w = (sigma / alpha)^2
  v           w = ((alpha^2 + sigma^2) / alpha)^2
  edm         w = lambda(s) s^2 = (s^2 + sigma_data^2) / sigma_data^2,  s = sigma / alpha   (Karras et al.)
  min_snr     w = min(SNR, gamma) / SNR,  SNR = alpha^2 / sigma^2        Min-SNR-gamma (Hang et al. 2023)
  flow        w = (sigma' - alpha' sigma / alpha)^2                  flow matching |u_hat - u|^2, u = dx_t / dt
              (on the flow process w = 1 / (1 - t)^2; Lipman et al. 2023, Liu et al. 2023)
Min-SNR's weight is min(SNR, gamma) on the x0 error; its eps- and v-loss forms (min(SNR, gamma) / SNR and
min(SNR, gamma) / (SNR + 1) on VP processes) are the same objective, so one formula serves every prediction.
and the time distribution is chosen separately: uniform on [t_eps, T], the discrete DDPM grid, or
EDM's log-normal noise level log(sigma / alpha) ~ N(P_mean, P_std^2) on any process (on the flow process
log(sigma / alpha) = logit(t): Stable Diffusion 3's logit-normal t). time_shift then moves every draw to the time
with `time_shift` times the noise-to-signal ratio (Process.shift_time).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from diffusion.parameterization import ModelFn
from diffusion.processes import Process

Array = jax.Array
WEIGHTINGS = ('eps', 'likelihood', 'x0', 'v', 'edm', 'min_snr', 'flow')
TIME_SAMPLINGS = ('uniform', 'discrete', 'lognormal')
REDUCTIONS = ('mean', 'sum')


@dataclasses.dataclass(frozen=True)
class LossSettings:
  weighting: str = 'eps'
  time_sampling: str = 'uniform'
  reduce: str = 'mean'  # over the pixels of one example
  P_mean: float = -1.2
  P_std: float = 1.2
  sigma_data: float = 0.5
  min_snr_gamma: float = 5.0
  time_shift: float = 1.0  # sigma / alpha of every drawn time multiplied by this (1: no shift)

  def __post_init__(self):
    if not self.time_shift > 0:
      raise ValueError(f'training.time_shift={self.time_shift} must be positive')
    if self.time_shift != 1 and self.time_sampling == 'discrete':
      raise ValueError("training.time_shift moves times off the discrete grid: use time_sampling='uniform' or "
                       "'lognormal'")
    if self.weighting == 'min_snr' and not self.min_snr_gamma > 0:
      raise ValueError(f'training.min_snr_gamma={self.min_snr_gamma} must be positive')
    for name, value, allowed in (('weighting', self.weighting, WEIGHTINGS),
                                 ('time_sampling', self.time_sampling, TIME_SAMPLINGS),
                                 ('reduce', self.reduce, REDUCTIONS)):
      if value not in allowed:
        raise ValueError(f'unknown loss {name} {value!r}; choose one of {allowed}')


def sample_time(rng: Array, batch: int, process: Process, settings: LossSettings) -> Array:
  """Training times t [B]."""
  if settings.time_sampling == 'discrete':
    if process.num_timesteps is None or not hasattr(process, 't_from_index'):
      raise ValueError("time_sampling='discrete' needs a discrete process (process.name='ddpm')")
    return process.t_from_index(jax.random.randint(rng, (batch,), 0, process.num_timesteps))
  if settings.time_sampling == 'uniform':
    t = jax.random.uniform(rng, (batch,), minval=process.t_eps, maxval=process.T)
  else:
    log_s = settings.P_mean + settings.P_std * jax.random.normal(rng, (batch,))
    t = process.t_from_log_snr(-2 * log_s)
  return jnp.clip(process.shift_time(t, settings.time_shift), process.t_eps, process.T)


def eps_weight(process: Process, t: Array, settings: LossSettings) -> Array:
  """w(t) [B] of the eps-space squared error (module docstring)."""
  w = settings.weighting
  if w == 'eps':
    return jnp.ones_like(t)
  alpha, sigma = process.alpha(t), process.sigma(t)
  if w == 'likelihood':
    return process.g2(t) / sigma ** 2
  if w == 'x0':
    return (sigma / alpha) ** 2
  if w == 'v':
    return ((alpha ** 2 + sigma ** 2) / alpha) ** 2
  if w == 'min_snr':  # min(SNR, gamma) / SNR, written so that SNR -> 0 (zero terminal SNR) gives 1
    return jnp.minimum(1.0, settings.min_snr_gamma * (sigma / alpha) ** 2)
  if w == 'flow':  # u err = (sigma' - alpha' sigma / alpha) eps err, at fixed x_t
    return (process.d_sigma(t) - process.d_alpha(t) * sigma / alpha) ** 2
  s2, d2 = (sigma / alpha) ** 2, settings.sigma_data ** 2
  return (s2 + d2) / d2


def draw_noise(rng: Array, x0: Array, process: Process, settings: LossSettings) -> tuple[Array, Array]:
  """The loss's randomness for a batch x0 [B, ...]: times t [B] and noise eps [B, ...]."""
  rng_t, rng_eps = jax.random.split(rng)
  return sample_time(rng_t, x0.shape[0], process, settings), jax.random.normal(rng_eps, x0.shape, x0.dtype)


def denoising_loss_at(model_fn: ModelFn, process: Process, x0: Array, t: Array, eps: Array, settings: LossSettings,
                      cond: Any = None) -> tuple[Array, dict[str, Array]]:
  """Mean over the batch of w(t) * reduce_pixels((eps_hat - eps)^2) at given t [B] and eps [B, ...].

  Separate from the draws, so micro-batches of one batch (gradient accumulation) see exactly its noise.
  """
  x_t = process.perturb(x0, t, eps)
  _, eps_hat = model_fn(x_t, t, cond)
  err = jnp.square(eps_hat - eps).reshape(x0.shape[0], -1)
  err = jnp.mean(err, -1) if settings.reduce == 'mean' else jnp.sum(err, -1)
  per_example = eps_weight(process, t, settings) * err  # [B]
  return jnp.mean(per_example), {'t': t, 'per_example': per_example}


def denoising_loss(model_fn: ModelFn, process: Process, x0: Array, rng: Array, settings: LossSettings,
                   cond: Any = None) -> tuple[Array, dict[str, Array]]:
  """Mean over the batch of w(t) * reduce_pixels((eps_hat - eps)^2); x0 is [B, ...] in model space."""
  t, eps = draw_noise(rng, x0, process, settings)
  return denoising_loss_at(model_fn, process, x0, t, eps, settings, cond)
