"""DDPM ancestral and DDIM against the exact-score test bed, and the timestep grids."""

import jax
import jax.extend
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


PROCESS_OPTIONS = {'edm': {'sigma_min': 0.002, 'sigma_max': 80.0}, 'ddpm_zero_snr': {'zero_terminal_snr': True}}


def _distance(name, sampler, steps, n=4000, **options):
  process = processes.get_process(name.removesuffix('_zero_snr'), **PROCESS_OPTIONS.get(name, {}))
  settings, sample_fn = get_sampler(sampler, num_steps=steps, **options)
  fn = jax.jit(lambda rng: sample_fn(rng, MIXTURE.model_fn(process), process, (n, 2), settings)[0])
  x = np.asarray(fn(jax.random.key(1)))
  ref, _ = MIXTURE.sample(jax.random.key(2), n)
  return sliced_wasserstein(x, np.asarray(ref))


@pytest.mark.parametrize('name,sampler,coarse_steps,fine_steps,options', [
    ('vp', 'ddim', 5, 200, {}), ('ddpm', 'ddim', 5, 200, {}), ('ve', 'ddim', 5, 200, {}),
    ('ddpm', 'ddpm', 20, 1000, {}), ('vp', 'ddim', 20, 1000, {'eta': 1.0}),
    ('edm', 'ddim', 5, 200, {'spacing': 'karras'}), ('subvp', 'ddim', 5, 200, {'spacing': 'logsnr'}),
    ('vp', 'pc', 20, 1000, {'predictor': 'reverse_diffusion', 'corrector': 'langevin'}),
    ('ve', 'pc', 20, 1000, {'predictor': 'reverse_diffusion', 'corrector': 'langevin'}),
    ('subvp', 'pc', 20, 1000, {'predictor': 'euler_maruyama', 'corrector': 'none'}),
    ('ve', 'pc', 20, 1000, {'predictor': 'ancestral', 'corrector': 'ald'}),
    ('vp', 'ode', 4, 100, {'ode_method': 'heun', 'spacing': 'logsnr'}),
    ('ve', 'ode', 4, 500, {'ode_method': 'euler'}),
    ('vp', 'dpm_solver', 3, 25, {'order': 2, 'spacing': 'logsnr'}),
    ('ddpm', 'dpm_solver', 3, 25, {'order': 3, 'spacing': 'logsnr'}),
    ('edm', 'dpm_solver', 3, 25, {'order': 1, 'spacing': 'karras'}),
    ('vp', 'unipc', 3, 25, {'order': 2, 'spacing': 'logsnr'}),
    ('ddpm', 'unipc', 3, 25, {'order': 3, 'spacing': 'logsnr', 'unipc_variant': 'bh1'}),
    ('edm', 'unipc', 3, 25, {'order': 2, 'spacing': 'karras'}),
    ('edm', 'heun', 2, 40, {}), ('vp', 'heun', 2, 40, {}),
    ('edm', 'heun', 2, 80, {'s_churn': 20.0, 's_min': 0.05, 's_max': 50.0, 's_noise': 1.003}),
    # zero terminal SNR (alpha(T) about 3e-5 on the rescaled linear schedule): every sampler family from pure noise
    ('ddpm_zero_snr', 'ddim', 5, 200, {'spacing': 'trailing'}), ('ddpm_zero_snr', 'ddpm', 20, 1000, {}),
    ('ddpm_zero_snr', 'pc', 20, 1000, {'predictor': 'reverse_diffusion', 'corrector': 'langevin'}),
    ('ddpm_zero_snr', 'ode', 4, 100, {'ode_method': 'heun', 'spacing': 'logsnr'}),
    ('ddpm_zero_snr', 'dpm_solver', 3, 25, {'order': 2, 'spacing': 'logsnr'}),
    ('ddpm_zero_snr', 'unipc', 3, 25, {'order': 2, 'spacing': 'logsnr'}),
    ('ddpm_zero_snr', 'heun', 2, 80, {}),  # its Karras grid starts at sigma / alpha = 3e4: 40 steps reach 0.023
    # rectified flow (alpha(T) = 2^-12): every sampler family, and Stable Diffusion 3's timestep shift
    ('flow', 'ddim', 5, 200, {}), ('flow', 'ddim', 5, 200, {'time_shift': 3.0}), ('flow', 'ddpm', 20, 1000, {}),
    ('flow', 'pc', 20, 1000, {'predictor': 'reverse_diffusion', 'corrector': 'langevin'}),
    ('flow', 'ode', 4, 100, {'ode_method': 'heun'}), ('flow', 'dpm_solver', 3, 25, {'order': 2, 'spacing': 'logsnr'}),
    ('flow', 'unipc', 3, 25, {'order': 2, 'spacing': 'logsnr'}), ('flow', 'heun', 2, 80, {}),
])
def test_samplers_converge_to_the_mixture(name, sampler, coarse_steps, fine_steps, options):
  """With the exact score, samples approach the data distribution as the number of steps grows."""
  coarse, fine = _distance(name, sampler, coarse_steps, **options), _distance(name, sampler, fine_steps, **options)
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


def test_guidance_rescale_matches_diffusers_formula():
  """eps: diffusers' rescale_noise_cfg written out in numpy (std over every non-batch axis, unbiased as torch);
  x0 stays (x - sigma eps) / alpha; phi = 0 is plain CFG."""
  from samplers.guidance import classifier_free_guidance
  process = processes.get_process('vp')
  rng = np.random.default_rng(0)
  x, t = jnp.asarray(rng.normal(size=(4, 3, 3, 2)), jnp.float32), jnp.asarray([0.2, 0.4, 0.6, 0.9], jnp.float32)
  w = jnp.asarray(rng.normal(size=(11, 3, 3, 2)), jnp.float32)

  def model_fn(x, t, cond):
    eps = 0.7 * x + 2.0 * w[cond]
    a, s = process.alpha(t)[:, None, None, None], process.sigma(t)[:, None, None, None]
    return (x - s * eps) / a, eps

  y, scale = jnp.array([1, 2, 3, 4]), 4.0
  _, eps_c = model_fn(x, t, y)
  _, eps_u = model_fn(x, t, jnp.full((4,), 10))
  cfg = np.asarray(eps_u + scale * (eps_c - eps_u), np.float64)
  for phi in (0.0, 0.7, 1.0):
    std_c = np.asarray(eps_c, np.float64).reshape(4, -1).std(axis=1, ddof=1)[:, None, None, None]
    std_g = cfg.reshape(4, -1).std(axis=1, ddof=1)[:, None, None, None]
    expected = phi * cfg * std_c / std_g + (1 - phi) * cfg
    x0, eps = classifier_free_guidance(model_fn, scale, jnp.int32(10), rescale=phi, process=process)(x, t, y)
    np.testing.assert_allclose(eps, expected, rtol=1e-5, atol=1e-5)
    a, s = process.alpha(t)[:, None, None, None], process.sigma(t)[:, None, None, None]
    np.testing.assert_allclose(x0, (x - s * eps) / a, rtol=1e-4, atol=1e-4)
  assert np.abs(np.asarray(eps) - cfg).max() > 0.1  # phi = 1 really rescales
  with pytest.raises(ValueError, match='needs the process'):
    classifier_free_guidance(model_fn, scale, jnp.int32(10), rescale=0.5)


def _run(name, sampler, rng, n=2000, **options):
  process = processes.get_process(name, **({'sigma_min': 0.002, 'sigma_max': 80.0} if name == 'edm' else {}))
  settings, sample_fn = get_sampler(sampler, **options)
  x, nfe = jax.jit(lambda r: sample_fn(r, MIXTURE.model_fn(process), process, (n, 2), settings))(rng)
  return np.asarray(x), int(nfe)


def test_adaptive_ode_converges_and_reports_nfe():
  x, nfe = _run('vp', 'ode', jax.random.key(1), ode_method='dopri5', rtol=1e-5, atol=1e-5)
  assert 20 < nfe < 2000
  ref, _ = MIXTURE.sample(jax.random.key(2), 2000)
  assert sliced_wasserstein(x, np.asarray(ref)) < 2.0 * _distance_between_two_reference_draws(2000) + 0.01


def test_ddim_with_many_steps_equals_the_probability_flow_ode():
  """Same initial noise: DDIM (eta=0) and the adaptive PF-ODE land on the same points."""
  rng = jax.random.key(5)
  a, _ = _run('vp', 'ddim', rng, n=256, num_steps=2000, spacing='logsnr')
  b, _ = _run('vp', 'ode', rng, n=256, ode_method='dopri5', rtol=1e-6, atol=1e-6)
  assert float(np.max(np.abs(a - b))) < 0.02, float(np.max(np.abs(a - b)))


def test_ddim_is_euler_on_the_flow_process():
  """On the straight path x_t = (1 - t) x0 + t eps, DDIM's x_s = (1 - s) x0 + s eps equals the Euler step
  x + (s - t) u of the velocity u = eps - x0: the same samples from the same prior draw, on a shifted grid."""
  rng = jax.random.key(5)
  options = dict(n=256, num_steps=12, time_shift=3.0)
  a, nfe_a = _run('flow', 'ddim', rng, **options)
  b, nfe_b = _run('flow', 'ode', rng, ode_method='euler', **options)
  assert nfe_a == nfe_b == 12
  np.testing.assert_allclose(a, b, rtol=0, atol=5e-5)  # float32 rounding over 12 steps (measured 1.7e-5)
  c, _ = _run('flow', 'ddim', rng, n=256, num_steps=12)
  assert float(np.max(np.abs(a - c))) > 1e-2  # the shift changes the grid


def test_time_shift_of_the_sampling_grid():
  """The first time stays T (the prior draw); the others follow Process.shift_time, t_end included, and a
  shift that maps grid points onto T is refused."""
  p = processes.get_process('flow')
  settings, _ = get_sampler('ddim', num_steps=10, time_shift=3.0)
  ts = np.asarray(base.settings_grid(p, settings), np.float64)
  plain = np.linspace(p.T, p.sample_t_end, 10)
  np.testing.assert_allclose(ts, [p.T, *(3 * plain[1:] / (1 + 2 * plain[1:]))], rtol=1e-6)
  explicit, _ = get_sampler('ddim', timesteps=(0.9, 0.5, 0.1), time_shift=3.0)
  np.testing.assert_allclose(base.settings_grid(p, explicit), [0.9, 0.5, 0.1], rtol=1e-6)  # used as given
  with pytest.raises(ValueError, match='time_shift'):
    base.settings_grid(p, get_sampler('ddim', num_steps=1000, time_shift=1e4)[0])


def test_ddim_eta_one_matches_ddpm_ancestral_in_distribution():
  a, _ = _run('ddpm', 'ddim', jax.random.key(1), n=4000, num_steps=1000, eta=1.0)
  b, _ = _run('ddpm', 'ddpm', jax.random.key(2), n=4000, num_steps=1000)
  assert sliced_wasserstein(a, b) < 2.0 * _distance_between_two_reference_draws() + 0.01


def test_probability_flow_round_trip():
  """data -> noise -> data with the adaptive ODE reconstructs the data."""
  from samplers import ode
  process = processes.get_process('vp')
  x0, _ = MIXTURE.sample(jax.random.key(3), 256)
  settings = ode.ODESettings(rtol=1e-6, atol=1e-6)
  model_fn = MIXTURE.model_fn(process)
  forward = jnp.array([1e-3, 1.0]), jnp.array([1.0, 1e-3])
  z, _ = ode.solve_flow(model_fn, process, x0, forward[0], settings)
  back, _ = ode.solve_flow(model_fn, process, z, forward[1], settings)
  assert float(jnp.std(z)) > 0.7  # really at the noise end
  np.testing.assert_allclose(back, x0, atol=2e-3)


def test_nfe_of_heun_and_dpm_solver():
  assert _run('edm', 'heun', jax.random.key(0), n=4, num_steps=18)[1] == 35  # 2N - 1
  assert _run('vp', 'dpm_solver', jax.random.key(0), n=4, num_steps=10, order=3)[1] == 10
  assert _run('vp', 'unipc', jax.random.key(0), n=4, num_steps=10, order=3)[1] == 10
  assert _run('vp', 'pc', jax.random.key(0), n=4, num_steps=10, n_steps_each=2)[1] == 9 * 3 + 1


def _loops(jaxpr, depth=0):
  """(eqn, depth) of every loop (while / scan: both are XLA while loops) of a jaxpr, nested ones included; depth
  counts the loops around it."""
  for eqn in jaxpr.eqns:
    is_loop = eqn.primitive.name in ('while', 'scan')
    if is_loop:
      yield eqn, depth
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _loops(sub, depth + is_loop)


def _nested_whiles(jaxpr) -> int:
  """Number of loops inside the body of another loop."""
  return sum(depth > 0 for _, depth in _loops(jaxpr))


@pytest.mark.parametrize('sampler', ['ddim', 'ddpm', 'dpm_solver', 'unipc', 'heun', 'pc'])
def test_sampler_loops_hold_no_nested_while_loops(sampler):
  """A table lookup whose offset comes from a while loop nested in the sampler loop fails to compile on
  XLA:GPU (openxla/xla#49299): the discrete process must interpolate its tables without one."""
  process = processes.get_process('ddpm')
  settings, fn = get_sampler(sampler, num_steps=5)
  model_fn = lambda x, t, c=None: (x * process.alpha(t)[:, None], x * process.sigma(t)[:, None])
  jaxpr = jax.make_jaxpr(lambda r: fn(r, model_fn, process, (2, 3), settings))(jax.random.key(0))
  assert _nested_whiles(jaxpr.jaxpr) == 0


def _loop_unrolls(jaxpr) -> list[bool]:
  """For each loop of a jaxpr: whether it is fully unrolled (a scan with unroll = length)."""
  unrolled = lambda u, n: u is True or (not isinstance(u, bool) and u == n)
  return [unrolled(e.params.get('unroll'), e.params.get('length')) for e, _ in _loops(jaxpr)]


@pytest.mark.parametrize('sampler', ['ddim', 'dpm_solver', 'unipc', 'heun'])
def test_unrolled_loops_give_the_same_samples(sampler):
  """Inside base.unrolled_loops (step tuning's gradients) a sampler's step loop is fully unrolled, and draws the
  same samples as its rolled loop."""
  process = processes.get_process('vp')
  settings, fn = get_sampler(sampler, num_steps=5)
  model_fn = MIXTURE.model_fn(process)
  run = lambda r: fn(r, model_fn, process, (64, 2), settings)[0]
  looped = _loop_unrolls(jax.make_jaxpr(run)(jax.random.key(0)).jaxpr)
  with base.unrolled_loops():  # a new function: jax caches traces per function, whatever the context
    unrolled = _loop_unrolls(jax.make_jaxpr(lambda r: run(r))(jax.random.key(0)).jaxpr)
    x_unrolled = jax.jit(lambda r: run(r))(jax.random.key(3))
  assert looped == [False] and unrolled == [True]
  np.testing.assert_allclose(x_unrolled, jax.jit(run)(jax.random.key(3)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('sampler', ['ddim', 'dpm_solver'])
def test_zero_terminal_snr_removes_the_mean_bias(sampler):
  """Lin et al. (2024): with Stable Diffusion's schedule x_T keeps alpha_T = 0.068 of the image, so sampling from
  N(0, I) with even the exact model misses data far from 0 (for N(m, 1) data the probability-flow map gives mean
  m (1 - alpha_T)); rescaled to zero terminal SNR the prior is the true x_T and the mean comes out right."""
  data = GaussianMixture.create([1.0], [np.full(4, 2.0)], [np.eye(4)])
  means = {}
  for zero_snr in (False, True):
    p = processes.get_process('ddpm', schedule='scaled_linear', beta_min=0.85, beta_max=12.0,
                              zero_terminal_snr=zero_snr)
    settings, sample_fn = get_sampler(sampler, num_steps=25, spacing='trailing')
    x = jax.jit(lambda rng: sample_fn(rng, data.model_fn(p), p, (8192, 4), settings)[0])(jax.random.key(0))
    means[zero_snr] = float(jnp.mean(x))  # standard error 1 / sqrt(8192 * 4) = 0.0055
  assert 2.0 - means[False] > 0.1, means
  assert abs(2.0 - means[True]) < 0.02, means
