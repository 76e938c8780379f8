"""PF-ODE likelihood against analytic densities (the exact-score test bed) and the bits/dim offset."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from data import scaler
from diffusion import processes
from diffusion.exact_score import GaussianMixture
from eval import likelihood as lk

EXACT = lk.LikelihoodSettings(estimator='exact')


def _mixture(shape, seed=0):
  """Two anisotropic components (stds 0.1..0.3), built and sampled in numpy: no eager jax compilations."""
  r, d = np.random.default_rng(seed), math.prod(shape)
  means = r.uniform(-0.5, 0.5, (2, d))
  q, _ = np.linalg.qr(r.normal(size=(2, d, d)))
  covs = np.einsum('kij,kj,klj->kil', q, r.uniform(0.1, 0.3, (2, d)) ** 2, q)
  return GaussianMixture.create([0.4, 0.6], means, covs, shape)


def _sample(m, n, seed=1):
  r = np.random.default_rng(seed)
  w = np.asarray(m.weights, np.float64)
  k = r.choice(len(w), n, p=w / w.sum())
  z = r.normal(size=(n, m.dim)) * np.sqrt(np.asarray(m.eigvals))[k]
  x = np.asarray(m.means)[k] + np.einsum('nij,nj->ni', np.asarray(m.eigvecs)[k], z)
  return jnp.asarray(x.reshape((n,) + m.event_shape), jnp.float32)


@functools.lru_cache(maxsize=None)
def _solve_fn(process, settings, event_shape):
  """Jitted (z, delta_logp, log p = prior_logp(z) + delta_logp, nfe), with the mixture as an argument so
  mixtures of one shape share a compilation."""

  @jax.jit
  def fn(rng, x, w, mu, vecs, vals):
    m = GaussianMixture(w, mu, vecs, vals, event_shape)
    z, delta, nfe = lk.integrate_divergence(rng, m.model_fn(process), process, x, settings)
    return z, delta, process.prior_logp(z) + delta, nfe

  return lambda rng, x, m: fn(rng, x, m.weights, m.means, m.eigvecs, m.eigvals)


def _analytic_logp(m, process, x, t):
  """log p_t(x) of the noised mixture, in float64 with scipy: components N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I)."""
  alpha, sigma = float(process.alpha(t)), float(process.sigma(t))
  vecs, vals, means = (np.asarray(a, np.float64) for a in (m.eigvecs, m.eigvals, m.means))
  x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
  comps = [stats.multivariate_normal(alpha * means[k], (vecs[k] * (alpha ** 2 * vals[k] + sigma ** 2)) @ vecs[k].T)
           .logpdf(x) + math.log(float(m.weights[k])) for k in range(len(means))]
  return special.logsumexp(np.stack(comps, -1), -1)


def _bits(nats, d):
  return np.asarray(nats) / (d * math.log(2))


@pytest.mark.parametrize('name,shape', [('vp', (4, 4, 1)), ('ve', (8,)), ('subvp', (8,)), ('flow', (8,))])
def test_exact_divergence_matches_the_analytic_density(name, shape):
  """With the exact model and the exact trace, the ODE log-density is the analytic density of the data
  marginal at t_eps: to 1e-3 bits/dim (measured <= 3e-4) when the prior at T is the true marginal there, and
  to 0.02 with the process's prior N(0, prior_std^2 I), whose own mismatch (the VP mean alpha(T) mu, the VE
  mean mu against sigma_max = 50) is up to ~1e-2 bits/dim here (measured 9e-3 for VE)."""
  process, d = processes.get_process(name), math.prod(shape)
  m = _mixture(shape)
  x = _sample(m, 8)
  z, delta, logp, nfe = _solve_fn(process, EXACT, shape)(jax.random.key(2), x, m)
  want = _analytic_logp(m, process, x, lk.start_time(process, EXACT))
  err = np.abs(_bits(logp - want, d))
  assert err.max() < 2e-2, err
  err_solver = np.abs(_bits(np.asarray(delta) + _analytic_logp(m, process, z, process.T) - want, d))
  assert err_solver.max() < 1e-3, err_solver
  assert 20 < int(nfe) < 1000


@pytest.mark.parametrize('estimator,num_probes', [('hutchinson_rademacher', 1), ('hutchinson_gaussian', 2)])
def test_hutchinson_is_unbiased(estimator, num_probes):
  """Each row of a replicated batch draws its own probe: the mean over rows is within a few standard
  errors of the exact divergence integral."""
  process, shape, reps = processes.get_process('vp'), (4, 4, 1), 64
  m = _mixture(shape)
  x = _sample(m, 8)
  exact = _solve_fn(process, EXACT, shape)(jax.random.key(2), x, m)[2]
  settings = lk.LikelihoodSettings(estimator=estimator, num_probes=num_probes)
  est = _solve_fn(process, settings, shape)(jax.random.key(3), jnp.repeat(x, reps, axis=0), m)[2]
  est = np.asarray(est).reshape(8, reps)
  se = est.std(1, ddof=1) / math.sqrt(reps)
  z = (est.mean(1) - np.asarray(exact)) / se
  assert np.all(se > 0) and np.all(np.isfinite(est))
  assert np.max(np.abs(z)) < 4.0 and np.mean(z ** 2) < 3.0, z


@pytest.mark.parametrize('centered', [True, False])
@pytest.mark.parametrize('dequantize', ['uniform', 'none'])
def test_scaler_jacobian_gives_the_bpd_offset(centered, dequantize):
  """log|dx/dv| per dim is log(a / 256) (dequantized) or log(a / 255), a = 2 centered else 1:
  the offsets 7 / 8 bits of score_sde, measured on data/scaler.py."""
  images = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 1)).astype(np.uint8)
  settings = lk.LikelihoodSettings(centered=centered, dequantize=dequantize)
  x, log_det = jax.jit(lambda r, im: lk.pixels_to_model(r, im, settings))(jax.random.key(1), images)
  a, b = (2.0, -1.0) if centered else (1.0, 0.0)
  levels = 256.0 if dequantize == 'uniform' else 255.0
  np.testing.assert_allclose(log_det, 16 * math.log(a / levels), rtol=1e-6)
  v = (np.asarray(x) - b) / a * levels  # back to pixel units
  k = np.asarray(images, np.float64)
  if dequantize == 'uniform':  # k + u, u in [0, 1): inside the bin, not at its corner
    assert np.all(v >= k - 1e-4) and np.all(v < k + 1 + 1e-4) and np.std(v - k) > 0.2
  else:
    np.testing.assert_allclose(v, k, atol=1e-3)
  expected = {True: 7.0, False: 8.0}[centered] if dequantize == 'uniform' else math.log2(255 / a)
  np.testing.assert_allclose(-log_det / (16 * math.log(2)), expected, atol=1e-5)


def test_offset_follows_a_custom_scaler():
  """A scaler to [-2, 2] has a = 4: offset log2(256 / 4) = 6."""
  to_model = lambda v, *, centered, dequantize, rng: 4 * scaler.to_model(v, centered=False, dequantize=dequantize,
                                                                         rng=rng) - 2
  images = np.zeros((2, 3), np.uint8)
  _, log_det = jax.jit(lambda r, im: lk.pixels_to_model(r, im, lk.LikelihoodSettings(), to_model))(
      jax.random.key(0), images)
  np.testing.assert_allclose(-log_det / (3 * math.log(2)), 6.0, rtol=1e-6)


def _to_uint8(x, centered):
  a, b = (2.0, -1.0) if centered else (1.0, 0.0)
  return np.clip(np.round((np.asarray(x) - b) / a * 255), 0, 255).astype(np.uint8)


def _discrete_gaussian_bpd(images, mean, std, centered):
  """-log2 P(k) / D of the 256 bins of a product Gaussian in model space, with scipy in float64: an
  independent computation of what dequantized bits/dim approximate for a density smooth on a bin."""
  a, b = (2.0, -1.0) if centered else (1.0, 0.0)
  k = np.asarray(images, np.float64)
  lo, hi = (a * k / 256 + b - mean) / std, (a * (k + 1) / 256 + b - mean) / std
  p = special.ndtr(hi) - special.ndtr(lo)
  return -np.log2(p).reshape(k.shape[0], -1).mean(1)


def test_bpd_of_uint8_images_matches_the_discrete_probability():
  """End to end with the default settings (Rademacher, uniform dequantization, [-1, 1]): uint8 images against
  the bin probabilities of the model-space density N(mean, std^2 I) at t_eps. A wrong offset is off by >= 1
  bit. The density is isotropic, so the field's Jacobian is c(t) I and the Rademacher estimate is exact."""
  process, shape, n, mean, std = processes.get_process('vp'), (4, 4, 1), 16, 0.1, 0.25
  m = GaussianMixture.create([1.0], np.full((1, 16), mean), std ** 2 * np.eye(16)[None], shape)
  images = _to_uint8(_sample(m, n), centered=True)
  settings = lk.LikelihoodSettings()
  bpd, nfe = jax.jit(lambda r, im: lk.nll_bpd(r, m.model_fn(process), process, im, settings))(
      jax.random.key(2), images)
  t = lk.start_time(process, settings)
  alpha, sigma = float(process.alpha(t)), float(process.sigma(t))
  ref = _discrete_gaussian_bpd(images, alpha * mean, math.sqrt((alpha * std) ** 2 + sigma ** 2), centered=True)
  bpd = np.asarray(bpd)
  # Per image only the one dequantization draw u differs from the bin average (~0.003 bits).
  assert np.abs(bpd - ref).max() < 0.02 and abs(bpd.mean() - ref.mean()) < 0.005, (bpd, ref)
  # Plausible: between 0 and 8 bits, near the entropy of the discretized Gaussian, log2(128 std sqrt(2 pi e)).
  assert 0 < bpd.mean() < 8 and abs(bpd.mean() - math.log2(128 * std * math.sqrt(2 * math.pi * math.e))) < 0.5
  assert 20 < int(nfe) < 1000


def test_settings_are_checked_and_failed_solves_give_nan():
  process = processes.get_process('vp')
  m = _mixture((8,))
  x = _sample(m, 2)
  with pytest.raises(ValueError, match='estimator'):
    lk.ode_logp(jax.random.key(0), m.model_fn(process), process, x, lk.LikelihoodSettings(estimator='skilling'))
  with pytest.raises(ValueError, match='dequantization'):
    lk.nll_bpd(jax.random.key(0), m.model_fn(process), process, x, lk.LikelihoodSettings(dequantize='gauss'))
  logp, _ = jax.jit(lambda r, x: lk.ode_logp(r, m.model_fn(process), process, x, lk.LikelihoodSettings(max_steps=2)))(
      jax.random.key(0), x)
  assert np.all(np.isnan(logp))
