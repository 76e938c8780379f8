"""Explicit time grids for every sampler, and grids tuned against a teacher (samplers/step_schedule.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import processes
from diffusion.exact_score import GaussianMixture
from samplers import base, get_sampler, step_schedule

VP = processes.get_process('vp')
MIXTURE = GaussianMixture.random(jax.random.key(0), 3, (4,), mean_scale=0.8, std_range=(0.05, 0.2))
DETERMINISTIC = [
    ('ddim', {'spacing': 'logsnr'}),
    ('dpm_solver', {'order': 3, 'spacing': 'logsnr'}),
    ('unipc', {'order': 2, 'spacing': 'logsnr'}),
    ('ode', {'ode_method': 'heun', 'spacing': 'logsnr'}),
    ('heun', {}),
]


@pytest.mark.parametrize('name,options', DETERMINISTIC + [('ddpm', {'spacing': 'linspace'}),
                                                          ('pc', {'spacing': 'linspace'})])
def test_explicit_grid_reproduces_the_spacing(name, options):
  """timesteps equal to a spacing's grid give the same samples, and set num_steps to their number."""
  settings, fn = get_sampler(name, num_steps=6, **options)
  ts = tuple(float(t) for t in base.settings_grid(VP, settings, None if hasattr(settings, 'spacing') else 'karras'))
  explicit, _ = get_sampler(name, num_steps=50, timesteps=ts, **options)
  assert explicit.num_steps == 6 and explicit.timesteps == ts
  model = MIXTURE.model_fn(VP)
  a, nfe_a = fn(jax.random.key(1), model, VP, (64, 4), settings)
  b, nfe_b = fn(jax.random.key(1), model, VP, (64, 4), explicit)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  assert int(nfe_a) == int(nfe_b)


def test_empty_timesteps_mean_the_spacing():
  settings, _ = get_sampler('ddim', num_steps=7, timesteps=())
  assert settings.timesteps is None and settings.num_steps == 7


@pytest.mark.parametrize('timesteps,match', [((0.5, 0.7, 0.1), 'decrease'), ((1.5, 0.5, 0.1), 'decrease'),
                                             ((0.9, 0.5, 0.0), 'decrease'), (((0.9, 0.1),), '1-d')])
def test_bad_grids_are_refused(timesteps, match):
  settings, fn = get_sampler('ddim', timesteps=timesteps)
  with pytest.raises(ValueError, match=match):
    fn(jax.random.key(0), MIXTURE.model_fn(VP), VP, (4, 4), settings)


def test_parametrization_round_trip_and_validity():
  ts = base.time_grid(VP, 8, 'logsnr')
  params = step_schedule.params_from_grid(VP, ts, 1e-5)
  np.testing.assert_allclose(np.asarray(step_schedule.grid_from_params(VP, params, 1e-5)), np.asarray(ts),
                             rtol=1e-4)
  for seed in range(5):  # any parameters give a strictly decreasing grid from T down to above t_min
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {'logits': 3 * jax.random.normal(k1, (7,)), 'end': 3 * jax.random.normal(k2, ())}
    grid = np.asarray(step_schedule.grid_from_params(VP, params, 1e-5))
    assert grid[0] == VP.T and np.all(np.diff(grid) < 0) and grid[-1] >= 1e-5 * 0.999


@pytest.mark.parametrize('name,options', DETERMINISTIC)
def test_samplers_are_differentiable_in_their_grid(name, options):
  """Gradients with respect to the grid are finite (unselected lower-order branches must not leak NaNs)."""
  settings, fn = get_sampler(name, num_steps=6, **options)
  ts0 = base.settings_grid(VP, settings, None if hasattr(settings, 'spacing') else 'karras')
  params = step_schedule.params_from_grid(VP, ts0, 1e-5)
  model = MIXTURE.model_fn(VP)

  def f(p):
    s = dataclasses.replace(settings, timesteps=step_schedule.grid_from_params(VP, p, 1e-5))
    return jnp.mean(fn(jax.random.key(2), model, VP, (32, 4), s)[0] ** 2)

  grads = jax.grad(f)(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads['logits']).max()) > 0


def test_tuned_grid_generalizes_to_fresh_noise():
  """A 5-step DPM-Solver++ grid tuned on one noise batch is closer to the teacher on another batch."""
  settings, fn = get_sampler('dpm_solver', num_steps=5, order=2, spacing='logsnr')
  teacher, teacher_fn = get_sampler('dpm_solver', num_steps=100, order=3, spacing='logsnr')
  model = MIXTURE.model_fn(VP)
  result = step_schedule.tune_timesteps(jax.random.key(10), model, VP, (256, 4), fn, settings, teacher_fn, teacher,
                                        step_schedule.TuneSettings(num_iters=60, lr=0.05))
  assert len(result.timesteps) == 5 and result.timesteps[0] == VP.T
  assert result.loss < result.initial_loss and len(result.losses) == 60
  tuned = dataclasses.replace(settings, timesteps=result.timesteps)

  def error(s, seed):
    x, _ = fn(jax.random.key(seed), model, VP, (2048, 4), s)
    ref, _ = teacher_fn(jax.random.key(seed), model, VP, (2048, 4), teacher)
    return float(jnp.mean((x - ref) ** 2))

  before, after = error(settings, 99), error(tuned, 99)
  assert after < 0.5 * before, (before, after)


def test_main_tunes_steps_and_samples_with_the_grid(tmp_path):
  """--mode=tune_steps writes a grid closer to the teacher; --config.sample.timesteps samples with it."""
  import json
  import os
  from tests.helpers import main_py
  run = str(tmp_path / 'run')
  main_py('--config.training.num_steps=2', '--config.training.checkpoint_every=2', '--config.training.log_every=1',
          '--config.training.snapshot_every=2', workdir=run, check=True)
  proc = main_py('--mode=tune_steps', '--config.sample.sampler=dpm_solver', '--config.sample.num_steps=4',
                 '--config.tune.teacher=dpm_solver:20', '--config.tune.num_iters=5', '--config.tune.batch_size=8',
                 workdir=run, check=True)
  out = os.path.join(run, 'timesteps', 'dpm_solver_4steps_step00000002.json')
  with open(out) as f:
    info = json.load(f)
  ts = info['timesteps']
  assert len(ts) == 4 and np.all(np.diff(ts) < 0) and info['mse'] <= info['initial_mse']
  assert info['flag'] in proc.stdout
  flag = info['flag'].replace('"', '')
  ok = main_py('--mode=sample', '--config.sample.sampler=dpm_solver', flag, workdir=run, check=True)
  assert 'dpm_solver, 4 NFE' in ok.stdout, ok.stdout
