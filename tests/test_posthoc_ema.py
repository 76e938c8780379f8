"""Post-hoc EMA (train/posthoc_ema.py) on a scalar parameter trajectory, where every EMA can be run directly."""

import numpy as np
import pytest
from scipy import integrate

from train import posthoc_ema


def _power_ema(trajectory, gamma):
  """The power-function EMA recursion of every step: [T]."""
  ema, out = 0.0, []
  for t, value in enumerate(trajectory, start=1):
    decay = (1 - 1 / t) ** (gamma + 1)  # in float64
    ema = decay * ema + (1 - decay) * value
    out.append(ema)
  return np.array(out)


def test_gamma_of_sigma_rel():
  """Karras et al.'s pairs (sigma_rel 0.05 -> gamma 16.97, 0.10 -> 6.94), and the recursion's weights over the
  steps, whose relative width is sigma_rel, for T = 4000 steps."""
  np.testing.assert_allclose(posthoc_ema.sigma_rel_to_gamma(0.05), 16.97, atol=5e-3)
  np.testing.assert_allclose(posthoc_ema.sigma_rel_to_gamma(0.10), 6.94, atol=5e-3)
  steps = 4000
  tau = np.arange(1, steps + 1) / steps
  for sigma_rel in (0.02, 0.1, 0.25):
    weights = np.zeros(steps)  # the weight of each step's parameters in the EMA at step T
    gamma = posthoc_ema.sigma_rel_to_gamma(sigma_rel)
    for t in range(1, steps + 1):
      decay = (1 - 1 / t) ** (gamma + 1)
      weights *= decay
      weights[t - 1] += 1 - decay
    mean = np.sum(weights * tau)
    np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.sqrt(np.sum(weights * (tau - mean) ** 2)), sigma_rel, rtol=2e-3)
  for bad in (0.0, -0.1, 0.29):
    with pytest.raises(ValueError, match='sigma_rel'):
      posthoc_ema.sigma_rel_to_gamma(bad)


def test_float32_decay_is_accurate_at_a_million_steps():
  """The step computes beta and 1 - beta in float32: through log1p / expm1 both keep float32's relative precision,
  where (1 - 1/t)^(gamma + 1) loses a few per cent of 1 - beta at a million steps."""
  import jax.numpy as jnp
  gamma = posthoc_ema.sigma_rel_to_gamma(0.05)
  t = np.array([1, 2, 10, 1000, 999_983, 1_000_000], np.float64)
  with np.errstate(divide='ignore'):  # log1p(-1) = -inf at step 1: beta = 0
    want = -np.expm1((gamma + 1) * np.log1p(-1 / t))  # 1 - beta in float64
  beta, weight = posthoc_ema.decay(jnp.asarray(t, jnp.float32), gamma)
  np.testing.assert_allclose(np.asarray(weight), want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(beta), 1 - want, rtol=1e-6, atol=1e-7)
  naive = 1 - (1 - 1 / t.astype(np.float32)) ** np.float32(gamma + 1)
  assert np.max(np.abs(naive[-2:] / want[-2:] - 1)) > 1e-3  # what the direct form would have cost


def test_profile_products_equal_numerical_integrals():
  for t_a, g_a, t_b, g_b in ((100.0, 6.94, 250.0, 16.97), (300.0, 2.0, 300.0, 0.5), (50.0, 40.0, 20.0, 3.0)):
    p = lambda tau, t, g: (g + 1) * tau ** g / t ** (g + 1) if tau <= t else 0.0
    want, _ = integrate.quad(lambda tau: p(tau, t_a, g_a) * p(tau, t_b, g_b), 0, min(t_a, t_b), epsabs=1e-14)
    np.testing.assert_allclose(posthoc_ema.profile_products(t_a, g_a, t_b, g_b), want, rtol=1e-8)


def test_reconstruction_matches_a_directly_run_ema():
  """Profiles of widths 0.05 and 0.10 saved every 200 of 4000 steps reconstruct the EMA of any width at step 4000
  (and at an earlier snapshot) to 2 % of how much the two saved EMAs differ there (measured: 0.05 % at 0.07,
  0.15 % at 0.15 for step 4000; 0.2 % and 0.7 % for step 2000, from half the snapshots)."""
  rng = np.random.default_rng(0)
  steps = 4000
  trajectory = np.cumsum(rng.normal(size=steps)) * 0.1 + 5 * np.exp(-np.arange(1, steps + 1) / 800)
  gammas = [posthoc_ema.sigma_rel_to_gamma(s) for s in (0.05, 0.10)]
  runs = [_power_ema(trajectory, g) for g in gammas]
  times, snap_gammas, values = [], [], []
  for t in range(200, steps + 1, 200):
    for g, run in zip(gammas, runs):
      times.append(t)
      snap_gammas.append(g)
      values.append(run[t - 1])
  times, snap_gammas, values = map(np.array, (times, snap_gammas, values))
  for at in (steps, 2000):
    use = times <= at
    spread = abs(runs[0][at - 1] - runs[1][at - 1])
    for target in (0.05, 0.07, 0.1, 0.15):
      weights = posthoc_ema.coefficients(times[use], snap_gammas[use], at, posthoc_ema.sigma_rel_to_gamma(target))
      direct = _power_ema(trajectory[:at], posthoc_ema.sigma_rel_to_gamma(target))[-1]
      tol = 1e-9 if target in (0.05, 0.1) else 0.02 * spread
      assert abs(weights @ values[use] - direct) < tol, (at, target, weights @ values[use], direct, spread)
