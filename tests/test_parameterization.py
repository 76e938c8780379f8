"""eps / x0 / v / score conversions and EDM preconditioning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import parameterization as pz
from diffusion import processes


def _setup(seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  x0 = jax.random.normal(k[0], (64, 5))
  eps = jax.random.normal(k[1], (64, 5))
  alpha = jax.random.uniform(k[2], (64, 1), minval=0.05, maxval=1.0)
  sigma = jax.random.uniform(k[3], (64, 1), minval=0.05, maxval=3.0)
  return x0, eps, alpha, sigma, alpha * x0 + sigma * eps


def test_conversions_round_trip():
  x0, eps, alpha, sigma, x = _setup()
  tol = dict(rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(pz.eps_to_x0(eps, x, alpha, sigma), x0, **tol)
  np.testing.assert_allclose(pz.x0_to_eps(x0, x, alpha, sigma), eps, **tol)
  np.testing.assert_allclose(pz.score_to_eps(pz.eps_to_score(eps, sigma), sigma), eps, rtol=1e-6)
  v = pz.x0_eps_to_v(x0, eps, alpha, sigma)
  x0_v, eps_v = pz.v_to_x0_eps(v, x, alpha, sigma)
  np.testing.assert_allclose(x0_v, x0, **tol)
  np.testing.assert_allclose(eps_v, eps, **tol)
  # to_x0_eps agrees for every kind of network output
  score = pz.eps_to_score(eps, sigma)
  for kind, out in (('eps', eps), ('x0', x0), ('v', v), ('score', score)):
    got_x0, got_eps = pz.to_x0_eps(kind, out, x, alpha, sigma)
    np.testing.assert_allclose(got_x0, x0, **tol)
    np.testing.assert_allclose(got_eps, eps, **tol)


def test_edm_coefficients_match_the_paper():
  """Karras et al. 2022, Table 1: c_skip = sd^2/(s^2+sd^2), c_out = s sd / sqrt(s^2+sd^2),
  c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4; and the effective training target has unit variance."""
  sd = 0.5
  s = jnp.array([0.002, 0.1, 0.5, 1.0, 10.0, 80.0])
  c = pz.edm_coefficients(s, sd)
  for i, si in enumerate(np.asarray(s, np.float64)):
    np.testing.assert_allclose(c.c_skip[i], sd ** 2 / (si ** 2 + sd ** 2), rtol=1e-6)
    np.testing.assert_allclose(c.c_out[i], si * sd / np.sqrt(si ** 2 + sd ** 2), rtol=1e-6)
    np.testing.assert_allclose(c.c_in[i], 1 / np.sqrt(si ** 2 + sd ** 2), rtol=1e-6)
    np.testing.assert_allclose(c.c_noise[i], np.log(si) / 4, rtol=1e-6, atol=1e-7)
  # Var(c_in x) = 1 and Var(F target) = Var((x0 - c_skip x) / c_out) = 1 for data of std sd (paper, App. B.6)
  np.testing.assert_allclose(c.c_in ** 2 * (sd ** 2 + s ** 2), 1.0, rtol=1e-5)
  np.testing.assert_allclose(((1 - c.c_skip) ** 2 * sd ** 2 + c.c_skip ** 2 * s ** 2) / c.c_out ** 2, 1.0,
                             rtol=1e-5)


@pytest.mark.parametrize('prediction', pz.PREDICTIONS)
def test_make_model_fn_inverts_a_perfect_network(prediction):
  """A network that outputs the exact target of its kind gives back the true x0 and eps."""
  process = processes.get_process('vp')
  x0, eps, _, _, _ = _setup(1)
  t = jnp.linspace(0.05, 0.95, 64)
  x = process.perturb(x0, t, eps)
  a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]

  def net(x_in, c_noise, cond):
    np.testing.assert_allclose(c_noise, process.noise_cond(t), rtol=1e-6)
    if prediction == 'eps':
      return eps
    if prediction == 'x0':
      return x0
    if prediction == 'v':
      return pz.x0_eps_to_v(x0, eps, a, s)
    if prediction == 'score':
      return pz.eps_to_score(eps, s)
    if prediction == 'flow':  # dx_t / dt of score_sde's VP: alpha' = -beta alpha / 2, sigma' = -alpha alpha' / sigma
      d_a = -0.5 * process.beta(t)[:, None] * a
      return pz.x0_eps_to_flow(x0, eps, d_a, -a * d_a / s)
    c = pz.edm_coefficients(s / a, 0.5)
    np.testing.assert_allclose(x_in, c.c_in * x / a, rtol=1e-5)
    return (x0 - c.c_skip * x / a) / c.c_out

  got_x0, got_eps = pz.make_model_fn(net, process, prediction)(x, t, None)
  np.testing.assert_allclose(got_x0, x0, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(got_eps, eps, rtol=1e-3, atol=1e-3)


def test_flow_prediction_on_the_flow_process_is_eps_minus_x0():
  """Rectified flow's velocity target eps - x0 gives back x0 and eps, also at T where alpha = 2^-12."""
  process = processes.get_process('flow')
  x0, eps, _, _, _ = _setup(2)
  t = jnp.concatenate([jnp.linspace(0.001, 0.99, 63), jnp.array([process.T])])
  x = process.perturb(x0, t, eps)
  got_x0, got_eps = pz.make_model_fn(lambda x_in, c, cond: eps - x0, process, 'flow')(x, t, None)
  np.testing.assert_allclose(got_x0, x0, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got_eps, eps, rtol=1e-4, atol=1e-4)


def test_unknown_prediction():
  with pytest.raises(ValueError, match='unknown prediction'):
    pz.make_model_fn(lambda *a: a[0], processes.get_process('vp'), 'epsilon')
