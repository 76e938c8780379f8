"""Predictor-corrector samplers (Song et al. 2021) for any process.

Each grid step t -> s runs the corrector at t (n_steps_each times), then the predictor to s:
  predictors  euler_maruyama    x_s = x + [f x - g^2 score] (s - t) + g sqrt(t - s) z
              reverse_diffusion x_s = (2 - alpha_ts) x + beta_ts score + sqrt(beta_ts) z   (the reverse of the
                                discretized forward step x_t = alpha_ts x_s + sqrt(beta_ts) z)
              ancestral         x_s ~ q(x_s | x_t, x0_hat)
              none
  correctors  langevin          step = 2 alpha_ts^2 (snr |z| / |score|)^2    (norms averaged over the batch)
              ald               step = 2 alpha_ts^2 (snr sigma_t)^2            (annealed Langevin dynamics)
              none
  with alpha_ts = alpha_t / alpha_s and beta_ts = sigma_t^2 - alpha_ts^2 sigma_s^2. The last grid time is
followed by the final noise removal x0 = E[x_0 | x_t].
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from diffusion.parameterization import ModelFn
from diffusion.processes import Process, bcast
from samplers import base
from samplers.ancestral import posterior_step

PREDICTORS = ('euler_maruyama', 'reverse_diffusion', 'ancestral', 'none')
CORRECTORS = ('langevin', 'ald', 'none')


@dataclasses.dataclass(frozen=True)
class PCSettings:
  num_steps: int = 1000
  predictor: str = 'reverse_diffusion'
  corrector: str = 'langevin'
  snr: float = 0.16
  n_steps_each: int = 1
  spacing: str = 'linspace'
  rho: float = 7.0
  time_shift: float = 1.0  # sigma / alpha of every grid time times this (Process.shift_time)
  t_end: float | None = None
  timesteps: tuple[float, ...] | None = None  # an explicit decreasing grid (overrides num_steps / spacing)
  denoise: bool = True


def _norm(a):
  return jnp.mean(jnp.linalg.norm(a.reshape(a.shape[0], -1), axis=-1))


def make_step(model_fn: ModelFn, process: Process, settings: PCSettings, cond: Any = None):
  """step(x, t, s, rng) -> x_s: the corrector at t, then the predictor to s."""
  if settings.predictor not in PREDICTORS:
    raise ValueError(f'unknown predictor {settings.predictor!r}; choose one of {PREDICTORS}')
  if settings.corrector not in CORRECTORS:
    raise ValueError(f'unknown corrector {settings.corrector!r}; choose one of {CORRECTORS}')

  def predict(x, t):
    x0, eps = model_fn(x, base.broadcast_t(t, x), cond)
    return x0, -eps / bcast(process.sigma(t), x)

  def corrector(x, t, s, rng):
    alpha = (process.alpha(t) / process.alpha(s)) ** 2

    def one(j, x):
      z = jax.random.normal(jax.random.fold_in(rng, j), x.shape)
      _, score = predict(x, t)
      if settings.corrector == 'langevin':
        step = 2 * alpha * (settings.snr * _norm(z) / _norm(score)) ** 2
      else:
        step = 2 * alpha * (settings.snr * process.sigma(t)) ** 2
      return x + step * score + jnp.sqrt(2 * step) * z

    for j in range(settings.n_steps_each):  # unrolled (1-2 steps): no loop nested in the sampler's loop
      x = one(j, x)
    return x

  def predictor(x, t, s, z):
    if settings.predictor == 'euler_maruyama':
      drift, g = process.reverse(lambda x, t: predict(x, t)[1]).sde(x, base.broadcast_t(t, x))
      return x + drift * (s - t) + bcast(g, x) * jnp.sqrt(t - s) * z
    x0, score = predict(x, t)
    if settings.predictor == 'ancestral':
      return posterior_step(process, x, x0, t, s, z)
    a_ts = process.alpha(t) / process.alpha(s)
    beta_ts = process.sigma(t) ** 2 - a_ts ** 2 * process.sigma(s) ** 2
    return (2 - a_ts) * x + beta_ts * score + jnp.sqrt(beta_ts) * z

  def step(x, t, s, rng):
    rng_c, rng_p = jax.random.split(rng)
    if settings.corrector != 'none':
      x = corrector(x, t, s, rng_c)
    if settings.predictor != 'none':
      x = predictor(x, t, s, jax.random.normal(rng_p, x.shape))
    return x

  return step


def nfe_per_step(settings: PCSettings) -> int:
  return int(settings.predictor != 'none') + int(settings.corrector != 'none') * settings.n_steps_each


def sample(rng: jax.Array, model_fn: ModelFn, process: Process, shape: tuple[int, ...], settings: PCSettings,
           cond: Any = None) -> tuple[jax.Array, int]:
  ts = base.settings_grid(process, settings)
  return base.run_grid(rng, model_fn, process, shape, ts, make_step(model_fn, process, settings, cond),
                       nfe_per_step=nfe_per_step(settings), denoise=settings.denoise, cond=cond)
