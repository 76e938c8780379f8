"""The DDPM++ / NCSN++-family U-Net (Ho et al. 2020; Song et al. 2021), flax.nnx, NHWC.

With resblock_type='ddpm', skip_rescale=False and positional embeddings it is the DDPM network (35.7 M
parameters in the CIFAR-10 configuration); with skip_rescale=True it is DDPM++; BigGAN blocks, Gaussian
Fourier embeddings of log sigma and skip rescaling give the NCSN++ variant without FIR resampling.
With context_dim > 0 it is a text-conditioned (latent diffusion) U-Net: every attention block becomes a
spatial transformer that cross-attends to the text tokens, and the pooled text embedding joins the time
embedding (pooled_dim > 0).
"""

import dataclasses
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


class UNet(nnx.Module):
  """eps / x0 / v / score / EDM-F network: (x [B, H, W, C], noise_cond [B], cond) -> [B, H, W, C], where cond
  is None, class labels [B] (num_classes > 0) or a text condition (context_dim > 0)."""

  def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
    if cfg.embedding_type not in ('positional', 'fourier'):
      raise ValueError(f"unknown embedding_type {cfg.embedding_type!r}; choose 'positional' or 'fourier'")
    if cfg.dtype not in DTYPES:
      raise ValueError(f'unknown model dtype {cfg.dtype!r}; choose one of {sorted(DTYPES)}')
    if cfg.image_size % 2 ** (len(cfg.ch_mult) - 1):
      raise ValueError(f'image_size {cfg.image_size} is not divisible by 2^{len(cfg.ch_mult) - 1} '
                       f'(ch_mult={cfg.ch_mult})')
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

    self.conv_in = layers.conv(cfg.in_channels, nf, dtype=dt, rngs=rngs)
    # Down path: every block's output is kept for a skip connection.
    down, skip_ch, ch, res = [], [nf], nf, cfg.image_size
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
          down.append(nnx.List([layers.Downsample(ch, cfg.resamp_with_conv, dtype=dt, rngs=rngs)]))
        skip_ch.append(ch)
        res //= 2
    self.down = nnx.List(down)
    self.mid = nnx.List([layers.ResBlock(ch, ch, temb_dim, **res_kw), attn(ch),
                         layers.ResBlock(ch, ch, temb_dim, **res_kw)])
    # Up path: num_res_blocks + 1 blocks per level, each consuming one skip connection.
    up = []
    for level, mult in reversed(list(enumerate(cfg.ch_mult))):
      for _ in range(cfg.num_res_blocks + 1):
        block = [layers.ResBlock(ch + skip_ch.pop(), nf * mult, temb_dim, **res_kw)]
        ch = nf * mult
        if res in cfg.attn_resolutions:
          block.append(attn(ch))
        up.append(nnx.List(block))
      if level != 0:
        if cfg.resblock_type == 'biggan':
          up.append(nnx.List([layers.ResBlock(ch, ch, temb_dim, up=True, **res_kw)]))
        else:
          up.append(nnx.List([layers.Upsample(ch, cfg.resamp_with_conv, dtype=dt, rngs=rngs)]))
        res *= 2
    self.up = nnx.List(up)
    self.norm_out = layers.group_norm(ch, cfg.num_groups, rngs=rngs)
    self.conv_out = layers.conv(ch, cfg.out_channels or cfg.in_channels, init_scale=0.0, dtype=dt, rngs=rngs)

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
    h = self.conv_in(x.astype(dt))
    hs = [h]
    for block in self.down:
      h = self._run(block, h, temb, train, rngs, text)
      hs.append(h)
    h = self._run(self.mid, h, temb, train, rngs, text)
    for block in self.up:
      if isinstance(block[0], layers.ResBlock) and not block[0].up:
        h = jnp.concatenate([h, hs.pop()], -1)
      h = self._run(block, h, temb, train, rngs, text)
    h = self.norm_out(h, silu=True, dtype=dt)
    return self.conv_out(h)
