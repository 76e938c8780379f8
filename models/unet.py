"""The DDPM++ / NCSN++-family U-Net (Ho et al. 2020; Song et al. 2021), flax.nnx, NHWC.

With resblock_type='ddpm', skip_rescale=False and positional embeddings it is the DDPM network (35.7 M
parameters in the CIFAR-10 configuration). score_sde's DDPM++ adds skip rescaling, BigGAN blocks and attention
once per level of the up path (up_attention='once'); its NCSN++ adds FIR resampling (fir=True), Gaussian
Fourier embeddings of log sigma and a progressive input and / or output path: an image pyramid that enters the
down path at every resolution (progressive_input) and leaves the up path at every resolution (progressive).
With context_dim > 0 it is a text-conditioned (latent diffusion) U-Net: every attention block becomes a
spatial transformer that cross-attends to the text tokens, and the pooled text embedding joins the time
embedding (pooled_dim > 0).
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models import layers

Array = jax.Array
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  image_size: int = 32
  in_channels: int = 3
  out_channels: int | None = None  # defaults to in_channels
  nf: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = (16,)
  num_heads: int = 1
  dropout: float = 0.1
  resblock_type: str = 'ddpm'  # ddpm | biggan
  resamp_with_conv: bool = True
  skip_rescale: bool = False
  embedding_type: str = 'positional'  # positional | fourier
  fourier_scale: float = 16.0
  fir: bool = False  # FIR up / downsampling with fir_kernel (NCSN++) instead of nearest / average pooling
  fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
  progressive: str = 'none'  # output path: none | output_skip (sum of per-resolution RGB outputs) | residual
  progressive_input: str = 'none'  # input path: none | input_skip (the downsampled image joins) | residual
  progressive_combine: str = 'sum'  # how input_skip joins the down path: sum | cat
  up_attention: str = 'every_block'  # up path: after every_block of a level (DDPM) | once per level (score_sde)
  downsample_padding: str = 'symmetric'  # stride-2 conv: symmetric | tf (after only: DDPM's released weights)
  num_groups: int = 32
  num_classes: int = 0  # > 0: class embedding with num_classes + 1 entries (the last is the null label)
  dtype: str = 'float32'  # compute dtype; parameters are float32
  remat: bool = False  # training: recompute each residual block's activations in the backward pass
  attention: str = 'xla'  # jax.nn.dot_product_attention's implementation: xla | cudnn (GPU, bf16)
  context_dim: int = 0  # > 0: spatial transformers cross-attend to text tokens of this width
  transformer_depth: int = 1  # transformer blocks per spatial transformer
  pooled_dim: int = 0  # > 0: the pooled text embedding is projected and added to the time embedding
  text_encoder: Any = None  # a models.text.SmallTextConfig: a trainable encoder of token ids inside the model


TextCond = dict[str, Array]  # {'tokens': [B, L, D], 'mask': [B, L], 'pooled': [B, D]} or {'ids', 'mask'}


def _validate(cfg: UNetConfig) -> None:
  """One clear error for a configuration the U-Net cannot build as asked."""
  if cfg.embedding_type not in ('positional', 'fourier'):
    raise ValueError(f"unknown embedding_type {cfg.embedding_type!r}; choose 'positional' or 'fourier'")
  if cfg.nf < 1 or not cfg.ch_mult or min(cfg.ch_mult) < 1 or cfg.num_res_blocks < 1 or cfg.num_heads < 1:
    raise ValueError(f'the U-Net needs nf >= 1, a non-empty ch_mult of positive ints, num_res_blocks >= 1 and '
                     f'num_heads >= 1; got nf={cfg.nf}, ch_mult={cfg.ch_mult}, '
                     f'num_res_blocks={cfg.num_res_blocks}, num_heads={cfg.num_heads}')
  if cfg.num_groups < 1:
    raise ValueError(f'num_groups={cfg.num_groups} must be at least 1')
  if not 0.0 <= cfg.dropout < 1.0:
    raise ValueError(f'dropout={cfg.dropout} must be in [0, 1)')
  for name, choices in (('progressive', ('none', 'output_skip', 'residual')),
                        ('progressive_input', ('none', 'input_skip', 'residual')),
                        ('progressive_combine', ('sum', 'cat')), ('up_attention', ('every_block', 'once'))):
    if getattr(cfg, name) not in choices:
      raise ValueError(f'unknown {name} {getattr(cfg, name)!r}; choose one of {choices}')
  if cfg.progressive != 'none' and cfg.context_dim > 0:
    raise ValueError('progressive outputs are for pixel-space NCSN++ models, not text-conditioned ones')
  if cfg.dtype not in DTYPES:
    raise ValueError(f'unknown model dtype {cfg.dtype!r}; choose one of {sorted(DTYPES)}')
  if cfg.image_size % 2 ** (len(cfg.ch_mult) - 1):
    raise ValueError(f'image_size {cfg.image_size} is not divisible by 2^{len(cfg.ch_mult) - 1} '
                     f'(ch_mult={cfg.ch_mult})')
  levels = tuple(cfg.image_size // 2 ** i for i in range(len(cfg.ch_mult)))
  if not set(cfg.attn_resolutions) <= set(levels):
    raise ValueError(f'attn_resolutions={tuple(cfg.attn_resolutions)} names resolutions the U-Net does not have: '
                     f'its levels are {levels} (image_size={cfg.image_size}, {len(cfg.ch_mult)} levels)')


class UNet(nnx.Module):
  """eps / x0 / v / score / EDM-F network: (x [B, H, W, C], noise_cond [B], cond) -> [B, H, W, C], where cond
  is None, class labels [B] (num_classes > 0) or a text condition (context_dim > 0)."""

  def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
    _validate(cfg)
    self.cfg = cfg
    dt = DTYPES[cfg.dtype]
    nf, temb_dim = cfg.nf, 4 * cfg.nf
    kw = dict(num_groups=cfg.num_groups, dtype=dt, rngs=rngs)
    res_kw = dict(kind=cfg.resblock_type, dropout=cfg.dropout, skip_rescale=cfg.skip_rescale, **kw)
    attn_kw = dict(num_heads=cfg.num_heads, skip_rescale=cfg.skip_rescale, attention=cfg.attention, **kw)
    if cfg.context_dim > 0:
      attn = lambda ch: layers.SpatialTransformer(ch, cfg.context_dim, depth=cfg.transformer_depth, **attn_kw)
    else:
      attn = lambda ch: layers.AttnBlock(ch, **attn_kw)
    if cfg.text_encoder is not None:
      from models.text import SmallTextEncoder
      if cfg.context_dim != cfg.text_encoder.width:
        raise ValueError(f'context_dim {cfg.context_dim} must equal the text encoder width {cfg.text_encoder.width}')
      self.text_encoder = SmallTextEncoder(cfg.text_encoder, rngs=rngs)
    else:
      self.text_encoder = None

    if cfg.embedding_type == 'fourier':
      self.fourier = layers.FourierEmbedding(nf, cfg.fourier_scale, rngs=rngs)
      emb_in = 2 * nf
    else:
      self.fourier = None
      emb_in = nf
    self.temb1 = layers.dense(emb_in, temb_dim, rngs=rngs)
    self.temb2 = layers.dense(temb_dim, temb_dim, rngs=rngs)
    self.class_emb = (nnx.Embed(cfg.num_classes + 1, temb_dim, rngs=rngs) if cfg.num_classes > 0 else None)
    self.pooled_proj = layers.dense(cfg.pooled_dim, temb_dim, rngs=rngs) if cfg.pooled_dim > 0 else None

    fir = cfg.fir_kernel if cfg.fir else None
    res_kw['fir_kernel'] = fir
    resample_kw = dict(fir_kernel=fir, dtype=dt, rngs=rngs)
    out_ch = cfg.out_channels or cfg.in_channels

    self.conv_in = layers.conv(cfg.in_channels, nf, dtype=dt, rngs=rngs)
    # Down path: every block's output is kept for a skip connection.
    down, skip_ch, ch, res = [], [nf], nf, cfg.image_size
    input_pyramid, pyramid_ch = [], cfg.in_channels
    for level, mult in enumerate(cfg.ch_mult):
      for _ in range(cfg.num_res_blocks):
        block = [layers.ResBlock(ch, nf * mult, temb_dim, **res_kw)]
        ch = nf * mult
        if res in cfg.attn_resolutions:
          block.append(attn(ch))
        down.append(nnx.List(block))
        skip_ch.append(ch)
      if level != len(cfg.ch_mult) - 1:
        if cfg.resblock_type == 'biggan':
          down.append(nnx.List([layers.ResBlock(ch, ch, temb_dim, down=True, **res_kw)]))
        else:
          down.append(nnx.List([layers.Downsample(ch, cfg.resamp_with_conv, padding=cfg.downsample_padding,
                                                  **resample_kw)]))
        if cfg.progressive_input != 'none':
          input_pyramid.append(InputPyramid(cfg.progressive_input, pyramid_ch, ch, combine=cfg.progressive_combine,
                                            skip_rescale=cfg.skip_rescale, **resample_kw))
          pyramid_ch = cfg.in_channels if cfg.progressive_input == 'input_skip' else ch
          ch = 2 * ch if cfg.progressive_input == 'input_skip' and cfg.progressive_combine == 'cat' else ch
        skip_ch.append(ch)
        res //= 2
    self.down = nnx.List(down)
    self.input_pyramid = nnx.List(input_pyramid) if input_pyramid else None
    self.mid = nnx.List([layers.ResBlock(ch, ch, temb_dim, **res_kw), attn(ch),
                         layers.ResBlock(ch, ch, temb_dim, **res_kw)])
    # Up path: num_res_blocks + 1 blocks per level, each consuming one skip connection.
    up, level_ends, output_pyramid, pyramid_ch = [], [], [], 0
    for level, mult in reversed(list(enumerate(cfg.ch_mult))):
      for i in range(cfg.num_res_blocks + 1):
        block = [layers.ResBlock(ch + skip_ch.pop(), nf * mult, temb_dim, **res_kw)]
        ch = nf * mult
        if res in cfg.attn_resolutions and (cfg.up_attention == 'every_block' or i == cfg.num_res_blocks):
          block.append(attn(ch))
        up.append(nnx.List(block))
      level_ends.append(len(up) - 1)
      if cfg.progressive != 'none':
        top = level == len(cfg.ch_mult) - 1
        output_pyramid.append(OutputPyramid(cfg.progressive, ch, pyramid_ch, out_ch, top=top,
                                            skip_rescale=cfg.skip_rescale, num_groups=cfg.num_groups,
                                            **resample_kw))
        pyramid_ch = out_ch if cfg.progressive == 'output_skip' else ch
      if level != 0:
        if cfg.resblock_type == 'biggan':
          up.append(nnx.List([layers.ResBlock(ch, ch, temb_dim, up=True, **res_kw)]))
        else:
          up.append(nnx.List([layers.Upsample(ch, cfg.resamp_with_conv, **resample_kw)]))
        res *= 2
    self.up = nnx.List(up)
    self.level_ends = tuple(level_ends)  # index in self.up of each level's last block
    self.output_pyramid = nnx.List(output_pyramid) if output_pyramid else None
    if cfg.progressive == 'output_skip':  # the output is the pyramid's
      self.norm_out, self.conv_out = None, None
    else:
      self.norm_out = layers.group_norm(ch, cfg.num_groups, rngs=rngs)
      self.conv_out = layers.conv(ch, out_ch, init_scale=0.0, dtype=dt, rngs=rngs)

  def _text(self, cond: TextCond | None) -> tuple[Array | None, Array | None, Array | None]:
    """(tokens [B, L, D], mask [B, L], pooled [B, D]) of a text condition."""
    if self.cfg.context_dim == 0:
      return None, None, None
    if not isinstance(cond, dict):
      raise ValueError('a text-conditioned U-Net needs a text condition (tokens and mask), got '
                       f'{type(cond).__name__}')
    if self.text_encoder is not None:
      tokens, pooled = self.text_encoder(cond['ids'], cond['mask'])
      return tokens, cond['mask'], pooled
    return cond['tokens'], cond['mask'], cond.get('pooled')

  def _embed(self, noise_cond: Array, labels: Array | None, pooled: Array | None = None) -> Array:
    if self.fourier is not None:
      emb = self.fourier(noise_cond)
    else:
      emb = layers.positional_embedding(noise_cond, self.cfg.nf)
    emb = self.temb2(nnx.silu(self.temb1(emb)))
    if self.class_emb is not None:
      if labels is None:
        labels = jnp.full(noise_cond.shape, self.cfg.num_classes, jnp.int32)  # the null label
      emb = emb + self.class_emb(labels)
    if self.pooled_proj is not None:
      emb = emb + self.pooled_proj(pooled.astype(jnp.float32))
    return nnx.silu(emb)  # every block projects act(temb)

  def _run(self, block, h: Array, temb: Array, train: bool, rngs, text=None) -> Array:
    for layer in block:
      if isinstance(layer, layers.ResBlock):
        if self.cfg.remat and train:  # activation checkpointing: memory of one block instead of all
          h = nnx.remat(lambda m, h, temb, rngs: m(h, temb, train=True, rngs=rngs))(layer, h, temb, rngs)
        else:
          h = layer(h, temb, train=train, rngs=rngs)
      elif isinstance(layer, layers.SpatialTransformer):
        h = layer(h, text[0], text[1])
      else:
        h = layer(h)
    return h

  def __call__(self, x: Array, noise_cond: Array, cond: Array | TextCond | None = None, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> Array:
    dt = DTYPES[self.cfg.dtype]
    text = self._text(cond)
    temb = self._embed(noise_cond, None if text[0] is not None else cond, text[2]).astype(dt)
    x = x.astype(dt)
    h = self.conv_in(x)
    hs, pyramid = [h], x
    resamplers = iter(self.input_pyramid or ())
    for block in self.down:
      h = self._run(block, h, temb, train, rngs, text)
      if self.input_pyramid is not None and _resamples(block):
        h, pyramid = next(resamplers)(h, pyramid)
      hs.append(h)
    h = self._run(self.mid, h, temb, train, rngs, text)
    pyramid, outputs = None, iter(self.output_pyramid or ())
    for i, block in enumerate(self.up):
      if isinstance(block[0], layers.ResBlock) and not block[0].up:
        h = jnp.concatenate([h, hs.pop()], -1)
      h = self._run(block, h, temb, train, rngs, text)
      if self.output_pyramid is not None and i in self.level_ends:
        h, pyramid = next(outputs)(h, pyramid)
    if self.conv_out is None:
      return pyramid
    h = self.norm_out(h, silu=True, dtype=dt)
    return self.conv_out(h)


def _resamples(block) -> bool:
  """Whether a block of the down path halves the resolution."""
  return isinstance(block[0], layers.Downsample) or (isinstance(block[0], layers.ResBlock) and block[0].down)


class InputPyramid(nnx.Module):
  """NCSN++'s progressive input at one downsampling: the image pyramid [B, H, W, Cp] is downsampled and joins the
  down path's h [B, H, W, C]. 'input_skip': FIR (or average-pool) downsampling, then a 1x1 conv summed with or
  concatenated to h; 'residual': a fused FIR downsampling conv to C channels, summed with h (and rescaled), and
  that sum is both the new h and the next pyramid level."""

  def __init__(self, kind: str, pyramid_ch: int, ch: int, *, combine: str, skip_rescale: bool, fir_kernel, dtype,
               rngs: nnx.Rngs):
    self.kind, self.combine, self.skip_rescale = kind, combine, skip_rescale
    resample_kw = dict(fir_kernel=fir_kernel, dtype=dtype, rngs=rngs)
    if kind == 'input_skip':
      self.down = layers.Downsample(pyramid_ch, False, **resample_kw)
      self.conv = layers.conv(pyramid_ch, ch, kernel=1, dtype=dtype, rngs=rngs)
    else:
      self.down = layers.Downsample(pyramid_ch, True, out_channels=ch, **resample_kw)
      self.conv = None

  def __call__(self, h: Array, pyramid: Array) -> tuple[Array, Array]:
    pyramid = self.down(pyramid)
    if self.kind == 'input_skip':
      p = self.conv(pyramid)
      return (p + h if self.combine == 'sum' else jnp.concatenate([p, h], -1)), pyramid
    pyramid = pyramid + h
    pyramid = pyramid / math.sqrt(2.0) if self.skip_rescale else pyramid
    return pyramid, pyramid


class OutputPyramid(nnx.Module):
  """NCSN++'s progressive output at the end of one up-path level (h [B, H, W, C]). 'output_skip': an output-channel
  image from GroupNorm, SiLU and a 3x3 conv of h, added to the FIR-upsampled pyramid of the level below; the last
  level's sum is the network's output. 'residual': on the lowest level a 3x3 conv of SiLU(GroupNorm(h)); above it,
  the pyramid upsampled by a fused FIR conv to C channels and summed with h (rescaled), which becomes h."""

  def __init__(self, kind: str, ch: int, pyramid_ch: int, out_ch: int, *, top: bool, skip_rescale: bool,
               num_groups: int, fir_kernel, dtype, rngs: nnx.Rngs):
    self.kind, self.top, self.skip_rescale = kind, top, skip_rescale
    resample_kw = dict(fir_kernel=fir_kernel, dtype=dtype, rngs=rngs)
    has_conv = kind == 'output_skip' or top
    self.norm = layers.group_norm(ch, num_groups, rngs=rngs) if has_conv else None
    skip = kind == 'output_skip'
    self.conv = layers.conv(ch, out_ch if skip else ch, init_scale=0.0 if skip else 1.0, dtype=dtype,
                            rngs=rngs) if has_conv else None
    self.up = None if top else layers.Upsample(pyramid_ch, kind == 'residual', **resample_kw,
                                               out_channels=ch if kind == 'residual' else None)

  def __call__(self, h: Array, pyramid: Array | None) -> tuple[Array, Array]:
    if self.kind == 'output_skip':
      p = self.conv(self.norm(h, silu=True))
      return h, p if self.top else self.up(pyramid) + p
    if self.top:
      return h, self.conv(self.norm(h, silu=True))
    pyramid = self.up(pyramid) + h
    pyramid = pyramid / math.sqrt(2.0) if self.skip_rescale else pyramid
    return pyramid, pyramid
