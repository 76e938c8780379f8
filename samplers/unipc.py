"""UniPC (Zhao et al. 2023): multistep UniP predictor + UniC corrector, data-prediction form, on any process.

With lambda = log(alpha / sigma) and h the lambda step, every update is the DPM-Solver++ first-order step
  x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) x0_s
plus alpha_t B(h) times a combination of divided differences of earlier x0 predictions whose weights solve
UniPC's order conditions; B(h) = -h ('bh1') or e^-h - 1 ('bh2'). After each model evaluation at a new grid
point the corrector UniC re-does the step that led there using that evaluation too, which raises the order by one
at no extra NFE (the evaluation is reused by the next predictor step). Orders up to 3; lower orders during the
first steps and, with lower_order_final, the last ones (as diffusers' UniPCMultistepScheduler). The final step to
sigma = 0 is the x0 prediction, so NFE = num_steps.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from diffusion.parameterization import ModelFn
from diffusion.processes import Process
from samplers import base


@dataclasses.dataclass(frozen=True)
class UniPCSettings:
  num_steps: int = 10
  order: int = 2  # predictor order; the corrector adds one
  unipc_variant: str = 'bh2'  # bh1: B(h) = -h | bh2: B(h) = e^-h - 1
  spacing: str = 'logsnr'
  t_end: float | None = None
  timesteps: tuple[float, ...] | None = None  # an explicit decreasing grid (overrides num_steps / spacing)
  rho: float = 7.0
  time_shift: float = 1.0  # sigma / alpha of every grid time times this (Process.shift_time)
  lower_order_final: bool = True
  clip_range: tuple[float, float] | None = None


def _b(h: jax.Array, variant: str) -> tuple[list[jax.Array], jax.Array, jax.Array]:
  """([b_1, b_2, b_3], B(h), e^-h - 1): the right-hand sides of UniPC's order conditions for step h."""
  hh = -h
  h_phi_1 = jnp.expm1(hh)
  b_h = hh if variant == 'bh1' else h_phi_1
  h_phi_k, factorial, out = h_phi_1 / hh - 1.0, 1, []
  for i in range(1, 4):
    out.append(h_phi_k * factorial / b_h)
    factorial *= i + 1
    h_phi_k = h_phi_k / hh - 1.0 / factorial
  return out, b_h, h_phi_1


def _solve2(a11, a12, a21, a22, y1, y2):
  det = a11 * a22 - a12 * a21
  return (y1 * a22 - a12 * y2) / det, (a11 * y2 - a21 * y1) / det


def _det3(c0, c1, c2):
  """Determinant of the 3x3 matrix with columns c0, c1, c2."""
  return (c0[0] * (c1[1] * c2[2] - c1[2] * c2[1]) - c1[0] * (c0[1] * c2[2] - c0[2] * c2[1])
          + c2[0] * (c0[1] * c1[2] - c0[2] * c1[1]))


def _solve3(r1, r2, b):
  """Solves [[1, 1, 1], [r1, r2, 1], [r1^2, r2^2, 1]] rho = b (the third-order corrector's conditions) by
  Cramer's rule: plain arithmetic, no solver call inside the sampler loop."""
  cols = [(1.0, r1, r1 * r1), (1.0, r2, r2 * r2), (1.0, 1.0, 1.0)]
  det = _det3(*cols)
  return [_det3(*[b if j == k else cols[j] for j in range(3)]) / det for k in range(3)]


def sample(rng: jax.Array, model_fn: ModelFn, process: Process, shape: tuple[int, ...], settings: UniPCSettings,
           cond: Any = None) -> tuple[jax.Array, int]:
  if settings.order not in (1, 2, 3):
    raise ValueError(f'UniPC order must be 1, 2 or 3, got {settings.order}')
  if settings.unipc_variant not in ('bh1', 'bh2'):
    raise ValueError(f"unknown unipc_variant {settings.unipc_variant!r}; choose 'bh1' or 'bh2'")
  k = settings.num_steps
  ts = base.settings_grid(process, settings)  # [K]
  lam = 0.5 * process.log_snr(ts)  # [K]
  alpha, sigma = process.alpha(ts), process.sigma(ts)
  x = process.prior_sample(jax.random.split(rng)[0], shape)  # the prior draw every sampler makes from rng
  variant = settings.unipc_variant

  def predict(x, i):
    x0, _ = model_fn(x, base.broadcast_t(ts[i], x), cond)
    return base.clip_x0(x0, settings.clip_range)

  def ratio(j, i, h, available, missing):
    """(lambda_j - lambda_i) / h, or `missing` where grid point j does not exist yet. That branch is not
    selected; distinct negative stand-ins keep its linear systems regular, so its gradients stay finite."""
    return jnp.where(available, (lam[jnp.maximum(j, 0)] - lam[i]) / h, missing)

  def update(x_s, s, t, m_s, m_a, m_b, m_t, order, corrector):
    """One UniP (corrector=False) or UniC (m_t: the model at t) update from grid point s to t; m_a, m_b are
    the x0 predictions one and two grid points before s."""
    h = lam[t] - lam[s]
    b, b_h, h_phi_1 = _b(h, variant)
    r1, r2 = ratio(s - 1, s, h, s >= 1, -1.0), ratio(s - 2, s, h, s >= 2, -2.0)
    d1, d2 = (m_a - m_s) / r1, (m_b - m_s) / r2
    x1 = sigma[t] / sigma[s] * x_s - alpha[t] * h_phi_1 * m_s
    if corrector:
      dt = m_t - m_s
      res1 = 0.5 * dt
      c1, c2 = _solve2(1.0, 1.0, r1, 1.0, b[0], b[1])
      res2 = c1 * d1 + c2 * dt
      c = _solve3(r1, r2, b)
      res3 = c[0] * d1 + c[1] * d2 + c[2] * dt
    else:
      res1 = jnp.zeros_like(x_s)
      res2 = 0.5 * d1
      p1, p2 = _solve2(1.0, 1.0, r1, r2, b[0], b[1])
      res3 = p1 * d1 + p2 * d2
    res = jnp.where(order == 1, res1, jnp.where(order == 2, res2, res3))
    return x1 - alpha[t] * b_h * res

  def order_at(i):
    """Predictor order of the transition i -> i + 1 (i = 0..K-2); the final step to 0 is first order."""
    order = jnp.minimum(settings.order, i + 1)
    return jnp.minimum(order, k - i) if settings.lower_order_final else order

  def body(i, carry):
    x, x_prev, m1, m2, m3, prev_order = carry  # x at t_i (predicted); x_prev at t_{i-1} (corrected)
    m0 = predict(x, i)
    corrected = update(x_prev, i - 1, i, m1, m2, m3, m0, prev_order, corrector=True)
    x = jnp.where(i >= 1, corrected, x)
    order = order_at(i)
    x_next = update(x, i, i + 1, m0, m1, m2, None, order, corrector=False)
    return x_next, x, m0, m1, m2, order

  zeros = jnp.zeros(shape, jnp.float32)
  carry = (x, x, zeros, zeros, zeros, jnp.int32(1))
  x, *_ = base.step_loop(k - 1, body, carry)
  return predict(x, k - 1), k

