"""Released U-Nets in diffusers' UNet2DModel layout (a folder with config.json and diffusion_pytorch_model.safetensors),
converted to this U-Net: Ho et al.'s DDPM networks (google/ddpm-*: DownBlock2D / AttnDownBlock2D / UpBlock2D /
AttnUpBlock2D) and score_sde's NCSN++ (google/ncsnpp-*: the Skip blocks). Read with safetensors, no torch.

`read(folder)` gives the U-Net options the weights need and `to_params(...)` fills a parameter tree with them.
DDPM networks predict eps of the discrete process from the timestep index, as this codebase's 'ddpm' process and
prediction 'eps'. NCSN++ networks are score_sde's VE score models (the output divided by sigma); their last convs
are negated so that the network predicts eps = -sigma * score, for process 've' and prediction 'eps'.
"""

import dataclasses
import json
import os

import numpy as np
from safetensors.numpy import load_file

_DDPM_BLOCKS = ({'DownBlock2D': False, 'AttnDownBlock2D': True}, {'UpBlock2D': False, 'AttnUpBlock2D': True})
_SKIP_BLOCKS = ({'SkipDownBlock2D': False, 'AttnSkipDownBlock2D': True},
                {'SkipUpBlock2D': False, 'AttnSkipUpBlock2D': True})
# our module attribute -> diffusers' (older checkpoints name the attention projections query / key / value / proj_attn)
_LEAVES = {'temb_proj': ('time_emb_proj',), 'skip': ('conv_shortcut',), 'norm': ('group_norm',),
           'q': ('to_q', 'query'), 'k': ('to_k', 'key'), 'v': ('to_v', 'value'), 'out': ('to_out.0', 'proj_attn')}


@dataclasses.dataclass(frozen=True)
class Released:
  """A released network: the U-Net options it needs, its tensors by diffusers name, and its layout."""
  options: dict
  tensors: dict[str, np.ndarray]
  layout: str  # 'ddpm' | 'ncsnpp'
  source: str


def read(folder: str) -> Released:
  """The options and tensors of a diffusers UNet2DModel folder; one clear error for what it cannot convert."""
  paths = [os.path.join(folder, f) for f in ('config.json', 'diffusion_pytorch_model.safetensors')]
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path} not found: model.init_from needs a diffusers UNet2DModel folder '
                              '(config.json and diffusion_pytorch_model.safetensors)')
  with open(paths[0]) as f:
    c = json.load(f)
  options, layout = _options(c, folder)
  return Released(options, load_file(paths[1]), layout, folder)


def _options(c: dict, folder: str) -> tuple[dict, str]:
  def need(ok: bool, what: str):
    if not ok:
      raise ValueError(f'{folder}: {what}; this U-Net cannot take these weights')

  need(c.get('_class_name', 'UNet2DModel') == 'UNet2DModel', f"a {c.get('_class_name')}, not a UNet2DModel")
  down, up = tuple(c['down_block_types']), tuple(c['up_block_types'])
  layout = 'ncsnpp' if down[0] in _SKIP_BLOCKS[0] else 'ddpm'
  blocks = _SKIP_BLOCKS if layout == 'ncsnpp' else _DDPM_BLOCKS
  need(all(b in blocks[0] for b in down) and all(b in blocks[1] for b in up),
       f'blocks {down} / {up} are neither DDPM nor NCSN++ (Skip) blocks')
  channels = tuple(c['block_out_channels'])
  nf, size = channels[0], c['sample_size']
  need(all(ch % nf == 0 for ch in channels), f'block_out_channels {channels} are not multiples of the first')
  attn = [size // 2 ** i for i, b in enumerate(down) if blocks[0][b]]
  need(attn == [size // 2 ** i for i, b in enumerate(reversed(up)) if blocks[1][b]],
       'attention at different resolutions in the down and up paths')
  need(c.get('act_fn', 'silu') in ('silu', 'swish'), f"activation {c.get('act_fn')}")
  need(c.get('resnet_time_scale_shift', 'default') == 'default', 'scale-shift time conditioning')
  need(c.get('class_embed_type') is None and c.get('num_class_embeds') is None, 'class conditioning')
  need(c.get('norm_eps', 1e-5) == 1e-6, f"GroupNorm eps {c.get('norm_eps', 1e-5)} (this U-Net's is 1e-6)")
  need(c.get('add_attention', True) and not c.get('center_input_sample', False), 'no mid attention or centering')
  groups = c.get('norm_num_groups') or 32
  # this U-Net's GroupNorms have min(num_groups, channels / 4) groups; diffusers' DDPM blocks norm_num_groups, its
  # NCSN++ blocks min(channels / 4, 32) but 32 in attention and norm_num_groups (when set) in the last norm
  attn_channels = [ch for ch, b in zip(channels, down) if blocks[0][b]]
  need(min(channels if layout == 'ddpm' else attn_channels or [128]) >= 4 * groups and
       (layout == 'ddpm' or groups == 32 and (c.get('norm_num_groups') is None or channels[0] >= 128)),
       f'GroupNorm groups ({groups}) that this U-Net does not form on {channels} channels')
  heads = {ch // (c.get('attention_head_dim') or ch) for ch, b in zip(channels, down) if blocks[0][b]}
  need(len(heads) <= 1, 'a different number of attention heads per level')
  options = dict(image_size=size, in_channels=c['in_channels'], out_channels=c['out_channels'], nf=nf,
                 ch_mult=tuple(ch // nf for ch in channels), num_res_blocks=c['layers_per_block'],
                 attn_resolutions=tuple(attn), num_heads=heads.pop() if heads else 1, num_groups=groups)
  if layout == 'ddpm':
    need(c.get('time_embedding_type', 'positional') == 'positional', 'a non-positional time embedding')
    need(not c.get('flip_sin_to_cos', True) and c.get('freq_shift', 0) == 1,
         'a positional embedding other than DDPM\'s (flip_sin_to_cos=False, freq_shift=1)')
    need(c.get('mid_block_scale_factor', 1) == 1, 'rescaled skip connections in DDPM blocks')
    options.update(resblock_type='ddpm', skip_rescale=False, embedding_type='positional', resamp_with_conv=True,
                   downsample_padding='tf' if c.get('downsample_padding', 1) == 0 else 'symmetric',
                   up_attention='every_block', fir=False, progressive='none', progressive_input='none')
  else:
    need(c.get('time_embedding_type') == 'fourier', 'NCSN++ without Gaussian Fourier features')
    need(abs(c.get('mid_block_scale_factor', 1) - 2 ** 0.5) < 1e-6, 'NCSN++ without skip rescaling')
    options.update(resblock_type='biggan', skip_rescale=True, embedding_type='fourier', fourier_scale=16.0,
                   fir=True, fir_kernel=(1, 3, 3, 1), progressive='output_skip', progressive_input='input_skip',
                   progressive_combine='sum', up_attention='once')
  return options, layout


def module_names(options: dict, layout: str) -> dict[tuple, str]:
  """Our module paths -> diffusers' module names, for a U-Net built from `options`."""
  names = {('conv_in',): 'conv_in', ('temb1',): 'time_embedding.linear_1', ('temb2',): 'time_embedding.linear_2',
           ('mid', 0): 'mid_block.resnets.0', ('mid', 1): 'mid_block.attentions.0', ('mid', 2): 'mid_block.resnets.1',
           ('norm_out',): 'conv_norm_out', ('conv_out',): 'conv_out'}
  levels, blocks, i = len(options['ch_mult']), options['num_res_blocks'], 0
  for level in range(levels):
    for b in range(blocks):
      names[('down', i, 0)] = f'down_blocks.{level}.resnets.{b}'
      names[('down', i, 1)] = f'down_blocks.{level}.attentions.{b}'
      i += 1
    if level != levels - 1:
      if layout == 'ncsnpp':
        names[('down', i, 0)] = f'down_blocks.{level}.resnet_down'
        names[('input_pyramid', level, 'conv')] = f'down_blocks.{level}.skip_conv'
      else:
        names[('down', i, 0)] = f'down_blocks.{level}.downsamplers.0'
      i += 1
  i = 0
  for k, level in enumerate(reversed(range(levels))):
    for b in range(blocks + 1):
      names[('up', i, 0)] = f'up_blocks.{k}.resnets.{b}'
      names[('up', i, 1)] = f'up_blocks.{k}.attentions.{0 if layout == "ncsnpp" else b}'
      i += 1
    if layout == 'ncsnpp':
      top = level == 0
      names[('output_pyramid', k, 'norm')] = 'conv_norm_out' if top else f'up_blocks.{k}.skip_norm'
      names[('output_pyramid', k, 'conv')] = 'conv_out' if top else f'up_blocks.{k}.skip_conv'
    if level != 0:
      names[('up', i, 0)] = f'up_blocks.{k}.resnet_up' if layout == 'ncsnpp' else f'up_blocks.{k}.upsamplers.0'
      i += 1
  return names


def diffusers_name(path: tuple, names: dict[tuple, str], tensors) -> str:
  """The diffusers tensor name of our parameter at `path` (e.g. ('down', 0, 0, 'conv1', 'kernel'))."""
  head = next((path[:n] for n in range(len(path), 0, -1) if path[:n] in names), None)
  if head is None:
    raise ValueError(f'no diffusers tensor for parameter {"/".join(map(str, path))}')
  suffix = 'weight' if path[-1] in ('scale', 'kernel') else path[-1]
  inner = path[len(head):-1]
  for alias in (_LEAVES.get(inner[0], (inner[0],)) if inner else ('',)):
    name = '.'.join(filter(None, [names[head], alias, *map(str, inner[1:]), suffix]))
    if name in tensors:
      return name
  return name


def to_ours(name: str, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """A diffusers (PyTorch-layout) tensor in our layout: conv [O, I, kh, kw] -> [kh, kw, I, O], dense [O, I] ->
  [I, O]."""
  if value.ndim == 4:
    value = value.transpose(2, 3, 1, 0)
  elif value.ndim == 2:
    value = value.T
  if value.shape != tuple(shape):
    raise ValueError(f'tensor {name} has shape {value.shape} (in our layout) where the U-Net has {tuple(shape)}')
  return value.astype(np.float32)


def to_params(released: Released, flat_params: list[tuple[tuple, tuple[int, ...]]]) -> dict[tuple, np.ndarray]:
  """Our parameters {path: array} for the U-Net's parameter paths and shapes; every tensor must be used once.
  NCSN++: the output convs are negated (eps = -sigma * score) and the Fourier frequencies come as ('fourier', 'w')."""
  t = released.tensors
  names = module_names(released.options, released.layout)
  out, used = {}, set()
  for path, shape in flat_params:
    name = diffusers_name(path, names, t)
    if name not in t:
      raise ValueError(f'{released.source}: no tensor {name} for parameter {"/".join(map(str, path))}')
    value = to_ours(name, t[name], shape)
    if released.layout == 'ncsnpp' and (path[0] == 'output_pyramid' and path[2] == 'conv'):
      value = -value
    out[path], used = value, used | {name}
  if released.layout == 'ncsnpp':
    out[('fourier', 'w')], used = t['time_proj.weight'].astype(np.float32), used | {'time_proj.weight'}
  unused = sorted(set(t) - used)
  if unused:
    raise ValueError(f'{released.source}: {len(unused)} tensors have no place in this U-Net, e.g. {unused[:3]}')
  return out
