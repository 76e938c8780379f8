"""Latent diffusion: the frozen-VAE codec, the latent training step (on the fly and cached), and main.py end to end."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image

from data import scaler
from diffusion import processes
from models.unet import UNet, UNetConfig
from models.vae import sample_posterior
from train import latent, step as step_lib
from train.state import TrainState
from tests.helpers import error_lines, main_py

TINY_VAE = os.path.join(os.path.dirname(__file__), 'fixtures', 'vae_tiny')


@pytest.fixture(scope='module')
def codec():
  return latent.LatentCodec.load(TINY_VAE)


def _images(n=4, size=16, channels=3, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), np.uint8))


def test_codec_scales_latents_and_decodes_them(codec):
  assert codec.factor == 4 and codec.channels == 4 and codec.scale == 0.5
  assert codec.latent_shape(16) == (4, 4, 4)
  with pytest.raises(ValueError, match='not divisible'):
    codec.latent_shape(18)
  x = scaler.to_model(_images())
  moments = codec.moments(codec.frozen, x)
  assert moments.shape == (4, 4, 4, 8)
  key = jax.random.key(3)
  z_d = codec.sample(codec.frozen, moments, key)
  vae = nnx.merge(codec.graphdef, *codec.frozen)
  mean, logvar = vae.encode(x)
  np.testing.assert_allclose(z_d, 0.5 * sample_posterior(key, mean, logvar), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(codec.decode(codec.frozen, z_d), vae.decode(z_d / 0.5), rtol=1e-5, atol=1e-5)
  other = latent.LatentCodec.load(TINY_VAE, scale_factor=2.0)
  assert other.scale == 2.0 and codec.scale == 0.5  # the override copies, never edits the loaded buffers
  np.testing.assert_allclose(other.sample(other.frozen, moments, key), 4 * z_d, rtol=1e-5, atol=1e-6)
  assert other.fingerprint() != codec.fingerprint()


def test_cached_and_on_the_fly_latent_steps_agree(codec, tmp_path):
  """The step on images (encoding inside) and on cached float16 moments draws the same latents and loss."""
  images = _images(8)
  from data import sources
  source = sources.ArraySource(np.asarray(images), np.zeros(8, np.int32), num_classes=0)
  cached = latent.cache_moments(codec, source, centered=True, batch_size=4, cache_dir=str(tmp_path), name='t')
  assert len(cached) == 8 and cached[0]['image'].dtype == np.float16 and cached[0]['image'].shape == (4, 4, 8)
  again = latent.cache_moments(codec, source, centered=True, batch_size=4, cache_dir=str(tmp_path), name='t')
  np.testing.assert_array_equal(again[3]['image'], cached[3]['image'])  # read back from disk
  assert len(os.listdir(tmp_path)) == 1

  cfg = UNetConfig(image_size=4, in_channels=4, nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                   num_groups=2, dropout=0.0)
  graphdef, params, buffers = nnx.split(UNet(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
  tx = optax.sgd(0.0)
  state = TrainState.create(params, buffers, tx)
  process = processes.get_process('vp')
  results = []
  for cached_latents, batch in ((False, {'image': images}),
                                (True, {'image': jnp.asarray(np.stack([cached[i]['image'] for i in range(8)]))})):
    settings = step_lib.StepSettings(cached_latents=cached_latents, ema_decay=0.0)
    step = jax.jit(step_lib.make_train_step(graphdef, process, tx, lambda s: 0.0, settings, jax.random.key(0),
                                            codec))
    _, metrics = step(state, batch, {'vae': codec.frozen, 'text': None})
    results.append(float(metrics['loss']))
  np.testing.assert_allclose(results[0], results[1], rtol=1e-2)


def _png(path):
  return np.asarray(Image.open(path))


def test_vae_then_latent_diffusion_through_main(tmp_path):
  """Train a VAE, evaluate it, train latent diffusion on its (cached) latents, sample decoded images."""
  vae_dir, ldm_dir = str(tmp_path / 'vae'), str(tmp_path / 'ldm')
  vae_args = ['--config=configs/mnist/vae_f4.py', '--config.model.nf=8', '--config.model.num_groups=4',
              '--config.training.num_steps=4', '--config.training.batch_size=8', '--config.training.log_every=2',
              '--config.training.checkpoint_every=4', '--config.training.snapshot_every=4',
              '--config.training.progress_bar=False', '--config.autoencoder.scale_images=64',
              '--config.sample.num_samples=16', '--config.eval.batch_size=50', '--config.data.num_threads=1']
  main_py(*vae_args, workdir=vae_dir, check=True, tiny=False)
  with open(os.path.join(vae_dir, 'vae', 'config.json')) as f:
    exported = json.load(f)
  assert exported['block_out_channels'] == [8, 16, 16] and exported['latent_channels'] == 4
  scale = exported['scaling_factor']
  assert scale > 0 and scale != 1.0
  grid = _png(os.path.join(vae_dir, 'samples', 'step_00000004.png'))  # rows: 8 originals, 8 reconstructions, ...
  assert grid.shape == (4 * 34 + 2, 8 * 34 + 2)
  from data import sources
  first = sources.get_source('mnist', 'test', image_size=32, num_channels=1)[0]['image'][..., 0]
  np.testing.assert_array_equal(grid[2:34, 2:34], first)

  proc = main_py(*vae_args, '--mode=eval', '--config.eval.num_samples=100', workdir=vae_dir, check=True, tiny=False)
  line = [l for l in proc.stdout.splitlines() if 'reconstructions of 100 images' in l]
  assert line, proc.stdout
  import glob
  (path,) = glob.glob(os.path.join(vae_dir, 'eval', 'step00000004_reconstruction_*.json'))
  with open(path) as f:
    row = json.load(f)
  assert row['scale_factor'] == pytest.approx(scale, rel=1e-6)
  assert 0.7 < row['latent_std'] < 1.3  # the stored scale normalizes test-set latents too
  # independently: the exported (diffusers-layout) weights reconstruct the same 100 test images to the same PSNR
  from models import vae_weights
  from models.vae import AutoencoderKL, psnr
  cfg, params, buffers = vae_weights.load(vae_dir)
  model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))), params, buffers)
  test = sources.get_source('mnist', 'test', image_size=32, num_channels=1)
  images = np.stack([test[i]['image'] for i in range(100)])
  recons = scaler.to_uint8(model.decode(model.encode(scaler.to_model(images))[0]))
  assert row['psnr'] == pytest.approx(float(psnr(recons, images).mean()), abs=1e-3)

  ldm_args = ['--config=configs/mnist/ldm_vp.py', f'--config.latent.vae={vae_dir}', '--config.model.nf=8',
              '--config.model.ch_mult=(1,2)', '--config.model.num_res_blocks=1', '--config.model.num_groups=2',
              '--config.model.attn_resolutions=(4,)', '--config.training.num_steps=3',
              '--config.training.batch_size=8', '--config.training.log_every=1', '--config.training.checkpoint_every=3',
              '--config.training.snapshot_every=3', '--config.training.progress_bar=False',
              '--config.sample.num_steps=3', '--config.sample.num_samples=4', '--config.sample.batch_size=4',
              '--config.eval.batch_size=128', '--config.data.num_threads=1', '--config.data.split=test[:256]']
  proc = main_py(*ldm_args, workdir=ldm_dir, check=True, tiny=False)
  assert 'scale' in proc.stderr + proc.stdout
  caches = os.listdir(os.path.join(ldm_dir, 'latents'))
  assert len(caches) == 1 and caches[0].startswith('mnist_test_256_32px_n256_')
  with open(os.path.join(ldm_dir, 'metrics.jsonl')) as f:
    assert all(np.isfinite(json.loads(l)['loss']) for l in f)
  proc = main_py(*ldm_args, '--mode=sample', workdir=ldm_dir, check=True, tiny=False)
  with np.load(os.path.join(ldm_dir, 'samples', 'ddim_3steps_step00000003.npz')) as f:
    images = f['images']
  assert images.shape == (4, 32, 32, 1) and images.dtype == np.uint8  # decoded pixels, not 8x8x4 latents

  # latent-space settings that cannot work fail with one line
  proc = main_py(*ldm_args, '--mode=eval', '--config.eval.bpd=True', workdir=ldm_dir, tiny=False)
  assert any('eval.bpd' in l for l in error_lines(proc.stderr)), proc.stderr[-2000:]
  proc = main_py(*vae_args, '--mode=sample', workdir=vae_dir, tiny=False)
  assert any('--mode=eval' in l for l in error_lines(proc.stderr)), proc.stderr[-2000:]


def test_missing_vae_is_one_clear_error(tmp_path):
  proc = main_py('--config=configs/mnist/ldm_vp.py', f'--config.latent.vae={tmp_path}/none',
                 workdir=str(tmp_path / 'w'), tiny=False)
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and 'no VAE at' in lines[0] and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
