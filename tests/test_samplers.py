"""DDPM ancestral and DDIM against the exact-score test bed, and the timestep grids."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import processes
from diffusion.exact_score import GaussianMixture
from samplers import base, get_sampler


def test_discrete_spacings_match_diffusers_formulas():
  p = processes.get_process('ddpm')
  index = lambda ts: np.round(np.asarray(ts) * 1000 - 1).astype(int)
  # DDIMScheduler(timestep_spacing=...).set_timesteps(50): leading arange(0, 50) * 20, trailing
  # round(arange(1000, 0, -20)) - 1, linspace round(linspace(0, 999, 50)); all in decreasing order.
  np.testing.assert_array_equal(index(base.time_grid(p, 50, 'leading')), np.arange(0, 50)[::-1] * 20)
  np.testing.assert_array_equal(index(base.time_grid(p, 50, 'trailing')), np.arange(1000, 0, -20) - 1)
  np.testing.assert_array_equal(index(base.time_grid(p, 50, 'linspace')),
                                np.round(np.linspace(0, 999, 50))[::-1].astype(int))
  np.testing.assert_array_equal(index(base.time_grid(p, 1000, 'leading')), np.arange(1000)[::-1])


@pytest.mark.parametrize('name', ['vp', 've', 'edm'])
def test_continuous_grids(name):
  p = processes.get_process(name, **({'sigma_min': 0.002, 'sigma_max': 80.0} if name == 'edm' else {}))
  for spacing in ('linspace', 'logsnr', 'karras'):
    ts = np.asarray(base.time_grid(p, 20, spacing))
    assert ts.shape == (20,) and np.all(np.diff(ts) < 0)
    np.testing.assert_allclose([ts[0], ts[-1]], [p.T, p.sample_t_end], rtol=1e-4)
  lam = np.asarray(p.log_snr(base.time_grid(p, 20, 'logsnr')))
  np.testing.assert_allclose(np.diff(lam[1:]), np.diff(lam[1:]).mean(), rtol=1e-2)
  with pytest.raises(ValueError, match='discrete process'):
    base.time_grid(p, 20, 'leading')


def sliced_wasserstein(a, b, n_proj=64, seed=0):
  """Mean 1-D Wasserstein-1 distance over random directions; a and b are [N, D] with the same N."""
  d = a.shape[1]
  dirs = np.random.default_rng(seed).normal(size=(d, n_proj))
  dirs /= np.linalg.norm(dirs, axis=0)
  pa, pb = np.sort(a @ dirs, 0), np.sort(b @ dirs, 0)
  return float(np.mean(np.abs(pa - pb)))


MIXTURE = GaussianMixture.random(jax.random.key(7), 3, (2,), mean_scale=0.7, std_range=(0.05, 0.15))


def _distance(name, sampler, steps, n=4000, **options):
  process = processes.get_process(name, **({'sigma_min': 0.002, 'sigma_max': 80.0} if name == 'edm' else {}))
  settings, sample_fn = get_sampler(sampler, num_steps=steps, **options)
  fn = jax.jit(lambda rng: sample_fn(rng, MIXTURE.model_fn(process), process, (n, 2), settings)[0])
  x = np.asarray(fn(jax.random.key(1)))
  ref, _ = MIXTURE.sample(jax.random.key(2), n)
  return sliced_wasserstein(x, np.asarray(ref))


@pytest.mark.parametrize('name,sampler,options', [
    ('vp', 'ddim', {}), ('ddpm', 'ddim', {}), ('ve', 'ddim', {}),
    ('ddpm', 'ddpm', {}), ('vp', 'ddim', {'eta': 1.0}), ('edm', 'ddim', {'spacing': 'karras'}),
    ('subvp', 'ddim', {'spacing': 'logsnr'}),
])
def test_samplers_converge_to_the_mixture(name, sampler, options):
  """With the exact score, samples approach the data distribution as the number of steps grows."""
  if sampler == 'ddpm' or options.get('eta'):
    coarse, fine = _distance(name, sampler, 20, **options), _distance(name, sampler, 1000, **options)
  else:
    coarse, fine = _distance(name, sampler, 5, **options), _distance(name, sampler, 200, **options)
  floor = _distance_between_two_reference_draws()
  assert fine < coarse, (coarse, fine)
  assert fine < 2.0 * floor + 0.01, (fine, floor)


def _distance_between_two_reference_draws(n=4000):
  a, _ = MIXTURE.sample(jax.random.key(3), n)
  b, _ = MIXTURE.sample(jax.random.key(4), n)
  return sliced_wasserstein(np.asarray(a), np.asarray(b))


def test_nfe_and_determinism():
  p = processes.get_process('ddpm')
  settings, fn = get_sampler('ddim', num_steps=10, spacing='leading')
  model = MIXTURE.model_fn(p)
  x1, nfe = fn(jax.random.key(0), model, p, (8, 2), settings)
  x2, _ = fn(jax.random.key(0), model, p, (8, 2), settings)
  assert nfe == 10  # 9 transitions + the final denoising step, as diffusers' 10-step DDIM
  np.testing.assert_array_equal(x1, x2)
  settings, fn = get_sampler('ddim', num_steps=10, denoise=False)
  assert fn(jax.random.key(0), model, p, (8, 2), settings)[1] == 9


def test_unknown_sampler():
  with pytest.raises(ValueError, match='unknown sampler'):
    get_sampler('ddim2')


def test_classifier_free_guidance_wrapper():
  """scale 0 = unconditional, 1 = conditional, s = the linear extrapolation; one doubled-batch call."""
  from samplers.guidance import classifier_free_guidance
  calls = []

  def model_fn(x, t, cond):  # a toy conditional model: eps depends on the label, x0 follows from eps
    calls.append(x.shape[0])
    eps = x * 0.5 + cond[:, None].astype(jnp.float32)
    return x - eps, eps

  x, t, y = jnp.ones((3, 2)), jnp.full((3,), 0.5), jnp.array([1, 2, 3])
  null = jnp.int32(10)
  x0_u, eps_u = model_fn(x, t, jnp.full((3,), 10))
  x0_c, eps_c = model_fn(x, t, y)
  for scale in (0.0, 1.0, 2.5):
    calls.clear()
    x0, eps = classifier_free_guidance(model_fn, scale, null)(x, t, y)
    np.testing.assert_allclose(eps, eps_u + scale * (eps_c - eps_u), rtol=1e-6)
    np.testing.assert_allclose(x0, x0_u + scale * (x0_c - x0_u), rtol=1e-6)
    assert calls == ([3] if scale == 1.0 else [6])
