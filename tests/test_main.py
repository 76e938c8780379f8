"""main.py's handling of bad input: one clear line naming the problem, a non-zero exit, nothing compiled."""

import os

import pytest

from tests.helpers import ROOT, error_lines, main_py, tiny_config

CONFIGS = [
    'configs/mnist/ddpm_linear.py', 'configs/mnist/ddpm_cosine.py', 'configs/mnist/ddpm_v_zero_snr.py',
    'configs/mnist/ddpmpp_vp.py', 'configs/mnist/ddpmpp_flow.py',
    'configs/mnist/ddpmpp_subvp.py', 'configs/mnist/ncsnpp_ve.py', 'configs/mnist/edm.py',
    'configs/cifar10/ddpm.py', 'configs/cifar10/ddpmpp_vp_continuous.py',
    'configs/cifar10/ncsnpp_ve_continuous.py', 'configs/mnist/vae_f4.py', 'configs/cifar10/vae_f4.py',
    'configs/mnist/ldm_vp.py', 'configs/mnist/ldm_text_minilm.py', 'configs/composed/vae_f4.py',
    'configs/composed/ldm_text_minilm.py',
]


def _one_error(proc, *needles):
  assert proc.returncode != 0
  lines = error_lines(proc.stderr)
  assert len(lines) == 1, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  for n in needles:
    assert n in lines[0], lines[0]
  return lines[0]


def test_unknown_override_key(tmp_path):
  _one_error(main_py('--config.model.nff=64', workdir=str(tmp_path)), 'model.nff', "'nf'")
  assert not os.listdir(tmp_path), 'nothing is written before the config is valid'
  _one_error(main_py('--config.trainig.batch_size=4', workdir=str(tmp_path)), 'trainig', "'training'")
  # without --config the default config file is loaded (and its overrides applied) while flags are defined
  _one_error(main_py('--config.model.nff=64', workdir=str(tmp_path), tiny=False), 'model.nff', "'nf'")


def test_wrong_type_override(tmp_path):
  _one_error(main_py('--config.training.batch_size=abc', workdir=str(tmp_path)), 'training.batch_size')
  # the default config file loads (and checks the value's type) from any working directory
  _one_error(main_py('--config.training.batch_size=abc', workdir=str(tmp_path), tiny=False, cwd=str(tmp_path)),
             'training.batch_size')


def test_misspelled_key_in_a_variant(tmp_path):
  variant = os.path.join(ROOT, 'configs', 'mnist', f'_test_typo_{os.getpid()}.py')
  with open(variant, 'w') as f:
    f.write('from configs.mnist import ddpmpp_vp\n\n\ndef get_config():\n  c = ddpmpp_vp.get_config()\n'
            '  c.model.attn_resolution = (16,)\n  return c\n')
  try:
    _one_error(main_py(f'--config={variant}', workdir=str(tmp_path), tiny=False), 'attn_resolution',
               os.path.basename(variant))
  finally:
    os.remove(variant)


def test_unknown_dataset(tmp_path):
  _one_error(main_py('--config.data.dataset=mnits', workdir=str(tmp_path)), 'mnits')


def test_missing_tfds_data(tmp_path):
  line = _one_error(main_py('--config.data.dataset=cifar10', '--config.data.num_channels=3',
                            f'--config.data.data_dir={tmp_path}/tfds', workdir=str(tmp_path / 'w')), 'cifar10')
  assert 'tfds build' in line


def test_image_size_mismatch(tmp_path):
  _one_error(main_py('--config.data.image_size=64', workdir=str(tmp_path)), 'image_size')


OUT_OF_RANGE = [
    ('training.snapshot_every=0', 'training.snapshot_every=0'), ('training.grad_accum=0', 'training.grad_accum=0'),
    ('training.ema_decay=1.5', 'training.ema_decay=1.5'), ('optim.lr=-1', 'optim.lr=-1'),
    ('sample.num_steps=0', 'sample.num_steps=0'), ('model.nf=0', 'nf=0'),
    ('model.dropout=1.0', 'dropout=1.0'), ('sample.batch_size=0', 'sample.batch_size=0'),
    ('model.num_groups=0', 'num_groups=0'), ('model.attn_resolutions=(7,)', 'the U-Net does not have'),
    ('process.beta_max=0.01', 'beta_max=0.01'), ('process.zero_terminal_snr=True', "process.name='ddpm'"),
    ('training.ema_profiles=(0.05,0.5)', 'training.ema_profiles=0.5'),
    ('process.name=flow', 'model.prediction=eps'), ('sample.time_shift=0', 'sample.time_shift=0'),
    ('training.time_shift=-1', 'training.time_shift=-1'),
]


@pytest.mark.parametrize('override, needle', OUT_OF_RANGE)
def test_out_of_range_value(override, needle, tmp_path):
  """A value outside its range stops training with a ValueError naming it (main.py prints it as one line), before
  anything is written (was: a ZeroDivisionError, a diverging EMA, gradient ascent, a network without channels, a
  U-Net without the asked-for attention, a decreasing noise schedule, or a failure at the first sample grid).
  In process: a main.py subprocess per value cost ~5 s of start-up each; the next test runs main.py."""
  from train import trainer
  with pytest.raises(ValueError) as e:
    trainer.train(tiny_config(f'--config.{override}'), str(tmp_path))
  assert needle in str(e.value), str(e.value)
  assert not os.listdir(tmp_path)  # no checkpoint, log or sample


@pytest.mark.parametrize('override, needle', [OUT_OF_RANGE[3], OUT_OF_RANGE[9], OUT_OF_RANGE[12]])
def test_out_of_range_value_through_main(override, needle, tmp_path):
  """Through main.py (values checked at the optimizer, the model, the EMA profiles): one line, nothing but
  the run's config file written."""
  _one_error(main_py(f'--config.{override}', workdir=str(tmp_path)), needle)
  written = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files]
  assert written == [str(tmp_path / 'config_train.json')], written


def test_import_without_weights(tmp_path):
  _one_error(main_py('--mode=import', workdir=str(tmp_path)), 'model.init_from')
  _one_error(main_py('--mode=import', f'--config.model.init_from={tmp_path}/none', workdir=str(tmp_path)),
             'config.json')


def test_missing_workdir():
  _one_error(main_py(), '--workdir')


@pytest.mark.parametrize('path', CONFIGS)
def test_every_variant_builds(path, tmp_path):
  """Each variant loads, declares only known keys, and builds its process, model and sampler."""
  import jax
  from flax import nnx
  from ml_collections import config_flags  # noqa: F401  (configs load as main.py loads them)
  import importlib.util
  spec = importlib.util.spec_from_file_location('variant', os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  from train import trainer
  if config.latent.vae:  # latent diffusion: a randomly initialized f=4 VAE stands in for the trained one
    from models import vae, vae_weights
    cfg = vae.VAEConfig(in_channels=config.data.num_channels, block_out_channels=(8, 8, 8), layers_per_block=1,
                        norm_num_groups=4)
    model = vae.AutoencoderKL(cfg, rngs=nnx.Rngs(0))
    config.latent.vae = vae_weights.save(str(tmp_path / 'vae'), cfg, nnx.state(model, nnx.Param), 1.0)
  codec = trainer.build_codec(config)
  text = trainer.build_text(config)
  process = trainer.build_process(config)
  model = nnx.eval_shape(lambda: trainer.build_model(config, jax.random.key(0), codec, text))
  settings, _ = trainer.build_sampler(config)
  assert process.T > 0 and settings.num_steps > 0
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) > 0
  if codec is not None:
    assert model.cfg.image_size == config.data.image_size // 4 and model.cfg.in_channels == 4
    assert settings.clip_range is None
  if text is not None:  # cross-attention to the encoder's tokens (MiniLM: 384 wide)
    assert model.cfg.context_dim == 384 and model.cfg.pooled_dim == 384
    assert len(trainer.dataset_captions(config)) in (100, 15_000)
  if path.endswith('vae_f4.py'):
    assert model.vae.cfg.factor == 4
  if path.endswith('cifar10/ddpm.py'):
    assert config.optim.lr == 2e-4 and config.optim.warmup_steps == 5000 and config.optim.grad_clip == 1.0
    assert config.training.ema_decay == 0.9999 and config.training.batch_size == 128
    assert config.model.dropout == 0.1
