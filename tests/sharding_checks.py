"""Multi-device checks, run by tests/test_sharding.py in a subprocess with 8 simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before jax is imported).

  python tests/sharding_checks.py <check> [workdir]
"""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.experimental.multihost_utils  # noqa: E402
import numpy as np  # noqa: E402

from configs.mnist import ddpmpp_vp  # noqa: E402
from train import checkpoint, generate, posthoc_ema, sharding, step as step_lib, trainer  # noqa: E402

B = 16


def tiny_config(grad_accum=1):
  """One model for every check (with a post-hoc EMA profile, so that it is sharded and restored too): the
  checks' step programs repeat across checks and come from the compilation cache."""
  c = ddpmpp_vp.get_config()
  c.training.ema_profiles = (0.1,)
  c.model.nf, c.model.ch_mult, c.model.num_res_blocks, c.model.num_groups = 16, (1, 2), 1, 4
  c.model.attn_resolutions = (16,)
  c.optim.warmup_steps = 2
  c.training.grad_accum = grad_accum
  c.parallel.fsdp_min_size = 1024  # shard the tiny model's bigger kernels too
  return c


def batches(n):
  rng = np.random.default_rng(0)
  return [{'image': rng.integers(0, 256, (1, B, 32, 32, 1), np.uint8), 'label': np.zeros((1, B), np.int32)}
          for _ in range(n)]


def put_batch(batch, mesh):
  """The global batch on the mesh; with several processes each contributes its own rows, as the trainer."""
  n, i = jax.process_count(), jax.process_index()
  rows = B // n
  local = {k: v[:, i * rows:(i + 1) * rows] for k, v in batch.items()}
  return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, 1), v) for k, v in local.items()}


_INIT = {}


def init_state(config):
  """trainer.init_state, once per config in this process (every check builds several steps of one model)."""
  key = config.to_json()
  if key not in _INIT:
    _INIT[key] = trainer.init_state(config)
  return _INIT[key]


def jitted_step(config, mesh, state=None, place_grads=True):
  """(the trainer's jitted step on mesh, the state on the mesh (fresh or given), the state's shardings);
  place_grads=False leaves the gradients' sharding to XLA (the step's param_sharding=None)."""
  graphdef, fresh, tx, schedule = init_state(config)
  state = fresh if state is None else state
  shard = sharding.state_shardings(state, mesh, config.parallel.fsdp_min_size)
  gammas = posthoc_ema.profile_gammas(config.training.ema_profiles)
  settings = step_lib.StepSettings(prediction='eps', loss=trainer.build_loss(config), ema_decay=0.99,
                                   grad_accum=config.training.grad_accum, ema_profile_gammas=gammas)
  one = step_lib.make_train_step(graphdef, trainer.build_process(config), tx, schedule, settings,
                                 jax.random.key(1), param_sharding=shard.params if place_grads else None)
  fn = jax.jit(step_lib.multi_step(one, 1), in_shardings=(shard, sharding.batch_sharding(mesh, 1)),
               out_shardings=(shard, sharding.replicated(mesh)))
  return fn, jax.device_put(state, shard), shard


def train(config, mesh, state=None, data=None, steps=3):
  """`steps` steps on mesh from a fresh (or given) state: (state, losses)."""
  fn, state, _ = jitted_step(config, mesh, state)
  losses = []
  for batch in (data or batches(steps)):
    state, metrics = fn(state, put_batch(batch, mesh))
    losses.append(float(metrics['loss'][0]))
  return state, losses


def assert_close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def check_data_parallel_and_fsdp():
  assert jax.device_count() == 8, jax.devices()
  config = tiny_config()
  one, l1 = train(config, sharding.make_mesh((1, 1), devices=jax.devices()[:1]))
  # 8-way data parallel with 2 micro-batches of 8 (one image per device each): the sum over devices and micro-batches
  dp, l8 = train(tiny_config(2), sharding.make_mesh((8, 1)))
  fsdp, lf = train(config, sharding.make_mesh((2, 4)))
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  np.testing.assert_allclose(lf, l1, rtol=1e-5)
  assert_close(dp.params, one.params, rtol=1e-4, atol=1e-5)  # Adam amplifies rounding of ~0 gradients
  assert_close(dp.ema_profiles, one.ema_profiles, rtol=1e-4, atol=1e-5)
  assert_close(fsdp.params, one.params)
  assert_close(fsdp.opt_state, one.opt_state)
  assert_close(fsdp.ema_profiles, one.ema_profiles)
  # the post-hoc EMA profile is sharded like the parameters, and its snapshot (gathered as the trainer does) is whole
  for p, e in zip(jax.tree.leaves(fsdp.params), jax.tree.leaves(fsdp.ema_profiles[0]), strict=True):
    assert p.sharding.spec == e.sharding.spec
  gathered = jax.experimental.multihost_utils.process_allgather(fsdp.ema_profiles, tiled=True)
  assert_close(gathered, one.ema_profiles)
  # the largest kernel is really split 4 ways along 'fsdp', and its Adam moments with it
  leaves = jax.tree.leaves(fsdp.params)
  big = max(leaves, key=lambda x: x.size)
  assert 'fsdp' in str(big.sharding.spec), big.sharding
  assert {s.data.shape for s in big.addressable_shards} != {big.shape}
  moments = [x for x in jax.tree.leaves(fsdp.opt_state) if x.shape == big.shape]
  assert moments and all(m.sharding.spec == big.sharding.spec for m in moments)
  # Placing the gradients like the parameters keeps the optimizer, the EMA and the gradient norm on the shards:
  # left to XLA, some replicated parameters' updates are computed split over 'fsdp' and all-gathered.
  mesh = sharding.make_mesh((2, 4))
  gathers = {}
  for place in (True, False):
    fn, state, shard = jitted_step(config, mesh, place_grads=place)
    text = fn.lower(state, put_batch(batches(1)[0], mesh)).compile().as_text()
    replicated = {x.shape for x, s in zip(jax.tree.leaves(state.params), jax.tree.leaves(shard.params))
                  if s.spec == jax.sharding.PartitionSpec()}
    shapes = [tuple(int(d) for d in dims.split(',') if d)
              for dims in re.findall(r'= f32\[([\d,]*)\]\S* all-gather(?:-start)?\(', text)]
    gathers[place] = sum(shape in replicated for shape in shapes)
  assert gathers[True] < gathers[False], gathers
  print("all-gathers of replicated parameters' shapes", gathers)
  print('data parallel (with gradient accumulation) and FSDP equal one device; largest kernel', big.shape,
        big.sharding.spec)
  check_pinned_carry_under_fsdp()


def check_pinned_carry_under_fsdp():
  """Several steps per call as shaped for XLA:GPU (train/step.multi_step pins the carried state to row-major
  layouts) on state sharded along 'fsdp': the layout constraints partition, and the result is one device's."""
  from models import layers
  gpu_shaping, layers.for_xla_gpu = layers.for_xla_gpu, lambda: True
  mesh = sharding.make_mesh((2, 4))
  state = {'kernel': np.arange(3 * 3 * 8 * 16, dtype=np.float32).reshape(3, 3, 8, 16),
           'moment': np.ones((3, 3, 8, 16), np.float32)}

  def one(s, batch, frozen=None):
    kernel = s['kernel'] - 0.1 * batch['x'] * s['moment']
    return {'kernel': kernel, 'moment': 0.9 * s['moment'] + kernel}, {'m': kernel.sum()}

  data = {'x': np.linspace(0.5, 2.0, 3 * 16, dtype=np.float32).reshape(3, 1, 1, 1, 16)}
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, None, 'fsdp'))
  shard = {k: split for k in state}
  fn = jax.jit(step_lib.multi_step(one, 3), in_shardings=(shard, sharding.replicated(mesh)),
               out_shardings=(shard, sharding.replicated(mesh)))
  placed = jax.device_put(state, shard)
  try:
    assert fn.lower(placed, data).as_text().count('@LayoutConstraint') == 2
    out, metrics = fn(placed, data)
    ref, ref_metrics = jax.jit(step_lib.multi_step(one, 3))(state, data)
  finally:
    layers.for_xla_gpu = gpu_shaping
  assert out['kernel'].sharding.spec == split.spec
  assert_close(out, ref)
  assert_close(metrics, ref_metrics)
  print('several steps per call with the carry pinned to row-major, FSDP-sharded, equal one device')


def check_checkpoint_across_meshes(workdir):
  config = tiny_config()
  data = batches(4)
  part, _ = train(config, sharding.make_mesh((2, 4)), data=data[:3])
  _, (uninterrupted,) = train(config, sharding.make_mesh((2, 4)), state=part, data=data[3:])  # step 4, straight on
  ckpt = checkpoint.Checkpointer(workdir)
  ckpt.save(3, part)
  ckpt.close()
  _, fresh, _, _ = init_state(config)
  for shape, devices in (((4, 1), jax.devices()[:4]), ((1, 1), jax.devices()[:1]), ((1, 2), jax.devices()[2:4])):
    mesh = sharding.make_mesh(shape, devices=devices)
    like = jax.device_put(fresh, sharding.state_shardings(fresh, mesh, config.parallel.fsdp_min_size))
    ckpt = checkpoint.Checkpointer(workdir)
    restored = ckpt.restore(like, 3)
    ckpt.close()
    assert int(restored.step) == 3
    assert_close(restored, part, rtol=0, atol=0)  # every field: parameters, EMA, optimizer state, step
    for r, l in zip(jax.tree.leaves(restored), jax.tree.leaves(like), strict=True):
      assert r.sharding == l.sharding, (r.sharding, l.sharding)  # placed on this mesh, as asked
    print('restored on', dict(mesh.shape))
  # The step is mesh-independent (check_data_parallel_and_fsdp): one mesh shows training goes on unchanged.
  _, next_loss = train(config, mesh, state=restored, data=data[3:])
  np.testing.assert_allclose(next_loss[0], uninterrupted, rtol=1e-5)
  print('next loss on', dict(mesh.shape), next_loss[0], 'uninterrupted', uninterrupted)


def check_sampling():
  config = tiny_config()
  config.sample.num_steps = 4
  graphdef, state, _, _ = init_state(config)
  process = trainer.build_process(config)
  settings, fn = trainer.build_sampler(config)
  outs = []
  for mesh in (None, sharding.make_mesh((8, 1)), sharding.make_mesh((2, 4))):
    gen = generate.make_generate_fn(graphdef, process, prediction='eps', sigma_data=0.5, sample_fn=fn,
                                    settings=settings, shape=(B, 32, 32, 1), centered=True, mesh=mesh)
    x, _ = gen(state.ema_params, state.buffers, jax.random.key(5), None)
    if mesh is not None:
      assert len(x.sharding.device_set) == 8, x.sharding
    outs.append(np.asarray(x))
  # uint8 images: identical up to a rare rounding flip of one level
  for o in outs[1:]:
    assert np.abs(o.astype(int) - outs[0].astype(int)).max() <= 1 and (o != outs[0]).mean() < 1e-3
  print('sampling on 8 devices equals 1 device')


def random_inception():
  """The FID Inception network with random weights (BN scales near 1) and 13 random uint8 images."""
  from flax import nnx
  from eval import inception
  graphdef, state = nnx.split(inception.InceptionV3(with_logits=True))
  rng = np.random.default_rng(0)
  leaves, treedef = jax.tree.flatten(state)
  leaves = [np.asarray(rng.normal(1.0 if x.ndim == 1 else 0.0, 0.1 if x.ndim == 1 else 0.05, x.shape),
                       np.float32) for x in leaves]
  images = rng.integers(0, 256, (13, 32, 32, 1), np.uint8)  # 13: the last batch of 8 is padded
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves)), images


def check_features():
  """Inception features with the batch split over 8 devices (8x1 and 2x4) equal one device's, in order."""
  from eval import fid
  model, images = random_inception()
  outs = []
  for mesh in (None, sharding.make_mesh((8, 1)), sharding.make_mesh((2, 4))):
    feats, logits = fid.FeatureExtractor(batch_size=8, model=model, mesh=mesh)(images)
    assert feats.shape == (13, 2048) and logits.shape == (13, 1008)
    outs.append((feats, logits))
  assert np.std(outs[0][0]) > 0
  for feats, logits in outs[1:]:
    np.testing.assert_allclose(feats, outs[0][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits, outs[0][1], rtol=1e-4, atol=1e-4)
  try:
    fid.FeatureExtractor(batch_size=6, model=model, mesh=sharding.make_mesh((8, 1)))
    raise AssertionError('a batch that does not divide over the mesh was accepted')
  except ValueError as e:
    assert 'does not divide' in str(e)
  print('Inception features on 8 devices equal 1 device')


def check_grad_accum():
  data = batches(3)
  mesh = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
  full, lf = train(tiny_config(1), mesh, data=data)
  acc, la = train(tiny_config(4), mesh, data=data)
  np.testing.assert_allclose(la, lf, rtol=1e-5)
  assert_close(acc.params, full.params, rtol=1e-4, atol=1e-5)  # Adam amplifies rounding of ~0 gradients
  print('gradient accumulation over 4 micro-batches equals the full batch (over 2 on 8 devices: parallel)')


def check_multihost(process_id: int, port: str, out: str):
  """One of two processes on localhost: 3 data-parallel steps over both, then Inception features with the
  batch split over both (each process holds all images, as in --mode=eval); saved by process 0."""
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=2, process_id=process_id)
  assert jax.process_count() == 2 and jax.device_count() == 2
  state, losses = train(tiny_config(), sharding.make_mesh((-1, 1)))
  params = jax.tree.map(lambda x: np.asarray(jax.experimental.multihost_utils.process_allgather(x, tiled=True)),
                        state.params)
  from eval import fid
  model, images = random_inception()
  feats, _ = fid.FeatureExtractor(batch_size=8, model=model, mesh=sharding.make_mesh((-1, 1)))(images)
  if jax.process_index() == 0:
    np.savez(out, losses=np.asarray(losses), features=feats, *jax.tree.leaves(params))
  jax.distributed.shutdown()


def check_single_reference(out: str):
  from eval import fid
  state, losses = train(tiny_config(), sharding.make_mesh((1, 1), devices=jax.devices()[:1]))
  model, images = random_inception()
  feats, _ = fid.FeatureExtractor(batch_size=8, model=model)(images)
  np.savez(out, losses=np.asarray(losses), features=feats, *[np.asarray(x) for x in jax.tree.leaves(state.params)])


if __name__ == '__main__':
  check = sys.argv[1]
  if check == 'multihost':
    check_multihost(int(sys.argv[2]), sys.argv[3], sys.argv[4])
  elif check == 'reference':
    check_single_reference(sys.argv[2])
  elif check == 'checkpoint':
    check_checkpoint_across_meshes(sys.argv[2])
  else:
    {'parallel': check_data_parallel_and_fsdp, 'sampling': check_sampling, 'grad_accum': check_grad_accum,
     'features': check_features}[check]()
