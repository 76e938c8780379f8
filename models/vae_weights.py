"""AutoencoderKL weights in diffusers' layout: a folder with config.json and diffusion_pytorch_model.safetensors.

This is how Stable Diffusion's VAE ships (<model>/vae/), and how the trainer exports the VAEs it trains
(<workdir>/vae/), so latent diffusion loads either through the same function. Names map one to one onto
models/vae.py: conv kernels OIHW <-> HWIO, linear weights [out, in] <-> [in, out], GroupNorm weight <-> scale.
Older checkpoints' attention names (query / key / value / proj_attn, or 1x1-conv attention weights) are accepted.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from models.vae import AutoencoderKL, VAEConfig

WEIGHTS = 'diffusion_pytorch_model.safetensors'
_OLD_ATTENTION = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


class VAEWeightsError(ValueError):
  """A VAE folder that is missing, or whose tensors do not fit its config."""


def resolve(path: str) -> str:
  """The folder holding config.json: `path` itself, or its `vae/` subfolder (an SD model root, a VAE workdir)."""
  for candidate in (path, os.path.join(path, 'vae')):
    if os.path.isfile(os.path.join(candidate, 'config.json')):
      return candidate
  raise VAEWeightsError(f'no VAE at {path!r}: expected config.json and {WEIGHTS} there or in {path}/vae '
                        '(train one with --config=configs/mnist/vae_f4.py, or point at a diffusers AutoencoderKL)')


def config_from_diffusers(d: dict) -> tuple[VAEConfig, float, float]:
  """(VAEConfig, scaling_factor, shift_factor) from an AutoencoderKL config.json."""
  for key, ok in (('down_block_types', 'DownEncoderBlock2D'), ('up_block_types', 'UpDecoderBlock2D')):
    bad = [b for b in d.get(key, ()) if b != ok]
    if bad:
      raise VAEWeightsError(f'config.json {key} has {bad[0]!r}; only {ok} blocks are supported')
  if d.get('act_fn', 'silu') != 'silu':
    raise VAEWeightsError(f"config.json act_fn is {d['act_fn']!r}; only 'silu' is supported")
  cfg = VAEConfig(in_channels=d.get('in_channels', 3), out_channels=d.get('out_channels', 3),
                  block_out_channels=tuple(d.get('block_out_channels', (64,))),
                  layers_per_block=d.get('layers_per_block', 1), latent_channels=d.get('latent_channels', 4),
                  norm_num_groups=d.get('norm_num_groups', 32), mid_attention=d.get('mid_block_add_attention', True),
                  use_quant_conv=d.get('use_quant_conv', True), use_post_quant_conv=d.get('use_post_quant_conv', True))
  return cfg, float(d.get('scaling_factor') or 0.18215), float(d.get('shift_factor') or 0.0)


def config_to_diffusers(cfg: VAEConfig, scaling_factor: float, shift_factor: float) -> dict:
  n = len(cfg.block_out_channels)
  return {'_class_name': 'AutoencoderKL', 'in_channels': cfg.in_channels,
          'out_channels': cfg.out_channels or cfg.in_channels, 'down_block_types': ['DownEncoderBlock2D'] * n,
          'up_block_types': ['UpDecoderBlock2D'] * n, 'block_out_channels': list(cfg.block_out_channels),
          'layers_per_block': cfg.layers_per_block, 'act_fn': 'silu', 'latent_channels': cfg.latent_channels,
          'norm_num_groups': cfg.norm_num_groups, 'scaling_factor': scaling_factor,
          'shift_factor': shift_factor or None, 'use_quant_conv': cfg.use_quant_conv,
          'use_post_quant_conv': cfg.use_post_quant_conv, 'mid_block_add_attention': cfg.mid_attention}


def _name(path: tuple) -> str:
  """('encoder', 'down_blocks', 0, 'resnets', 0, 'conv1', 'kernel') -> 'encoder.down_blocks.0.resnets.0.conv1.weight'."""
  *mod, leaf = [str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path]
  return '.'.join(mod + ['weight' if leaf in ('kernel', 'scale') else leaf])


def _to_ours(w: np.ndarray, shape: tuple) -> np.ndarray:
  if len(shape) == 4:  # conv: OIHW -> HWIO
    return w.transpose(2, 3, 1, 0)
  if len(shape) == 2:  # linear: [out, in] (or a 1x1 conv [out, in, 1, 1]) -> [in, out]
    return w.reshape(w.shape[0], -1).T
  return w


def _renamed(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for name, w in tensors.items():
    parts = name.split('.')
    if len(parts) >= 2 and parts[-2] in _OLD_ATTENTION:
      name = '.'.join(parts[:-2] + [_OLD_ATTENTION[parts[-2]], parts[-1]])
    out[name] = w
  return out


def abstract_state(cfg: VAEConfig) -> tuple[nnx.State, nnx.State]:
  """(params, buffers) of an AutoencoderKL as shape-dtype structures, split as the trainer splits models."""
  model = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
  _, params, buffers = nnx.split(model, nnx.Param, ...)
  return params, buffers


def load(path: str) -> tuple[VAEConfig, nnx.State, nnx.State]:
  """(config, params, buffers) of the AutoencoderKL at `path` (see `resolve`), float32, on the default device."""
  folder = resolve(path)
  with open(os.path.join(folder, 'config.json')) as f:
    cfg, scale, shift = config_from_diffusers(json.load(f))
  candidates = [os.path.join(folder, name) for name in (WEIGHTS, WEIGHTS.replace('.safetensors', '.fp16.safetensors'))]
  weights = next((c for c in candidates if os.path.isfile(c)), None)
  if weights is None:
    raise VAEWeightsError(f'{folder} has config.json but no {WEIGHTS} (or its .fp16 variant)')
  try:
    tensors = _renamed(load_file(weights))
  except Exception as e:
    raise VAEWeightsError(f'{weights} is not a readable safetensors file ({" ".join(str(e).split())})') from None
  template, buffers = abstract_state(cfg)
  flat = jax.tree_util.tree_flatten_with_path(template.to_pure_dict())[0]
  values, missing, mismatched = {}, [], []
  for path_, like in flat:
    name = _name(path_)
    if name not in tensors:
      missing.append(name)
      continue
    w = _to_ours(np.asarray(tensors[name], np.float32), like.shape)
    if w.shape != like.shape:
      mismatched.append(f'{name} {tuple(tensors[name].shape)} (config needs {like.shape})')
      continue
    values[path_] = w
  unexpected = sorted(set(tensors) - {_name(p) for p, _ in flat})
  if missing or mismatched or unexpected:
    parts = [f'{len(missing)} missing ({", ".join(missing[:3])}{", ..." if len(missing) > 3 else ""})' if missing
             else '', f'{len(mismatched)} with the wrong shape ({mismatched[0]})' if mismatched else '',
             f'{len(unexpected)} unexpected ({", ".join(unexpected[:3])})' if unexpected else '']
    raise VAEWeightsError(f'{weights} does not match its config.json: tensors ' + '; '.join(p for p in parts if p))
  leaves = [jnp.asarray(values[p]) for p, _ in flat]
  treedef = jax.tree_util.tree_structure(template.to_pure_dict())
  params = template
  params.replace_by_pure_dict(jax.tree_util.tree_unflatten(treedef, leaves))
  buffers.replace_by_pure_dict({'scaling_factor': jnp.float32(scale), 'shift_factor': jnp.float32(shift)})
  return cfg, params, buffers


def save(folder: str, cfg: VAEConfig, params: nnx.State, scaling_factor: float, shift_factor: float = 0.0) -> str:
  """Writes config.json and the safetensors weights (the inverse of `load`); returns the folder."""
  os.makedirs(folder, exist_ok=True)
  tensors = {}
  for path_, w in jax.tree_util.tree_flatten_with_path(params.to_pure_dict())[0]:
    w = np.asarray(jax.device_get(w), np.float32)
    if w.ndim == 4:
      w = w.transpose(3, 2, 0, 1)
    elif w.ndim == 2:
      w = w.T
    tensors[_name(path_)] = np.ascontiguousarray(w)
  tmp = os.path.join(folder, WEIGHTS + '.tmp')
  save_file(tensors, tmp)
  os.replace(tmp, os.path.join(folder, WEIGHTS))
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(config_to_diffusers(cfg, float(scaling_factor), float(shift_factor)), f, indent=2)
  return folder
