"""Text conditioning: caption tables (cached / frozen / trainable), the cross-attention U-Net, CFG with text,
and the training step on caption ids."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from diffusion import processes
from diffusion.parameterization import make_model_fn
from models import text as text_models
from models.unet import UNet, UNetConfig
from samplers.guidance import classifier_free_guidance
from train import step as step_lib
from train import text as text_lib
from train import trainer
from train.state import TrainState

TINY_CLIP = os.path.join(os.path.dirname(__file__), 'fixtures', 'clip_tiny')
CAPTIONS = ['a red 3 on the left', 'a blue 7 on the right', 'the digit seven']


def conditioner(mode='cached', encoder='clip', max_length=16, **kw):
  path = TINY_CLIP if encoder == 'clip' else None
  small = text_models.SmallTextConfig(vocab_size=0, width=32, layers=1, heads=2, max_length=max_length)
  return text_lib.TextConditioner(text_lib.TextSettings(encoder=encoder, path=path, max_length=max_length,
                                                        mode=mode, small=small if encoder == 'small' else None,
                                                        **kw))


def unet(text, seed=0):
  """A tiny text U-Net with random (not zero-initialized) output layers, so every input matters."""
  cfg = UNetConfig(image_size=8, in_channels=2, nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                   num_groups=4, dropout=0.0, **text.unet_options())
  model = UNet(cfg, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda v: v + 0.05 * rng.standard_normal(v.shape).astype(v.dtype)
                       if jnp.issubdtype(v.dtype, jnp.floating) else v, state)
  return nnx.merge(graphdef, state)


@pytest.fixture(scope='module')
def cached():
  return conditioner('cached')


def test_table_has_the_empty_caption_last_and_lookup_gathers_rows(cached):
  table = cached.table(CAPTIONS)
  assert table['tokens'].shape[:2] == (len(CAPTIONS) + 1, 16) and table['mask'].shape == (4, 16)
  tokens, mask, pooled = text_models.encode_texts(cached._encoder, cached.tokenizer, CAPTIONS + [''])
  np.testing.assert_allclose(table['tokens'].astype(np.float32), tokens, atol=2e-3)  # stored as float16
  np.testing.assert_array_equal(table['mask'][-1], mask[-1])
  cond = cached.lookup(jax.device_put(table), jnp.array([2, 0, 3]))
  np.testing.assert_allclose(cond['pooled'], pooled[[2, 0, 3]], atol=1e-5)
  assert cond['tokens'].dtype == jnp.float32 and cond['mask'].shape == (3, 16)


def test_cached_and_frozen_tables_give_the_same_condition(cached):
  frozen = conditioner('frozen')
  ids = jnp.array([0, 1, 2, 3])
  a = cached.lookup(cached.table(CAPTIONS), ids)
  b = jax.jit(frozen.lookup)(frozen.table(CAPTIONS), ids)
  assert set(a) == set(b)
  np.testing.assert_allclose(a['tokens'], b['tokens'], atol=2e-3)
  np.testing.assert_allclose(a['pooled'], b['pooled'], atol=1e-5)


def test_table_cache_on_disk(tmp_path):
  c = conditioner('cached', cache_dir=str(tmp_path))
  first = c.table(CAPTIONS)
  assert len(os.listdir(tmp_path)) == 1
  again = conditioner('cached', cache_dir=str(tmp_path)).table(CAPTIONS)
  for k in first:
    np.testing.assert_array_equal(first[k], again[k])
  c.table(CAPTIONS[:2])  # another caption set: another file
  assert len(os.listdir(tmp_path)) == 2


@pytest.mark.parametrize('mode,encoder', [('cached', 'clip'), ('trainable', 'small')])
def test_prompt_changes_unet_output_and_padding_does_not(mode, encoder):
  """Different captions give different outputs; the same caption padded to 16 or 32 tokens gives the same."""
  outs = {}
  model = unet(conditioner(mode, encoder, max_length=32))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 2))
  for length in (16, 32):
    text = conditioner(mode, encoder, max_length=length)
    cond = text.lookup(text.table(CAPTIONS), jnp.array([0, 1]))
    outs[length] = np.asarray(model(x, jnp.array([0.3, 0.3]), cond))
  assert np.abs(outs[16][0] - outs[16][1]).max() > 1e-3  # caption 0 vs caption 1, same x
  np.testing.assert_allclose(outs[16], outs[32], rtol=1e-4, atol=1e-5)


def test_text_unet_rejects_a_missing_condition(cached):
  model = unet(cached)
  with pytest.raises(ValueError, match='needs a text condition'):
    model(jnp.zeros((1, 8, 8, 2)), jnp.array([0.5]), None)


def test_cfg_identities_with_text(cached):
  """Scale 1 is the conditional model, scale 0 the empty caption's; ids index the table, null = last row."""
  model = unet(cached)
  table = jax.device_put(cached.table(CAPTIONS))
  process = processes.get_process('vp')
  fn = make_model_fn(lambda x, c, y: model(x, c, cached.lookup(table, y)), process, 'eps', 0.5)
  x, t = jax.random.normal(jax.random.key(2), (3, 8, 8, 2)), jnp.array([0.2, 0.5, 0.8])
  y, null = jnp.array([0, 1, 2]), jnp.int32(len(CAPTIONS))
  scales = (1.0, 0.0, 3.0)

  @jax.jit  # one program (op by op, the five evaluations compile ~400 kernels)
  def outputs(x, t, y):
    conditional, unconditional = fn(x, t, y)[1], fn(x, t, jnp.full((3,), len(CAPTIONS)))[1]
    return conditional, unconditional, [classifier_free_guidance(fn, s, null)(x, t, y)[1] for s in scales]

  eps_c, eps_u, guided = outputs(x, t, y)
  assert np.abs(np.asarray(eps_c - eps_u)).max() > 1e-3
  for eps, expected in zip(guided, (eps_c, eps_u, eps_u + 3.0 * (eps_c - eps_u)), strict=True):
    np.testing.assert_allclose(eps, expected, rtol=1e-4, atol=1e-5)


def _loop_inputs(jaxpr) -> list:
  """Shapes of every input of every loop (while, scan) in a jaxpr, nested ones included."""
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ('while', 'scan'):
      shapes += [tuple(v.aval.shape) for v in eqn.invars]
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      shapes += _loop_inputs(sub)
  return shapes


def test_frozen_encoder_runs_once_per_batch_outside_the_sampler_loop():
  """generate() encodes the captions (and the empty caption) before the sampler's loop: the loop carries no
  encoder weights, and its samples equal those of a model_fn that runs the encoder at every step."""
  from samplers import get_sampler
  from train import generate
  text = conditioner('frozen')
  table = text.table(CAPTIONS)
  graphdef, params, buffers = nnx.split(unet(text), nnx.Param, ...)
  process = processes.get_process('vp')
  settings, sample_fn = get_sampler('ddim', num_steps=4)
  kw = dict(prediction='eps', sigma_data=0.5, guidance_scale=3.0)
  gen = generate.make_generate_fn(graphdef, process, sample_fn=sample_fn, settings=settings, shape=(3, 8, 8, 2),
                                  centered=True, text=text, table=table, **kw)
  labels, rng = jnp.array([0, 2, 1]), jax.random.key(4)
  embedding = tuple(table['encoder']['embeddings']['token_embedding']['embedding'].shape)  # [vocab, D]
  loop_inputs = _loop_inputs(jax.make_jaxpr(gen)(params, buffers, rng, labels).jaxpr)
  assert loop_inputs and embedding not in loop_inputs

  model = nnx.merge(graphdef, params, buffers)  # the reference: the encoder inside every network evaluation
  device_table = jax.device_put(table)
  per_step = make_model_fn(lambda x, c, y: model(x, c, text.lookup(device_table, y)), process, 'eps', 0.5)
  guided = classifier_free_guidance(per_step, 3.0, jnp.int32(len(CAPTIONS)))
  x, _ = jax.jit(lambda r: sample_fn(r, guided, process, (3, 8, 8, 2), settings, labels))(rng)
  from data import scaler
  ours, reference = np.asarray(gen(params, buffers, rng, labels)[0]), np.asarray(scaler.to_uint8(x, centered=True))
  assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1  # float rounding may flip one level


@pytest.mark.parametrize('mode,encoder', [('cached', 'clip'), ('trainable', 'small')])
def test_train_step_on_caption_ids(mode, encoder):
  """Labels are caption ids; with label_dropout=1 every label becomes the empty caption (the loss then equals
  the step fed the null id directly); a trainable encoder receives gradients."""
  text = conditioner(mode, encoder)
  table = jax.device_put(text.table(CAPTIONS))
  graphdef, params, buffers = nnx.split(unet(text), nnx.Param, ...)
  tx = optax.adam(1e-3)
  state = TrainState.create(params, buffers, tx)
  process = processes.get_process('vp')
  images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 2), np.uint8)

  def loss_of(labels, dropout):
    settings = step_lib.StepSettings(num_classes=len(CAPTIONS), label_dropout=dropout, ema_decay=0.0)
    step = jax.jit(step_lib.make_train_step(graphdef, process, tx, lambda s: 0.0, settings, jax.random.key(0),
                                            None, text))
    new, metrics = step(state, {'image': images, 'label': jnp.asarray(labels, jnp.int32)}, {'vae': None, 'text': table})
    return float(metrics['loss']), new

  conditional, new = loss_of([0, 1, 2, 0], 0.0)
  dropped, _ = loss_of([0, 1, 2, 0], 1.0)
  null, _ = loss_of([3, 3, 3, 3], 0.0)
  assert dropped == pytest.approx(null, rel=1e-6)
  assert conditional != pytest.approx(null, rel=1e-4)
  if mode == 'trainable':
    before = jax.tree.leaves(state.params['text_encoder'])
    after = jax.tree.leaves(new.params['text_encoder'])
    assert all(np.abs(np.asarray(a) - np.asarray(b)).max() > 0 for a, b in zip(before, after))


def test_settings_errors():
  with pytest.raises(ValueError, match='unknown text.encoder'):
    conditioner('cached', 't5')
  with pytest.raises(ValueError, match="use 'cached' or 'frozen'"):
    conditioner('trainable', 'clip')


def test_text_model_through_main(tmp_path):
  """Train a tiny pixel-space text model on captioned MNIST with the frozen MiniLM (cached caption table), sample
  from a prompt, run the binding evaluation; a text setting without captions stops with an error naming it."""
  import json
  from tests.helpers import main_py, tiny_config
  workdir = str(tmp_path / 'text')
  args = ['--config.data.dataset=mnist_captions', '--config.data.split=test[:64]', '--config.text.encoder=minilm',
          '--config.text.max_length=12', '--config.model.num_heads=2', '--config.training.label_dropout=0.2',
          '--config.training.num_steps=2', '--config.training.log_every=1', '--config.training.checkpoint_every=2',
          '--config.training.snapshot_every=2', '--config.sample.guidance_scale=2.0',
          '--config.sample.guidance_rescale=0.5']
  proc = main_py(*args, workdir=workdir, check=True)
  assert '100 captions (minilm text encoder, cached)' in proc.stdout + proc.stderr
  assert len(os.listdir(os.path.join(workdir, 'text'))) == 1  # the caption table, cached on disk
  main_py(*args, '--mode=sample', '--config.sample.prompt=a handwritten seven', workdir=workdir, check=True)
  with open(os.path.join(workdir, 'samples', 'ddim_3steps_step00000002_a_handwritten_seven.json')) as f:
    info = json.load(f)
  assert info['prompt'] == 'a handwritten seven' and info['nfe'] == 3  # a guided step (doubled batch) counts once
  with np.load(info['npz']) as f:
    assert f['images'].shape == (4, 32, 32, 1) and (f['labels'] == 0).all()
  proc = main_py(*args, '--mode=eval', '--config.eval.metrics=()', '--config.eval.binding=True',
                 '--config.eval.binding_num_images=20', '--config.eval.guidance_scales=(1.0,3.0)',
                 '--config.eval.batch_size=10', workdir=workdir, check=True)
  import glob
  (path,) = glob.glob(os.path.join(workdir, 'eval', 'step00000002_binding_*.json'))
  with open(path) as f:
    rows = json.load(f)
  assert [r['guidance'] for r in rows] == [1.0, 3.0]
  assert all(0.0 <= r['digit_accuracy'] <= 1.0 and r['num_images'] == 20 for r in rows)
  assert os.path.exists(os.path.join(workdir, 'eval', 'step00000002_binding.png'))
  assert sum('binding (mnist_captions)' in l for l in proc.stdout.splitlines()) == 2

  # in process (main.py prints any ValueError as one line: tests/test_main.py)
  with pytest.raises(ValueError, match='needs captions'):
    trainer.train(tiny_config('--config.text.encoder=minilm'), str(tmp_path / 'nocaptions'))
