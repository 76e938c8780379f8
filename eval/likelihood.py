"""Negative log-likelihood in bits/dim through the probability-flow ODE (Song et al. 2021, App. D).

Along the PF-ODE dx/dt = v(x, t) (samplers/ode.py) the density obeys d log p_t(x(t)) / dt = -div v, so
  log p_{t_eps}(x) = prior_logp(x(T)) + int_{t_eps}^T div v(x(t), t) dt.
We integrate the augmented state (x, int div v) from t_eps to T with diffrax Dopri5. The divergence is the
Hutchinson-Skilling estimate eps^T (dv/dx) eps, with probes eps drawn once per solve (as score_sde; unbiased
for the whole integral), or the exact trace of the Jacobian, one row per dimension (small d only). Both use
reverse mode (vector-Jacobian products, eps^T J eps = eps^T (J eps)): on GPUs the network's GroupNorm defines
only its backward pass (models/layers.group_norm_act).

Bits/dim are those of 256-level pixels k. Uniform dequantization v = k + u, u ~ U[0, 1)^D, bounds the
discrete likelihood, -log P(k) <= E_u[-log p_V(k + u)], and p_V follows from the model-space density by the
change of variables through the elementwise data scaler x = s(v):
  -log p_V(v) = -log p_X(s(v)) - sum_i log |ds_i / dv_i|.
data/scaler.py maps x = a v / 256 + b with a = 2 (centered, [-1, 1]) or 1 ([0, 1]), so
  bpd = nll_X / (D ln 2) + log2(256) - log2(a) = nll_X / (D ln 2) + 7 (centered) or + 8,
which is score_sde's `offset = 7 - inverse_scaler(-1)`. The log-Jacobian is measured on the scaler itself
(a jvp of data.scaler.to_model), never hard-coded. Without dequantization the scaler maps x = a k / 255 + b
and the same formula gives the density per unit pixel level (offset log2(255 / a); score_sde adds 7 or 8
there too, 0.0056 bits more); that is not a bound on the discrete likelihood.
"""

import dataclasses
import math
from typing import Any, Callable

import diffrax
import jax
import jax.numpy as jnp

from data import scaler
from diffusion.parameterization import ModelFn
from diffusion.processes import Process
from samplers import ode

Array = jax.Array
ESTIMATORS = ('hutchinson_rademacher', 'hutchinson_gaussian', 'exact')
DEQUANTIZE = ('uniform', 'none')
ToModel = Callable[..., Array]  # (images [B, ...], *, centered, dequantize, rng) -> x [B, ...], elementwise


@dataclasses.dataclass(frozen=True)
class LikelihoodSettings:
  estimator: str = 'hutchinson_rademacher'  # divergence: hutchinson_rademacher | hutchinson_gaussian | exact
  num_probes: int = 1  # Hutchinson probes per example, averaged in every divergence evaluation
  rtol: float = 1e-5  # Dopri5 tolerances (score_sde's)
  atol: float = 1e-5
  t_eps: float | None = None  # start time; None: process.t_eps (1e-5 where that is 0, as for DDPM)
  max_steps: int = 4096  # a solve that needs more returns NaN
  centered: bool = True  # the scaler's model range: [-1, 1] or [0, 1]
  dequantize: str = 'uniform'  # uniform: v = k + U[0, 1) (a bound on the discrete NLL) | none


def _check(settings: LikelihoodSettings):
  if settings.estimator not in ESTIMATORS:
    raise ValueError(f'unknown divergence estimator {settings.estimator!r}; choose one of {ESTIMATORS}')
  if settings.dequantize not in DEQUANTIZE:
    raise ValueError(f'unknown dequantization {settings.dequantize!r}; choose one of {DEQUANTIZE}')
  if settings.num_probes < 1:
    raise ValueError(f'num_probes must be >= 1, got {settings.num_probes}')


def start_time(process: Process, settings: LikelihoodSettings) -> float:
  if settings.t_eps is not None:
    return float(settings.t_eps)
  return float(process.t_eps) or 1e-5  # sigma(0) = 0 makes the score undefined


def _probes(rng: Array, shape: tuple[int, ...], settings: LikelihoodSettings) -> Array:
  """Hutchinson probes [M, B, ...] with E[eps eps^T] = I."""
  shape = (settings.num_probes,) + shape
  if settings.estimator == 'hutchinson_rademacher':
    return jax.random.rademacher(rng, shape, jnp.float32)
  return jax.random.normal(rng, shape, jnp.float32)


def _augmented_field(model_fn: ModelFn, process: Process, cond: Any, probes: Array | None):
  """(x, delta) -> (v(x, t), div v(x, t)): the PF-ODE and its divergence, one value per example; exact
  where probes is None, else the Hutchinson mean over the probes [M, B, ...]."""
  flow = ode.probability_flow(model_fn, process, cond).vector_field

  def field(t, state, args):
    x, _ = state  # [B, ...], [B]
    b, d = x.shape[0], math.prod(x.shape[1:])
    v, vjp = jax.vjp(lambda y: flow(t, y, args), x)  # examples are independent: J is block diagonal
    row = lambda u: vjp(u.astype(v.dtype))[0]  # u^T J per example
    if probes is None:  # exact: row i of every example's Jacobian from the basis cotangent e_i
      basis = jnp.broadcast_to(jnp.eye(d, dtype=x.dtype)[:, None, :], (d, b, d)).reshape((d,) + x.shape)
      rows = jax.vmap(row)(basis).reshape(d, b, d)  # [i, B, j] = dv_i / dx_j
      div = jnp.einsum('ibi->b', rows)
    else:
      ej = jax.vmap(row)(probes)  # [M, B, ...]
      div = jnp.mean(jnp.sum((probes * ej).reshape(probes.shape[0], b, d), -1), 0)
    return v, div

  return field


def integrate_divergence(rng: Array, model_fn: ModelFn, process: Process, x: Array, settings: LikelihoodSettings,
                         cond: Any = None) -> tuple[Array, Array, Array]:
  """Solves the augmented ODE from t_eps to T for model-space points x [B, ...]: the encoding z = x(T)
  [B, ...], delta_logp = int_{t_eps}^T div v dt [B] (nats) and the NFE.

  One adaptive solve for the batch; a solve that fails (max_steps) gives NaN rather than a host-side error.
  The NFE counts augmented-field evaluations (each one model_fn call plus its vector-Jacobian products),
  rejected steps included.
  """
  _check(settings)
  x = jnp.asarray(x, jnp.float32)
  probes = None if settings.estimator == 'exact' else _probes(rng, x.shape, settings)
  field = _augmented_field(model_fn, process, cond, probes)
  t0, t1 = start_time(process, settings), float(process.T)
  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(field), diffrax.Dopri5(), t0, t1, (t1 - t0) / 64, (x, jnp.zeros(x.shape[:1], jnp.float32)),
      stepsize_controller=diffrax.PIDController(rtol=settings.rtol, atol=settings.atol),
      saveat=diffrax.SaveAt(t1=True), max_steps=settings.max_steps, throw=False)
  ok = sol.result == diffrax.RESULTS.successful
  z, delta = jnp.where(ok, sol.ys[0][0], jnp.nan), jnp.where(ok, sol.ys[1][0], jnp.nan)  # [B, ...], [B]
  return z, delta, 6 * sol.stats['num_steps'] + 1  # Dopri5 is FSAL: 6 new stages per (also rejected) step


def ode_logp(rng: Array, model_fn: ModelFn, process: Process, x: Array, settings: LikelihoodSettings,
             cond: Any = None) -> tuple[Array, Array]:
  """log p_{t_eps}(x) = prior_logp(z) + delta_logp in nats [B] of model-space points x [B, ...], and the NFE."""
  z, delta, nfe = integrate_divergence(rng, model_fn, process, x, settings, cond)
  return process.prior_logp(z) + delta, nfe


def pixels_to_model(rng: Array, images: Array, settings: LikelihoodSettings,
                    to_model: ToModel = scaler.to_model) -> tuple[Array, Array]:
  """Model-space inputs x [B, ...] of pixel levels images [B, ...] (0..255), dequantized as configured, and
  log|det dx/dv| [B], the log-Jacobian of the scaler from pixel-level units v to model space.

  The Jacobian is measured with a jvp through `to_model`, which must act elementwise (every pixel scaler
  does), so the tangent of ones gives the diagonal.
  """
  v = jnp.asarray(images).astype(jnp.float32)  # [B, ...] integer levels
  fn = lambda v: to_model(v, centered=settings.centered, dequantize=settings.dequantize == 'uniform', rng=rng)
  x, dx_dv = jax.jvp(fn, (v,), (jnp.ones_like(v),))
  return x, jnp.sum(jnp.log(jnp.abs(dx_dv)).reshape(v.shape[0], -1), -1)


def nll_bpd(rng: Array, model_fn: ModelFn, process: Process, images: Array, settings: LikelihoodSettings,
            cond: Any = None, to_model: ToModel = scaler.to_model) -> tuple[Array, Array]:
  """Negative log-likelihood in bits/dim [B] of pixel images [B, ...] (uint8, or any dtype holding the
  levels 0..255; not [0, 1] floats) and the NFE: -(log p_X(x) + log|det dx/dv|) / (D ln 2)."""
  _check(settings)
  rng_deq, rng_div = jax.random.split(rng)
  x, log_det = pixels_to_model(rng_deq, images, settings, to_model)
  logp, nfe = ode_logp(rng_div, model_fn, process, x, settings, cond)
  d = math.prod(x.shape[1:])
  return -(logp + log_det) / (d * math.log(2.0)), nfe
