"""Sampler parity with diffusers' schedulers, from the fixture tests/fixtures/schedulers.npz.

The fixture comes from tests/fixtures/make_scheduler_fixtures.py (PyTorch + diffusers on CPU): the same
analytic networks, the same initial noise and, for DDPM, the same per-step noise.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import processes
from diffusion.parameterization import make_model_fn
from samplers import ancestral, base, ddim, dpm_solver, ode, unipc

FIXTURE = np.load(os.path.join(os.path.dirname(__file__), 'fixtures', 'schedulers.npz'))
TOL = dict(rtol=1e-5, atol=1e-5)


def eps_net(x, index, cond=None):
  return 0.9 * jnp.tanh(0.8 * x + 0.3 * jnp.sin(index / 100.0)[:, None, None, None]) + 0.05 * jnp.cos(x)


def v_net(x, index, cond=None):
  return 0.8 * jnp.tanh(0.7 * x - 0.2 * jnp.cos(index / 150.0)[:, None, None, None]) - 0.3 * x


def edm_net(x_in, c_noise, cond=None):
  return jnp.tanh(0.7 * x_in + 0.2 * c_noise[:, None, None, None]) + 0.1 * x_in


def flow_net(x, c_noise, cond=None):
  sigma = (c_noise / 999.0)[:, None, None, None]  # the flow process conditions on 999 t; the fixture's net on t
  return jnp.tanh(0.7 * x + 0.5 * sigma) - 0.6 * x + 0.2 * jnp.sin(3.0 * sigma)


@pytest.fixture(scope='module')
def ddpm_process():
  return processes.get_process('ddpm', schedule='linear', beta_min=0.1, beta_max=20.0, num_timesteps=1000)


def _index(ts):
  return np.round(np.asarray(ts) * 1000 - 1).astype(int)


def test_ddim_trajectory(ddpm_process):
  p = ddpm_process
  ts = base.time_grid(p, 50, 'leading')
  np.testing.assert_array_equal(_index(ts), FIXTURE['ddim_t'])
  model_fn = make_model_fn(eps_net, p, 'eps')
  settings = ddim.DDIMSettings(num_steps=50, eta=0.0, spacing='leading', clip_range=(-1.0, 1.0))
  step = jax.jit(ddim.make_step(model_fn, p, settings))
  x = jnp.asarray(FIXTURE['x_T'])
  for i in range(49):
    x = step(x, ts[i], ts[i + 1], jax.random.key(0))
    np.testing.assert_allclose(x, FIXTURE['ddim_traj'][i + 1], **TOL, err_msg=f'step {i}')
  x = base.denoise_step(model_fn, x, ts[-1], None, (-1.0, 1.0))
  np.testing.assert_allclose(x, FIXTURE['ddim_traj'][-1], **TOL)


def test_ddpm_trajectory(ddpm_process):
  p = ddpm_process
  ts = base.time_grid(p, 50, 'leading')
  np.testing.assert_array_equal(_index(ts), FIXTURE['ddpm_t'])
  model_fn = make_model_fn(eps_net, p, 'eps')

  @jax.jit
  def step(x, t, s, z):
    x0, _ = model_fn(x, base.broadcast_t(t, x))
    return ancestral.posterior_step(p, x, jnp.clip(x0, -1, 1), t, s, z)

  x = jnp.asarray(FIXTURE['x_T'])
  for i in range(49):
    x = step(x, ts[i], ts[i + 1], jnp.asarray(FIXTURE['ddpm_noise'][i]))
    np.testing.assert_allclose(x, FIXTURE['ddpm_traj'][i + 1], **TOL, err_msg=f'step {i}')
  x = base.denoise_step(model_fn, x, ts[-1], None, (-1.0, 1.0))
  np.testing.assert_allclose(x, FIXTURE['ddpm_traj'][-1], **TOL)


class _FixedPrior:
  """The process with a given prior draw, so a whole sampler starts from the reference's noise."""

  def __init__(self, process, x_T):
    self._process, self._x_T = process, x_T

  def __getattr__(self, name):
    return getattr(self._process, name)

  def prior_sample(self, rng, shape):
    return self._x_T


def _dpm_solver_2m_against(prefix, model_fn, p):
  """20 trailing steps of DPM-Solver++(2M) from the fixture's noise against diffusers' final sample."""
  ts = base.time_grid(p, 20, 'trailing')
  np.testing.assert_array_equal(_index(ts), FIXTURE[f'{prefix}_t'])
  settings = dpm_solver.DPMSolverSettings(num_steps=20, order=2, spacing='trailing')
  x, nfe = dpm_solver.sample(jax.random.key(0), model_fn, _FixedPrior(p, jnp.asarray(FIXTURE['x_T'])),
                             FIXTURE['x_T'].shape, settings)
  assert nfe == 20
  np.testing.assert_allclose(x, FIXTURE[f'{prefix}_traj'][-1], rtol=1e-5, atol=2e-5)


def test_dpm_solver_pp_2m(ddpm_process):
  _dpm_solver_2m_against('dpm', make_model_fn(eps_net, ddpm_process, 'eps'), ddpm_process)


@pytest.mark.parametrize('variant,order,steps', [('bh2', 2, 10), ('bh1', 3, 10), ('bh2', 3, 8)])
def test_unipc(ddpm_process, variant, order, steps):
  """UniPCMultistepScheduler (predictor + corrector, lower-order final steps) on the same grid."""
  p = ddpm_process
  key = f'unipc_{variant}_{order}_{steps}'
  ts = base.time_grid(p, steps, 'trailing')
  np.testing.assert_array_equal(_index(ts), FIXTURE[f'{key}_t'])
  settings = unipc.UniPCSettings(num_steps=steps, order=order, unipc_variant=variant, spacing='trailing')
  model_fn = make_model_fn(eps_net, p, 'eps')
  x, nfe = unipc.sample(jax.random.key(0), model_fn, _FixedPrior(p, jnp.asarray(FIXTURE['x_T'])),
                        FIXTURE['x_T'].shape, settings)
  assert nfe == steps
  expected = FIXTURE[f'{key}_traj'][-1]
  if variant == 'bh1':
    # diffusers' bh1 step into sigma = 0 computes B(h) * 0 = -inf * 0 = NaN; its result there is by construction
    # the x0 prediction at the last grid point, so take that from its trajectory.
    assert np.isnan(expected).all()
    last = jnp.asarray(FIXTURE[f'{key}_traj'][-2])
    expected = model_fn(last, base.broadcast_t(ts[-1], last), None)[0]
  np.testing.assert_allclose(x, expected, rtol=1e-5, atol=2e-5)


def test_edm_euler_trajectory():
  p = processes.get_process('edm', sigma_min=0.002, sigma_max=80.0)
  ts = base.time_grid(p, 18, 'karras', rho=7.0)
  np.testing.assert_allclose(ts, FIXTURE['edm_sigmas'][:-1], rtol=1e-5)
  model_fn = make_model_fn(edm_net, p, 'edm', sigma_data=0.5)
  step = jax.jit(ddim.make_step(model_fn, p, ddim.DDIMSettings(num_steps=18, spacing='karras')))  # Euler
  x = jnp.asarray(FIXTURE['edm_x_T'])
  for i in range(17):
    x = step(x, ts[i], ts[i + 1], jax.random.key(0))
    scale = float(np.abs(FIXTURE['edm_traj'][i + 1]).max())
    np.testing.assert_allclose(x, FIXTURE['edm_traj'][i + 1], rtol=1e-5, atol=1e-5 * scale, err_msg=f'step {i}')
  x = base.denoise_step(model_fn, x, ts[-1], None, None)  # the Euler step to sigma = 0
  np.testing.assert_allclose(x, FIXTURE['edm_traj'][-1], **TOL)


@pytest.mark.parametrize('schedule,kw', [('linear', {}), ('scaled_linear', {'beta_min': 0.85, 'beta_max': 12.0})])
def test_zero_terminal_snr_betas(schedule, kw):
  """diffusers' rescale_zero_terminal_snr (Lin et al. 2024), both in float64."""
  p = processes.get_process('ddpm', schedule=schedule, zero_terminal_snr=True, **kw)
  np.testing.assert_allclose(p.betas, FIXTURE[f'zero_snr_betas_{schedule}'], rtol=1e-12, atol=1e-15)


@pytest.fixture(scope='module')
def sd_zero_snr():
  """Stable Diffusion's scaled-linear schedule rescaled to zero terminal SNR, as SD 2.x v-models use it."""
  return processes.get_process('ddpm', schedule='scaled_linear', beta_min=0.85, beta_max=12.0, zero_terminal_snr=True)


def test_zero_terminal_snr_dpm_solver_v(sd_zero_snr):
  """DPM-Solver++(2M) with a v-network from pure noise; diffusers' solver also keeps alpha_bar_N = 2^-24."""
  _dpm_solver_2m_against('zero_snr_dpm', make_model_fn(v_net, sd_zero_snr, 'v'), sd_zero_snr)


def test_zero_terminal_snr_ddim_v(sd_zero_snr):
  """DDIM with a v-network from pure noise. diffusers' DDIM uses alpha_bar_N = 0 exactly; our alpha(T) = 2^-12
  moves the first step's x0 = alpha x - sigma v by alpha |x| <= 2.4e-4 |x| (measured: 6.4e-5 at every step;
  without the rescaling the trajectories differ by 1.6e-2)."""
  p = sd_zero_snr
  ts = base.time_grid(p, 25, 'trailing')
  np.testing.assert_array_equal(_index(ts), FIXTURE['zero_snr_ddim_t'])
  model_fn = make_model_fn(v_net, p, 'v')
  step = jax.jit(ddim.make_step(model_fn, p, ddim.DDIMSettings(num_steps=25, spacing='trailing')))
  x = jnp.asarray(FIXTURE['x_T'])
  for i in range(24):
    x = step(x, ts[i], ts[i + 1], jax.random.key(0))
    np.testing.assert_allclose(x, FIXTURE['zero_snr_ddim_traj'][i + 1], rtol=0, atol=3e-4, err_msg=f'step {i}')
  x = base.denoise_step(model_fn, x, ts[-1], None, None)
  np.testing.assert_allclose(x, FIXTURE['zero_snr_ddim_traj'][-1], rtol=0, atol=3e-4)


def test_rectified_flow_euler_with_timestep_shift():
  """FlowMatchEulerDiscreteScheduler(shift=3), Stable Diffusion 3's sampler: its sigmas are Process.shift_time of a
  linspace (diffusers shifts its sigma_min = shift(1/1000) a second time, so the linspace ends at shift(1/1000)),
  Euler on the velocity is DDIM on the flow process, and its last Euler step to sigma = 0 is our final denoising
  step. It starts at sigma = 1, our process at T = 1 - 2^-12: the linspace from T moves the grid by under 1e-4,
  and on diffusers' own grid the first step differs by 2^-12 |u|; the steps after it agree to float32 rounding."""
  p = processes.get_process('flow')
  shift = 3.0
  t_end = shift * 1e-3 / (1 + (shift - 1) * 1e-3)
  sigmas = FIXTURE['flow_sigmas']  # [29]: 1, ..., 0
  np.testing.assert_allclose(p.shift_time(jnp.linspace(1.0, t_end, 28)[1:], shift), sigmas[1:-1], rtol=1e-6)
  settings = ddim.DDIMSettings(num_steps=28, t_end=t_end, time_shift=shift)
  ts = base.settings_grid(p, settings)
  assert float(ts[0]) == p.T
  np.testing.assert_allclose(ts[1:], sigmas[1:-1], rtol=0, atol=1e-4)

  ts = base.explicit_grid(p, [p.T, *sigmas[1:-1]])  # diffusers' grid, from T
  model_fn = make_model_fn(flow_net, p, 'flow')
  step = jax.jit(ddim.make_step(model_fn, p, settings))
  traj = FIXTURE['flow_traj']  # [29, ...]: x_T, 27 Euler steps, the step to sigma = 0
  x = step(jnp.asarray(traj[0]), ts[0], ts[1], jax.random.key(0))
  np.testing.assert_allclose(x, traj[1], rtol=0, atol=2.0 ** -12 * 1.1)  # |u| <= 1.1 here
  x = jnp.asarray(traj[1])  # from diffusers' first step on, the same map
  for i in range(1, 27):
    x = step(x, ts[i], ts[i + 1], jax.random.key(0))
    np.testing.assert_allclose(x, traj[i + 1], rtol=1e-5, atol=1e-5, err_msg=f'step {i}')
  np.testing.assert_allclose(base.denoise_step(model_fn, x, ts[-1], None, None), traj[-1], **TOL)
  x, nfe = ode.solve_flow(model_fn, p, jnp.asarray(traj[1]), ts[1:], ode.ODESettings(ode_method='euler'))
  assert int(nfe) == 26
  np.testing.assert_allclose(base.denoise_step(model_fn, x, ts[-1], None, None), traj[-1], **TOL)
