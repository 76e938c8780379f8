"""What the network predicts, and conversions between eps, x0, v and the score.

All conversions follow from x_t = alpha x0 + sigma eps:
  x0 = (x - sigma eps) / alpha,    eps = (x - alpha x0) / sigma,    score = -eps / sigma,
  v  = alpha eps - sigma x0   =>   x0 = (alpha x - sigma v) / (alpha^2 + sigma^2),
                                   eps = (sigma x + alpha v) / (alpha^2 + sigma^2),
  u  = alpha' x0 + sigma' eps  (the velocity dx_t / dt; on the flow process u = eps - x0)
                               =>  x0 = (sigma' x - sigma u) / D,  eps = (alpha u - alpha' x) / D,
                                   D = alpha sigma' - alpha' sigma  (> 0: log-SNR decreases).
'edm' is the preconditioned denoiser of Karras et al. (2022) on the scaled variable x / alpha with noise
level s = sigma / alpha, so it works on every process:
  D(x; s) = c_skip(s) x/alpha + c_out(s) F(c_in(s) x/alpha, c_noise).

`make_model_fn` turns a raw network into the function every sampler and loss uses:
  model_fn(x [B, ...], t [B], cond) -> (x0 [B, ...], eps [B, ...]).
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from diffusion.processes import Process, bcast

Array = jax.Array
PREDICTIONS = ('eps', 'x0', 'v', 'score', 'edm', 'flow')
NetFn = Callable[[Array, Array, Any], Array]  # (x_in [B, ...], noise_cond [B], cond) -> output [B, ...]
ModelFn = Callable[[Array, Array, Any], tuple[Array, Array]]  # (x, t, cond) -> (x0, eps)


def eps_to_x0(eps, x, alpha, sigma):
  return (x - sigma * eps) / alpha


def x0_to_eps(x0, x, alpha, sigma):
  return (x - alpha * x0) / sigma


def eps_to_score(eps, sigma):
  return -eps / sigma


def score_to_eps(score, sigma):
  return -sigma * score


def x0_eps_to_v(x0, eps, alpha, sigma):
  return alpha * eps - sigma * x0


def v_to_x0_eps(v, x, alpha, sigma):
  norm = alpha ** 2 + sigma ** 2
  return (alpha * x - sigma * v) / norm, (sigma * x + alpha * v) / norm


def x0_eps_to_flow(x0, eps, d_alpha, d_sigma):
  return d_alpha * x0 + d_sigma * eps


def flow_to_x0_eps(u, x, alpha, sigma, d_alpha, d_sigma):
  det = alpha * d_sigma - d_alpha * sigma
  return (d_sigma * x - sigma * u) / det, (alpha * u - d_alpha * x) / det


def to_x0_eps(prediction: str, out: Array, x: Array, alpha: Array, sigma: Array) -> tuple[Array, Array]:
  """(x0, eps) from a network output of kind eps | x0 | v | score; alpha and sigma broadcast to x ('flow' also
  needs the time derivatives: flow_to_x0_eps)."""
  if prediction == 'eps':
    return eps_to_x0(out, x, alpha, sigma), out
  if prediction == 'x0':
    return out, x0_to_eps(out, x, alpha, sigma)
  if prediction == 'v':
    return v_to_x0_eps(out, x, alpha, sigma)
  if prediction == 'score':
    eps = score_to_eps(out, sigma)
    return eps_to_x0(eps, x, alpha, sigma), eps
  raise ValueError(f'unknown prediction {prediction!r}; choose one of {PREDICTIONS}')


class EDMCoefficients(NamedTuple):
  c_skip: Array
  c_out: Array
  c_in: Array
  c_noise: Array


def edm_coefficients(s: Array, sigma_data: float) -> EDMCoefficients:
  """Karras et al. (2022), Table 1, at noise level s."""
  s2, d2 = s ** 2, sigma_data ** 2
  return EDMCoefficients(c_skip=d2 / (s2 + d2), c_out=s * sigma_data / jnp.sqrt(s2 + d2),
                         c_in=1 / jnp.sqrt(s2 + d2), c_noise=0.25 * jnp.log(s))


def make_model_fn(net_fn: NetFn, process: Process, prediction: str, sigma_data: float = 0.5) -> ModelFn:
  """Wraps a raw network into model_fn(x, t, cond) -> (x0, eps).

  The network is conditioned on process.noise_cond(t). For 'edm' it sees c_in x / alpha and its output is
  combined by the preconditioning; for the other kinds it sees x_t itself (score_sde's convention).
  """
  if prediction not in PREDICTIONS:
    raise ValueError(f'unknown prediction {prediction!r}; choose one of {PREDICTIONS}')

  def model_fn(x, t, cond=None):
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
    alpha, sigma = bcast(process.alpha(t), x), bcast(process.sigma(t), x)
    c_noise = process.noise_cond(t)
    if prediction == 'edm':
      c = edm_coefficients(sigma / alpha, sigma_data)
      out = net_fn(c.c_in * x / alpha, c_noise, cond).astype(jnp.float32)
      x0 = c.c_skip * x / alpha + c.c_out * out
      return x0, x0_to_eps(x0, x, alpha, sigma)
    out = net_fn(x, c_noise, cond).astype(jnp.float32)
    if prediction == 'flow':
      return flow_to_x0_eps(out, x, alpha, sigma, bcast(process.d_alpha(t), x), bcast(process.d_sigma(t), x))
    return to_x0_eps(prediction, out, x, alpha, sigma)

  return model_fn
