"""DPM-Solver++ multistep (Lu et al. 2022), orders 1-3, in the data-prediction form, on any process.

With lambda = log(alpha / sigma) and h = lambda_t - lambda_s, the first-order step is
  x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) x0_s,
and orders 2 and 3 add finite differences of the previous x0 predictions (diffusers' "midpoint" 2M and
its 3M update). The first steps use lower orders until enough history exists; with fewer than 15 steps
the last steps are lower-order too (lower_order_final), as recommended for few-step sampling. The final
step to sigma = 0 is the x0 prediction, so NFE = num_steps.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from diffusion.parameterization import ModelFn
from diffusion.processes import Process
from samplers import base


@dataclasses.dataclass(frozen=True)
class DPMSolverSettings:
  num_steps: int = 20
  order: int = 2
  spacing: str = 'logsnr'  # logsnr (DPM-Solver's choice for small images) | linspace | karras | leading | ...
  t_end: float | None = None
  timesteps: tuple[float, ...] | None = None  # an explicit decreasing grid (overrides num_steps / spacing)
  rho: float = 7.0
  time_shift: float = 1.0  # sigma / alpha of every grid time times this (Process.shift_time)
  lower_order_final: bool = True
  clip_range: tuple[float, float] | None = None


def sample(rng: jax.Array, model_fn: ModelFn, process: Process, shape: tuple[int, ...],
           settings: DPMSolverSettings, cond: Any = None) -> tuple[jax.Array, int]:
  if settings.order not in (1, 2, 3):
    raise ValueError(f'DPM-Solver++ order must be 1, 2 or 3, got {settings.order}')
  k = settings.num_steps
  ts = base.settings_grid(process, settings)  # [K]
  lam = 0.5 * process.log_snr(ts)  # [K]
  x = process.prior_sample(jax.random.split(rng)[0], shape)  # the prior draw every sampler makes from rng

  def predict(x, i):
    x0, _ = model_fn(x, base.broadcast_t(ts[i], x), cond)
    return base.clip_x0(x0, settings.clip_range)

  def order_at(i):
    """Order of the transition i -> i + 1 (i = 0..K-2); the final step to 0 is first order."""
    order = jnp.minimum(settings.order, i + 1)
    if settings.lower_order_final and k < 15:
      order = jnp.minimum(order, k - i)  # <= 2 on the last transition; the final step to 0 is first order
    return order

  def body(i, carry):
    x, m1, m2 = carry  # x0 predictions at grid points i - 1 and i - 2
    m0 = predict(x, i)
    s, t = ts[i], ts[i + 1]
    h = lam[i + 1] - lam[i]
    a_t, phi = process.alpha(t), jnp.expm1(-h)  # phi = e^-h - 1
    base_x = process.sigma(t) / process.sigma(s) * x
    x1 = base_x - a_t * phi * m0
    r0 = (lam[i] - lam[jnp.maximum(i - 1, 0)]) / h
    d1_0 = (m0 - m1) / jnp.where(i >= 1, r0, 1.0)
    x2 = x1 - 0.5 * a_t * phi * d1_0
    r1 = (lam[jnp.maximum(i - 1, 0)] - lam[jnp.maximum(i - 2, 0)]) / h
    d1_1 = (m1 - m2) / jnp.where(i >= 2, r1, 1.0)
    r01 = jnp.where(i >= 1, r0 + r1, 1.0)  # 0 at i = 0, where order 3 is not taken (a safe divisor for grads)
    d1 = d1_0 + r0 / r01 * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / r01
    x3 = x1 + a_t * (phi / h + 1) * d1 - a_t * ((phi + h) / h ** 2 - 0.5) * d2
    order = order_at(i)
    x_next = jnp.where(order == 1, x1, jnp.where(order == 2, x2, x3))
    return x_next, m0, m1

  zeros = jnp.zeros(shape, jnp.float32)
  x, _, _ = base.step_loop(k - 1, body, (x, zeros, zeros))
  return predict(x, k - 1), k
