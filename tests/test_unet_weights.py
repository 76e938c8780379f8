"""--mode=import: released U-Nets in diffusers' layout (DDPM, NCSN++) become a step-0 checkpoint whose network
gives diffusers' outputs (tests/fixtures/ncsnpp.npz, from tests/fixtures/make_ncsnpp_fixtures.py)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from configs import default
from tests.fixtures.make_ncsnpp_fixtures import DDPM, NETWORK, weight
from train import checkpoint, trainer

FIXTURE = np.load(os.path.join(os.path.dirname(__file__), 'fixtures', 'ncsnpp.npz'))


OLD_ATTENTION = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}


def _released(folder, network: dict, tensors_key: str, old_names: bool = False) -> str:
  """A diffusers UNet2DModel folder with the fixture's name-seeded weights; old_names: the attention projections
  named as in checkpoints saved before diffusers renamed them (query, key, value, proj_attn)."""
  os.makedirs(folder)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump({'_class_name': 'UNet2DModel', **network}, f)
  shapes = json.loads(str(FIXTURE[tensors_key]))
  tensors = {name: weight(name, tuple(shape)) for name, shape in shapes.items()}
  if old_names:
    rename = lambda n: next((n.replace(f'.{a}.', f'.{b}.') for a, b in OLD_ATTENTION.items() if f'.{a}.' in n), n)
    tensors = {rename(n): v for n, v in tensors.items()}
  save_file(tensors, os.path.join(folder, 'diffusion_pytorch_model.safetensors'))
  return str(folder)


def _config(**overrides):
  c = default.get_config()
  c.data.image_size, c.data.num_channels = 16, 3
  for key, value in overrides.items():
    section, name = key.split('.')
    c[section][name] = value
  return c


DDPM_CONFIG = {'process.name': 'ddpm', 'model.prediction': 'eps', 'model.nf': 32, 'model.ch_mult': (1, 2),
               'model.num_res_blocks': 1, 'model.attn_resolutions': (8,), 'model.num_groups': 8,
               'model.downsample_padding': 'tf'}
NCSNPP_CONFIG = {'process.name': 've', 'model.prediction': 'eps', 'model.nf': 16, 'model.ch_mult': (1, 2, 8),
                 'model.num_res_blocks': 1, 'model.attn_resolutions': (4,), 'model.resblock_type': 'biggan',
                 'model.skip_rescale': True, 'model.embedding_type': 'fourier', 'model.fir': True,
                 'model.progressive': 'output_skip', 'model.progressive_input': 'input_skip',
                 'model.up_attention': 'once'}


def _imported_network(config, workdir):
  """The EMA network of workdir's step-0 checkpoint, as sampling restores it: fn(x, c), compiled (op by op, every
  layer's ops would compile one by one)."""
  graphdef, state, _, _ = trainer.init_state(config)
  state = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints')).restore(state)
  np.testing.assert_array_equal(jax.tree.leaves(state.params)[0], jax.tree.leaves(state.ema_params)[0])
  forward = jax.jit(lambda params, buffers, x, c: nnx.merge(graphdef, params, buffers)(x, c))
  return lambda x, c: forward(state.ema_params, state.buffers, x, c)


@pytest.mark.parametrize('old_names', [False, True])
def test_ddpm_import_gives_diffusers_eps(old_names, tmp_path):
  """Ho et al.'s blocks with TensorFlow's stride-2 padding: the imported network's eps equals diffusers' output at
  the same integer timesteps, which is what the 'ddpm' process feeds the network."""
  folder = _released(tmp_path / 'ddpm', DDPM, 'ddpm_tensors', old_names)
  config = _config(**DDPM_CONFIG, **{'model.init_from': folder})
  info = trainer.import_weights(config, str(tmp_path / 'run'))
  assert info['layout'] == 'ddpm' and info['num_params'] == int(FIXTURE['ddpm_num_params'])
  net = _imported_network(config, str(tmp_path / 'run'))
  out = net(jnp.asarray(FIXTURE['x']), jnp.asarray(FIXTURE['ddpm_timesteps'], jnp.float32))
  scale = np.abs(FIXTURE['ddpm_out']).max()
  np.testing.assert_allclose(np.asarray(out) / scale, FIXTURE['ddpm_out'] / scale, rtol=2e-5, atol=2e-5)
  process = trainer.build_process(config)
  t = process.t_from_index(jnp.asarray(FIXTURE['ddpm_timesteps']))
  np.testing.assert_allclose(process.noise_cond(t), FIXTURE['ddpm_timesteps'], atol=1e-3)


def test_ncsnpp_import_predicts_eps_of_the_score(tmp_path):
  """score_sde's NCSN++ is a score model (diffusers divides its output by sigma); imported, it predicts
  eps = -sigma * score from log sigma, the VE process's noise conditioning."""
  folder = _released(tmp_path / 'ncsnpp', NETWORK, 'tensors')
  config = _config(**NCSNPP_CONFIG, **{'model.init_from': folder})
  trainer.import_weights(config, str(tmp_path / 'run'))
  net = _imported_network(config, str(tmp_path / 'run'))
  sigma = jnp.asarray(FIXTURE['sigma'])
  process, t = trainer.build_process(config), jnp.array([0.1, 0.5, 0.9])
  np.testing.assert_allclose(process.noise_cond(t), jnp.log(process.sigma(t)), rtol=1e-6)  # what the net sees
  eps = net(jnp.asarray(FIXTURE['x']), jnp.log(sigma))
  ref = -FIXTURE['sigma'][:, None, None, None] * FIXTURE['out']
  for i in range(len(ref)):
    scale = np.abs(ref[i]).max()
    np.testing.assert_allclose(np.asarray(eps[i]) / scale, ref[i] / scale, rtol=2e-5, atol=2e-5)


def test_a_config_that_differs_is_named_in_one_error(tmp_path):
  folder = _released(tmp_path / 'ddpm', DDPM, 'ddpm_tensors')
  config = _config(**{**DDPM_CONFIG, 'model.nf': 64, 'model.downsample_padding': 'symmetric',
                      'model.fir': True, 'process.name': 'vp'}, **{'model.init_from': folder})
  with pytest.raises(ValueError) as e:
    trainer.import_weights(config, str(tmp_path / 'run'))
  for flag in ("--config.model.nf=32", "--config.model.downsample_padding='tf'", "--config.process.name='ddpm'",
               '--config.model.fir=False'):
    assert flag in str(e.value)
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_unusable_folders_are_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.json'):
    trainer.import_weights(_config(**{'model.init_from': str(tmp_path)}), str(tmp_path / 'run'))
  folder = _released(tmp_path / 'cond', {**DDPM, 'num_class_embeds': 10}, 'ddpm_tensors')
  with pytest.raises(ValueError, match='class conditioning'):
    trainer.import_weights(_config(**DDPM_CONFIG, **{'model.init_from': folder}), str(tmp_path / 'run'))
  # a tensor the network has no place for (or lacks) is an error, not a silent partial load
  folder = _released(tmp_path / 'extra', DDPM, 'ddpm_tensors')
  path = os.path.join(folder, 'diffusion_pytorch_model.safetensors')
  from safetensors.numpy import load_file
  tensors = load_file(path)
  save_file({**tensors, 'extra.weight': np.zeros(3, np.float32)}, path)
  with pytest.raises(ValueError, match='no place'):
    trainer.import_weights(_config(**DDPM_CONFIG, **{'model.init_from': folder}), str(tmp_path / 'run'))
