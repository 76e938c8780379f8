"""The KL autoencoder: parity with diffusers' AutoencoderKL, the weight layout, the loss and the training step."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from models import vae_weights
from models.vae import (AutoencoderKL, VAEConfig, VAETrainerConfig, VAEWithDiscriminator, kl_to_standard_normal,
                        psnr)
from train import autoencoder
from train.state import TrainState

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
TINY = os.path.join(FIXTURES, 'vae_tiny')


@pytest.fixture(scope='module')
def reference():
  with np.load(os.path.join(FIXTURES, 'vae.npz')) as f:
    return {k: f[k] for k in f.files}


def _model(path=TINY):
  cfg, params, buffers = vae_weights.load(path)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0))))
  return cfg, nnx.merge(graphdef, params, buffers)


def test_matches_diffusers_autoencoderkl(reference):
  """diffusers' AutoencoderKL (tests/fixtures/make_vae_fixtures.py) and ours on the same weights and inputs."""
  cfg, vae = _model()
  assert cfg.factor == 4 and cfg.block_out_channels == (8, 16, 16) and cfg.layers_per_block == 2
  with jax.default_matmul_precision('highest'):
    mean, logvar = vae.encode(jnp.asarray(reference['x']))
    decoded = vae.decode(jnp.asarray(reference['z']))
    recon, _, _ = vae(jnp.asarray(reference['x']))
  assert mean.shape == (2, 4, 4, 4)
  np.testing.assert_allclose(mean, reference['mean'], atol=1e-4, rtol=0)
  np.testing.assert_allclose(logvar, reference['logvar'], atol=1e-4, rtol=0)
  np.testing.assert_allclose(decoded, reference['decoded'], atol=1e-4, rtol=0)
  np.testing.assert_allclose(recon, reference['reconstruction'], atol=1e-4, rtol=0)
  assert float(vae.scaling_factor[...]) == 0.5  # from config.json


def test_old_attention_names_and_conv_shaped_attention_load(tmp_path, reference):
  """Stable Diffusion v1's vae/ files name the attention query / key / value / proj_attn (LDM: 1x1 convs)."""
  tensors = load_file(os.path.join(TINY, vae_weights.WEIGHTS))
  renamed = {}
  for name, w in tensors.items():
    for new, old in (('to_q', 'query'), ('to_k', 'key'), ('to_v', 'value'), ('to_out.0', 'proj_attn')):
      if f'.{new}.' in name:
        name = name.replace(f'.{new}.', f'.{old}.')
        w = w[..., None, None] if w.ndim == 2 else w
    renamed[name] = w
  assert any('proj_attn' in k for k in renamed)
  os.makedirs(tmp_path / 'vae')
  shutil.copy(os.path.join(TINY, 'config.json'), tmp_path / 'vae')
  save_file(renamed, str(tmp_path / 'vae' / vae_weights.WEIGHTS))
  _, vae = _model(str(tmp_path))  # the model root: its vae/ subfolder is found
  with jax.default_matmul_precision('highest'):
    np.testing.assert_allclose(vae.decode(jnp.asarray(reference['z'])), reference['decoded'], atol=1e-4, rtol=0)


def test_save_writes_the_diffusers_layout_back(tmp_path):
  cfg, params, buffers = vae_weights.load(TINY)
  vae_weights.save(str(tmp_path), cfg, params, 0.5)
  ours, theirs = load_file(str(tmp_path / vae_weights.WEIGHTS)), load_file(os.path.join(TINY, vae_weights.WEIGHTS))
  assert sorted(ours) == sorted(theirs)
  for k in theirs:
    np.testing.assert_array_equal(ours[k], theirs[k])
  with open(tmp_path / 'config.json') as f:
    written = json.load(f)
  with open(os.path.join(TINY, 'config.json')) as f:
    original = json.load(f)
  for key in ('block_out_channels', 'layers_per_block', 'latent_channels', 'norm_num_groups', 'in_channels',
              'down_block_types', 'up_block_types', 'scaling_factor'):
    assert written[key] == original[key], key


def _broken_copy(tmp_path, edit):
  os.makedirs(tmp_path)
  shutil.copy(os.path.join(TINY, 'config.json'), tmp_path)
  tensors = load_file(os.path.join(TINY, vae_weights.WEIGHTS))
  edit(tensors)
  save_file(tensors, str(tmp_path / vae_weights.WEIGHTS))
  return str(tmp_path)


def test_clear_errors_for_missing_mismatched_or_absent_weights(tmp_path):
  with pytest.raises(vae_weights.VAEWeightsError, match='no VAE at'):
    vae_weights.load(str(tmp_path / 'nowhere'))
  path = _broken_copy(tmp_path / 'a', lambda t: t.pop('decoder.conv_out.weight'))
  with pytest.raises(vae_weights.VAEWeightsError, match=r'1 missing \(decoder.conv_out.weight\)'):
    vae_weights.load(path)
  path = _broken_copy(tmp_path / 'b', lambda t: t.update({'encoder.conv_in.weight': np.zeros((8, 1, 3, 3),
                                                                                             np.float32)}))
  with pytest.raises(vae_weights.VAEWeightsError, match=r'encoder.conv_in.weight \(8, 1, 3, 3\)'):
    vae_weights.load(path)
  path = _broken_copy(tmp_path / 'c', lambda t: t.update({'encoder.extra.weight': np.zeros(3, np.float32)}))
  with pytest.raises(vae_weights.VAEWeightsError, match='unexpected'):
    vae_weights.load(path)
  os.makedirs(tmp_path / 'd')
  shutil.copy(os.path.join(TINY, 'config.json'), tmp_path / 'd')
  (tmp_path / 'd' / vae_weights.WEIGHTS).write_bytes(b'not a safetensors file')
  with pytest.raises(vae_weights.VAEWeightsError, match='not a readable safetensors'):
    vae_weights.load(str(tmp_path / 'd'))


@pytest.mark.parametrize('levels,factor', [(3, 4), (4, 8)])
def test_downsampling_factor(levels, factor):
  cfg = VAEConfig(in_channels=1, block_out_channels=(8,) * levels, layers_per_block=1, norm_num_groups=4)
  vae = AutoencoderKL(cfg, rngs=nnx.Rngs(0))
  mean, logvar = vae.encode(jnp.zeros((2, 32, 32, 1)))
  assert cfg.factor == factor and mean.shape == logvar.shape == (2, 32 // factor, 32 // factor, 4)
  assert vae.decode(mean).shape == (2, 32, 32, 1)


def test_kl_against_the_closed_form_by_sampling():
  mean = jnp.array([[0.3, -1.2]]).reshape(1, 1, 1, 2)
  logvar = jnp.array([[-0.5, 0.7]]).reshape(1, 1, 1, 2)
  kl = float(kl_to_standard_normal(mean, logvar)[0])
  # Monte Carlo: E_q[log q(z) - log p(z)]
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(jax.random.key(0), (200_000, 1, 1, 2))
  log_q = -0.5 * (jnp.square(z - mean) / jnp.exp(logvar) + logvar)
  log_p = -0.5 * jnp.square(z)
  assert abs(float((log_q - log_p).sum((1, 2, 3)).mean()) - kl) < 0.01
  assert float(kl_to_standard_normal(jnp.zeros((1, 2, 2, 4)), jnp.zeros((1, 2, 2, 4)))[0]) == 0.0


def test_psnr():
  a = jnp.zeros((1, 4, 4, 1), jnp.uint8)
  b = jnp.full((1, 4, 4, 1), 10, jnp.uint8)
  np.testing.assert_allclose(psnr(a, b), 10 * np.log10(255.0 ** 2 / 100.0), rtol=1e-6)


def _tiny_state(disc_layers: int, lr: float = 3e-3):
  cfg = VAETrainerConfig(vae=VAEConfig(in_channels=1, block_out_channels=(8, 8), layers_per_block=1,
                                       norm_num_groups=4), disc_nf=8, disc_layers=disc_layers)
  graphdef, params, buffers = nnx.split(VAEWithDiscriminator(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
  tx = optax.adam(lr)
  return graphdef, TrainState.create(params, buffers, tx), tx


def _digits(n=8):
  from data import sources
  source = sources.get_source('mnist', 'test', image_size=16, num_channels=1, resize=True)
  return {'image': jnp.asarray(np.stack([source[i]['image'] for i in range(n)]))}


def test_autoencoder_step_learns_to_reconstruct():
  graphdef, state, tx = _tiny_state(0)
  step = jax.jit(autoencoder.make_autoencoder_step(graphdef, tx, lambda s: 3e-3,
                                                   autoencoder.AutoencoderSettings(ema_decay=0.0), jax.random.key(0)))
  batch = _digits()
  first = None
  for _ in range(60):
    state, m = step(state, batch)
    first = first if first is not None else m
  assert 'disc' not in state.params
  assert float(m['rec_loss']) < 0.5 * float(first['rec_loss'])
  assert float(m['psnr']) > float(first['psnr']) + 3
  assert int(state.step) == 60 and int(state.bad_step) == -1


def test_gan_switches_on_at_disc_start_with_the_adaptive_weight():
  graphdef, state, tx = _tiny_state(2)
  settings = autoencoder.AutoencoderSettings(disc_start=1, disc_weight=0.5, ema_decay=0.0)
  step = jax.jit(autoencoder.make_autoencoder_step(graphdef, tx, lambda s: 1e-3, settings, jax.random.key(0)))
  batch = _digits()
  disc_before = jax.tree.map(jnp.copy, state.params['disc'])
  state, m0 = step(state, batch)
  assert float(m0['d_loss']) == 0.0 and float(m0['d_weight']) == 0.0  # step 0 < disc_start
  for a, b in zip(jax.tree.leaves(disc_before), jax.tree.leaves(state.params['disc'])):
    np.testing.assert_array_equal(a, b)  # zero gradient, zero Adam update
  params_before = state.params
  state, m1 = step(state, batch)
  assert float(m1['d_loss']) > 0 and float(m1['d_weight']) > 0
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params_before['disc']),
                                                      jax.tree.leaves(state.params['disc'])))

  # The adaptive weight, independently: gradients of the two losses at the decoder's last kernel through the
  # whole model (same posterior sample as the step draws), by plain jax.grad over nnx state.
  key = jax.random.fold_in(jax.random.key(0), 1)
  _, k_z, _ = jax.random.split(key, 3)
  x = batch['image'].astype(jnp.float32) / 127.5 - 1.0

  def losses(kernel):
    params = jax.tree.map(lambda v: v, params_before)  # fresh variables in this trace
    params['vae']['decoder']['conv_out']['kernel'].value = kernel
    model = nnx.merge(graphdef, params, state.buffers)
    mean, logvar = model.vae.encode(x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_z, mean.shape)
    x_rec = model.vae.decode(z)
    return jnp.abs(x - x_rec).reshape(8, -1).sum(-1).mean(), -model.disc(x_rec).mean()

  kernel = params_before['vae']['decoder']['conv_out']['kernel'].value
  g_rec, g_adv = jax.jit(jax.jacrev(losses))(kernel)  # both losses' gradients, one program
  expected = 0.5 * float(jnp.linalg.norm(g_rec) / (jnp.linalg.norm(g_adv) + 1e-4))
  np.testing.assert_allclose(float(m1['d_weight']), expected, rtol=1e-3)


def test_latent_scale_makes_latents_unit_std():
  from data import sources
  graphdef, state, _ = _tiny_state(0)
  reconstruct = autoencoder.make_reconstruct_fn(graphdef, centered=True)
  source = sources.get_source('mnist', 'test', image_size=16, num_channels=1, resize=True)
  scale, _ = autoencoder.latent_scale(reconstruct, state.ema_params, state.buffers, source, 100, 32,
                                      jax.random.key(1))
  images = np.stack([source[i]['image'] for i in range(100)])
  _, z = reconstruct(state.ema_params, state.buffers, images, jax.random.key(2))
  assert abs(float(np.std(np.asarray(z)) * scale) - 1.0) < 0.05
  state = autoencoder.with_scale(state, scale, None)
  assert abs(float(state.buffers['vae']['scaling_factor'].value) - scale) < 1e-6
