"""The training step and loop: the optimizer, learning, EMA, fused steps, preemption, divergence, corrupt
checkpoints."""

import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from configs.mnist import ddpmpp_vp
from data import load_mnist
from tests.helpers import error_lines, main_py, popen_main
from train import checkpoint, optimizer, posthoc_ema
from train import step as step_lib
from train import trainer


def tiny_config(**training):
  c = ddpmpp_vp.get_config()
  c.data.image_size = 16
  c.model.nf, c.model.ch_mult, c.model.num_res_blocks = 16, (1, 2), 1
  c.model.attn_resolutions, c.model.num_groups = (8,), 4
  c.optim.lr, c.optim.warmup_steps = 3e-3, 10
  for k, v in training.items():
    c.training[k] = v
  return c


def digits(n):
  """n real MNIST digits, centre-cropped to 16x16 to keep the tests fast: uint8 [n, 16, 16, 1]."""
  return load_mnist('test')[0][:n, 6:22, 6:22]


def build_step(config):
  graphdef, state, tx, schedule = trainer.init_state(config)
  process = trainer.build_process(config)
  gammas = posthoc_ema.profile_gammas(config.training.ema_profiles)
  settings = step_lib.StepSettings(prediction=config.model.prediction, loss=trainer.build_loss(config),
                                   ema_decay=config.training.ema_decay, ema_profile_gammas=gammas)
  one = step_lib.make_train_step(graphdef, process, tx, schedule, settings, jax.random.key(0))
  return graphdef, state, one, process


def test_grouped_global_norm_and_clipping_equal_optax():
  """The shape-grouped global norm against a float64 one (repeated shapes, a bf16 leaf, a scalar), and
  clipping against optax's below and above the threshold; the clip state is optax's (checkpoints unchanged)."""
  rng = np.random.default_rng(0)
  tree = {'a': [rng.normal(size=(3, 3, 4, 8)) for _ in range(3)], 'b': rng.normal(size=(8,)),
          'c': {'d': rng.normal(size=(8,)), 'e': np.float32(2.5)}, 'f': rng.normal(size=(5, 8))}
  tree = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
  mixed = {**tree, 'f': tree['f'].astype(jnp.bfloat16)}
  for t in (mixed, tree):
    norm = np.sqrt(sum((np.asarray(x, np.float64) ** 2).sum() for x in jax.tree.leaves(t)))
    assert optimizer.global_norm(t).dtype == jnp.float32
    np.testing.assert_allclose(float(optimizer.global_norm(t)), norm, rtol=1e-6)
  # from here on, norm is the float32 tree's (the loop's last)
  for max_norm in (norm / 3, 2 * norm):
    clip, ref_clip = optimizer.clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
    ours, state = clip.update(tree, clip.init(tree))
    ref, ref_state = ref_clip.update(tree, ref_clip.init(tree))
    assert jax.tree.structure(state) == jax.tree.structure(ref_state)
    for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
      np.testing.assert_allclose(x, y, rtol=1e-5)
    np.testing.assert_allclose(float(optimizer.global_norm(ours)), min(norm, max_norm), rtol=1e-5)
    assert clip.update(mixed, state)[0]['f'].dtype == jnp.bfloat16


def test_ema_weights_are_bias_corrected():
  """Run over 60 steps, the recursion's (decay, weight) pairs give each step's parameters the closed-form weight
  (1 - d) d^(t - tau) / (1 - d^t) (d = 1: the mean) and the initialization none; at a million steps the float32
  weight is the plain EMA's 1 - d."""
  steps = 60
  for d in (0.0, 0.9, 0.998, 0.9999, 1.0):
    weights = np.zeros(steps + 1)  # [initialization, step 1, ..., step T]
    weights[0] = 1.0
    for t in range(1, steps + 1):
      decay, weight = (float(v) for v in step_lib.ema_weights(jnp.float32(t), d))
      weights *= decay
      weights[t] += weight
    tau = np.arange(1, steps + 1)
    want = np.full(steps, 1 / steps) if d == 1.0 else (1 - d) * d ** (steps - tau) / (1 - d ** steps)
    assert weights[0] == 0.0, d
    np.testing.assert_allclose(weights[1:], want, rtol=2e-5, atol=1e-9, err_msg=str(d))
  decay, weight = step_lib.ema_weights(jnp.float32(1e6), 0.9999)
  np.testing.assert_allclose([float(decay), float(weight)], [0.9999, 1e-4], rtol=1e-6)


@pytest.mark.parametrize('process_name,prediction,weighting,factor',
                         [('vp', 'eps', 'eps', 10), ('flow', 'flow', 'flow', 5)])
def test_tiny_unet_overfits_one_batch(process_name, prediction, weighting, factor):
  """Loss on one fixed batch, averaged over fixed noise draws, falls `factor`-fold within 200 steps: DDPM's eps loss
  on VP (10x), and flow matching (velocity prediction, logit-normal times) on the rectified-flow process, whose
  velocity target at small t asks for eps from x_0 + t eps (5x; measured 6.1x: 1.86 -> 0.30)."""
  config = tiny_config(ema_decay=0.0, loss_weighting=weighting,
                       time_sampling='lognormal' if process_name == 'flow' else 'uniform', P_mean=0.0, P_std=1.0)
  config.process.name, config.model.prediction = process_name, prediction
  graphdef, state, one, process = build_step(config)
  batch = {'image': jnp.asarray(digits(8)), 'label': jnp.zeros(8, jnp.int32)}
  from flax import nnx
  from data import scaler
  from diffusion import losses
  from diffusion.parameterization import make_model_fn

  @jax.jit
  def eval_loss(params, buffers):
    model = nnx.merge(graphdef, params, buffers)
    model_fn = make_model_fn(lambda x, c, y: model(x, c, y), process, prediction)
    x0 = jnp.tile(scaler.to_model(batch['image']), (16, 1, 1, 1))
    return losses.denoising_loss(model_fn, process, x0, jax.random.key(42), trainer.build_loss(config))[0]

  before = float(eval_loss(state.params, state.buffers))
  step = jax.jit(one, donate_argnums=0)
  for _ in range(200):
    state, metrics = step(state, batch)
  after = float(eval_loss(state.params, state.buffers))
  assert after < before / factor, (before, after)


@pytest.mark.parametrize('gpu', [False, True])
def test_fused_steps_pin_the_carried_state_to_row_major_on_xla_gpu(gpu, monkeypatch):
  """Shaped for XLA:GPU, the scan's body constrains every carried array to the call's row-major layout (so that
  the convolution kernels are not carried transposed); the constraint leaves the values alone."""
  from models import layers
  monkeypatch.setattr(layers, 'for_xla_gpu', lambda: gpu)
  state = {'kernel': jnp.arange(96.0).reshape(2, 3, 4, 4), 'moment': jnp.ones((2, 3, 4, 4)), 'step': jnp.int32(0)}

  def one(s, batch, frozen=None):
    kernel = s['kernel'] - 0.1 * batch['x'] * s['moment']
    return {'kernel': kernel, 'moment': 0.9 * s['moment'] + kernel, 'step': s['step'] + 1}, {'m': kernel.sum()}

  batches = {'x': jnp.linspace(0.5, 2.0, 3 * 4).reshape(3, 4)[:, None, None, :]}
  fused = jax.jit(step_lib.multi_step(one, 3))
  constraints = fused.lower(state, batches).as_text().count('@LayoutConstraint')
  assert constraints == (3 if gpu else 0)
  fused_state, metrics = fused(state, batches)
  s = state
  for i in range(3):
    s, m = one(s, {'x': batches['x'][i]})
    np.testing.assert_allclose(metrics['m'][i], m['m'], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(fused_state), jax.tree.leaves(s)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_kernel_gradients_go_behind_a_barrier_on_xla_gpu_only(monkeypatch):
  """apply_gradients writes a convolution kernel's (4-D) gradient out row-major behind an optimization barrier on
  XLA:GPU only (step._in_param_layout); the updated state is the same either way."""
  from models import layers
  from train.state import TrainState
  params = {'kernel': jnp.linspace(-1.0, 1.0, 96).reshape(2, 3, 4, 4), 'bias': jnp.zeros((4,))}
  grads = {'kernel': jnp.cos(3.0 * params['kernel']), 'bias': jnp.ones((4,))}
  tx = optax.adam(1e-2)
  state = TrainState.create(params, {}, tx)
  results = {}
  for gpu in (False, True):
    monkeypatch.setattr(layers, 'for_xla_gpu', lambda gpu=gpu: gpu)
    apply = lambda state, grads: step_lib.apply_gradients(state, jnp.float32(1.0), grads, tx, 0.9)  # traced anew
    results[gpu] = str(jax.make_jaxpr(apply)(state, grads)).count('optimization_barrier'), jax.jit(apply)(state, grads)
  assert results[False][0] == 0 and results[True][0] == 1
  for a, b in zip(jax.tree.leaves(results[True][1]), jax.tree.leaves(results[False][1]), strict=True):
    np.testing.assert_array_equal(a, b)
  assert float(jnp.abs(results[True][1][0].params['kernel'] - params['kernel']).max()) > 1e-3  # it did update


def test_fused_steps_and_ema_equal_single_steps():
  """Also the EMAs: the constant-decay one is the bias-corrected average of the steps' parameters, weights
  (1 - d) d^(t - tau) / (1 - d^t), none on the initialization; the post-hoc EMA profile is the power-function
  recursion, decay (1 - 1/t)^(gamma + 1) at step t."""
  config = tiny_config(ema_decay=0.9, ema_profiles=(0.1,))
  _, state, one, _ = build_step(config)
  images = digits(24).reshape(3, 8, 16, 16, 1)
  batches = {'image': jnp.asarray(images), 'label': jnp.zeros((3, 8), jnp.int32)}
  fused, fused_metrics = jax.jit(step_lib.multi_step(one, 3))(state, batches)
  single = jax.jit(step_lib.multi_step(one, 1))
  s, losses_, trajectory = state, [], []
  profile, gamma = state.ema_profiles[0], 6.937203937601809  # sigma_rel 0.1 (Karras et al.)
  for i in range(3):
    s, m = single(s, jax.tree.map(lambda b: b[i:i + 1], batches))
    losses_.append(float(m['loss'][0]))
    trajectory.append(s.params)
    decay = (1 - 1 / (i + 1)) ** (gamma + 1)  # the profile's recursion, by hand
    profile = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, profile, s.params)
  assert int(fused.step) == int(s.step) == 3
  np.testing.assert_allclose(fused_metrics['loss'], losses_, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(fused.params), jax.tree.leaves(s.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  weights = [0.1 * 0.9 ** (3 - tau) / (1 - 0.9 ** 3) for tau in (1, 2, 3)]  # the EMA in closed form
  ema = jax.tree.map(lambda *p: sum(w * x for w, x in zip(weights, p)), *trajectory)
  for a, b, c in zip(jax.tree.leaves(s.ema_params), jax.tree.leaves(fused.ema_params), jax.tree.leaves(ema)):
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(b, c, rtol=1e-4, atol=1e-6)
  for a, b, c in zip(jax.tree.leaves(s.ema_profiles[0]), jax.tree.leaves(fused.ema_profiles[0]),
                     jax.tree.leaves(profile)):
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(b, c, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ the loop, through main.py
def _metrics(workdir):
  rows = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      r = json.loads(line)
      rows[r['step']] = r  # the last entry of a step wins (a resumed run rewrites it)
  return rows


def _ckpt_steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _restore_raw(workdir, step):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', str(step), 'default'))


def _wait_for(predicate, proc, timeout=300):
  t0 = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f'process ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}')
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError('timed out')
    time.sleep(0.05)


N = 24
RUN = [f'--config.training.num_steps={N}', '--config.training.log_every=1', '--config.training.checkpoint_every=4',
       f'--config.training.snapshot_every={N}', '--config.training.keep_checkpoints=50']


def test_killed_run_resumes_exactly(tmp_path):
  ref, run = str(tmp_path / 'ref'), str(tmp_path / 'run')
  main_py(*RUN, workdir=ref, check=True)
  proc = popen_main(*RUN, workdir=run)
  _wait_for(lambda: any(s >= 8 for s in _ckpt_steps(run)), proc)  # a checkpoint after the first
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(_metrics(run))
  assert killed_at < N, 'the run finished before it was killed; the test proves nothing'
  resumed_from = max(_ckpt_steps(run))
  main_py(*RUN, workdir=run, check=True)
  a, b = _metrics(ref), _metrics(run)
  assert sorted(b) == list(range(1, N + 1)), 'the step counter continues from the checkpoint'
  for s in range(resumed_from + 1, N + 1):
    np.testing.assert_allclose(b[s]['loss'], a[s]['loss'], rtol=1e-6, err_msg=f'step {s}')
    np.testing.assert_allclose(b[s]['grad_norm'], a[s]['grad_norm'], rtol=1e-5, err_msg=f'step {s}')
  ra, rb = _restore_raw(ref, N), _restore_raw(run, N)
  assert int(rb['step']) == N
  for x, y in zip(jax.tree.leaves(ra['ema_params']), jax.tree.leaves(rb['ema_params'])):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  assert os.path.exists(os.path.join(run, 'samples', f'step_{N:08d}.png'))


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  run = str(tmp_path / 'run')
  args = [*RUN[:2], '--config.training.num_steps=100000', '--config.training.checkpoint_every=1000']
  proc = popen_main(*args, workdir=run)
  _wait_for(lambda: os.path.exists(os.path.join(run, 'metrics.jsonl')) and len(_metrics(run)) >= 3, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  steps = _ckpt_steps(run)
  assert len(steps) == 1 and steps[0] == max(_metrics(run)) and 3 <= steps[0] < 1000
  assert 'SIGTERM' in err


def test_divergence_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  run = str(tmp_path / 'run')
  proc = main_py('--config.optim.lr=1e30', '--config.optim.warmup_steps=0', '--config.optim.grad_clip=0.0',
                 '--config.training.num_steps=50', '--config.training.checkpoint_every=1',
                 '--config.training.log_every=1', workdir=run)
  assert proc.returncode != 0
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and 'not finite at step' in lines[0], proc.stderr[-2000:]
  bad = int(lines[0].split('not finite at step ')[1].split(';')[0])
  steps = _ckpt_steps(run)
  assert steps and max(steps) <= bad, (steps, bad)
  raw = _restore_raw(run, max(steps))
  assert all(bool(np.all(np.isfinite(x))) for x in jax.tree.leaves(raw['params']))


def test_corrupt_checkpoint_is_reported_and_left_alone(tmp_path):
  run = str(tmp_path / 'run')
  main_py('--config.training.num_steps=2', '--config.training.checkpoint_every=2', '--config.training.log_every=1',
          '--config.training.snapshot_every=2', workdir=run, check=True)
  ok = main_py('--mode=sample', workdir=run, check=True)
  assert 'wrote 4 samples' in ok.stdout
  # an incompatible config (another width) is reported as such
  proc = main_py('--mode=sample', '--config.model.nf=16', workdir=run)
  lines = error_lines(proc.stderr)
  assert proc.returncode != 0 and len(lines) == 1 and 'cannot be restored' in lines[0], proc.stderr[-2000:]
  # so are damaged files, which stay as they are
  files = []
  for root, _, names in os.walk(os.path.join(run, 'checkpoints', '2')):
    files += [os.path.join(root, n) for n in names]
  for path in files:
    if os.path.getsize(path) > 0 and 'metadata' not in os.path.basename(path):
      with open(path, 'r+b') as f:
        f.write(b'\x00garbage' * 8)
  before = {p: os.path.getsize(p) for p in files}
  proc = main_py('--mode=sample', workdir=run)
  assert proc.returncode != 0
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and 'cannot be restored' in lines[0], proc.stderr[-2000:]
  assert {p: os.path.getsize(p) for p in files} == before, 'the checkpoint is left untouched'


def test_posthoc_ema_snapshots_and_reconstruction(tmp_path):
  """EMA profiles are saved every ema_profile_every steps and with every checkpoint; sampling with a tracked width
  gets that profile back from the snapshots, with another width a combination of them; bad requests stop."""
  workdir = str(tmp_path)
  config = tiny_config(num_steps=12, checkpoint_every=8, ema_profiles=(0.05, 0.1), ema_profile_every=3,
                       snapshot_every=12, log_every=3, progress_bar=False, batch_size=8)
  config.sample.num_steps, config.sample.num_samples, config.sample.batch_size = 2, 4, 4
  config.data.resize, config.data.num_threads = True, 1  # MNIST's 28x28 down to the tiny model's 16x16
  state = trainer.train(config, workdir)
  assert posthoc_ema.snapshot_steps(workdir) == [3, 6, 8, 9, 12]
  from safetensors import numpy as safetensors_np
  saved = safetensors_np.load_file(posthoc_ema.snapshot_path(workdir, 12))
  for rel, profile in zip(('0.0500', '0.1000'), state.ema_profiles):
    for name, value in posthoc_ema._flatten(profile).items():
      np.testing.assert_array_equal(saved[f'{rel}/{name}'], value)

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
  _, like, _, _ = trainer.init_state(config)
  restored = {}
  for rel in (0.1, 0.07):
    config.sample.ema_sigma_rel = rel
    restored[rel] = trainer.restore_state(config, workdir, ckpt, like, 8)
  for a, b in zip(jax.tree.leaves(restored[0.1].ema_params), jax.tree.leaves(_restore_raw(workdir, 8)['ema_profiles'][1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  p05, p10 = (jax.tree.leaves(_restore_raw(workdir, 8)['ema_profiles'][i]) for i in range(2))
  mid = jax.tree.leaves(restored[0.07].ema_params)
  gap = lambda x, y: max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(x, y))
  assert 0 < gap(mid, p05) < gap(p05, p10) and 0 < gap(mid, p10) < gap(p05, p10)

  config.sample.ema_sigma_rel = 0.4
  with pytest.raises(ValueError, match=r'sample.ema_sigma_rel=0.4'):
    trainer.restore_state(config, workdir, ckpt, like, 8)
  config.sample.ema_sigma_rel = 0.1
  os.remove(posthoc_ema.snapshot_path(workdir, 12))
  with pytest.raises(ValueError, match='needs the EMA snapshot of step 12'):
    trainer.restore_state(config, workdir, ckpt, like, 12)
  ckpt.close()


def test_checkpoint_written_before_ema_profiles_existed(tmp_path):
  """A checkpoint without the ema_profiles field (written before post-hoc EMA) restores into a config without
  profiles; one with profiles stops with a line naming training.ema_profiles."""
  import dataclasses
  config = tiny_config()
  _, state, _, _ = trainer.init_state(config)
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  older = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != 'ema_profiles'}
  ckpt._manager.save(5, args=ocp.args.StandardSave(older), force=True)
  ckpt.wait()
  restored = ckpt.restore(state)
  assert int(restored.step) == 0 and restored.ema_profiles == ()
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params), strict=True):
    np.testing.assert_array_equal(a, b)
  config.training.ema_profiles = (0.1,)
  _, with_profiles, _, _ = trainer.init_state(config)
  with pytest.raises(checkpoint.CheckpointError, match=r'holds 0 post-hoc EMA profiles, the config 1 \(training.ema_profiles'):
    ckpt.restore(with_profiles)
  ckpt.close()


def test_eps_networks_refused_on_processes_that_end_in_pure_noise():
  """x0 = (x - sigma eps) / alpha at alpha(T) ~ 2^-12: zero-terminal-SNR DDPM and rectified flow refuse eps and score
  networks; the cosine DDPM schedule (alpha(T) = 5e-5) keeps its usual eps-network."""
  for process, extra in (('ddpm', {'zero_terminal_snr': True}), ('flow', {})):
    for prediction in ('eps', 'score'):
      c = ddpmpp_vp.get_config()
      c.process.name, c.model.prediction = process, prediction
      for k, v in extra.items():
        c.process[k] = v
      with pytest.raises(ValueError, match='pure noise'):
        trainer.build_process(c)
    c.model.prediction = 'v'
    assert float(trainer.build_process(c).alpha(1.0 if process == 'ddpm' else 1 - 2.0 ** -12)) < 1e-3
  c = ddpmpp_vp.get_config()
  c.process.name, c.process.schedule = 'ddpm', 'cosine'
  assert float(trainer.build_process(c).alpha(1.0)) < 1e-3
