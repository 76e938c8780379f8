"""Building blocks of the DDPM++ / NCSN++ U-Net (Ho et al. 2020; Song et al. 2021), in flax.nnx, NHWC.

Initialization follows score_sde: fan-avg uniform variance scaling, and a zero scale for the last layer of
every residual branch so each block starts as the identity.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


class Buffer(nnx.Variable):
  """A fixed, non-trainable array (e.g. random Fourier frequencies): saved, never optimized."""


def default_init(scale: float = 1.0):
  if scale == 0.0:
    return nnx.initializers.zeros
  return nnx.initializers.variance_scaling(scale, 'fan_avg', 'uniform')


def conv(cin: int, cout: int, kernel: int = 3, *, stride: int = 1, init_scale: float = 1.0, dtype=jnp.float32,
         rngs: nnx.Rngs) -> nnx.Conv:
  pad = kernel // 2  # symmetric padding, as PyTorch's Conv2d(padding=k // 2)
  return nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                  kernel_init=default_init(init_scale), dtype=dtype, rngs=rngs)


def dense(cin: int, cout: int, *, init_scale: float = 1.0, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(cin, cout, kernel_init=default_init(init_scale), dtype=dtype, rngs=rngs)


def group_norm(channels: int, num_groups: int, *, rngs: nnx.Rngs) -> nnx.GroupNorm:
  """GroupNorm computed in float32 whatever the compute dtype; eps 1e-6 as in score_sde."""
  return nnx.GroupNorm(channels, num_groups=min(num_groups, channels // 4) or 1, epsilon=1e-6,
                       dtype=jnp.float32, rngs=rngs)


def positional_embedding(t: Array, dim: int, max_positions: int = 10_000) -> Array:
  """Sinusoidal embedding [B, dim] of a scalar per example (Vaswani et al.; DDPM)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_positions) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], -1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class FourierEmbedding(nnx.Module):
  """Gaussian random Fourier features [B, 2 * dim] of a scalar (Tancik et al.; NCSN++ on log sigma)."""

  def __init__(self, dim: int, scale: float, *, rngs: nnx.Rngs):
    self.w = Buffer(jax.random.normal(rngs.params(), (dim,)) * scale)

  def __call__(self, t: Array) -> Array:
    args = t.astype(jnp.float32)[:, None] * self.w[...][None] * 2 * math.pi
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], -1)


def upsample_nearest(x: Array) -> Array:
  b, h, w, c = x.shape
  return jax.image.resize(x, (b, 2 * h, 2 * w, c), 'nearest')


def downsample_avg(x: Array) -> Array:
  return nnx.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nnx.Module):
  """Nearest-neighbour x2, then an optional 3x3 conv."""

  def __init__(self, channels: int, with_conv: bool, *, dtype, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, dtype=dtype, rngs=rngs) if with_conv else None

  def __call__(self, x: Array) -> Array:
    x = upsample_nearest(x)
    return self.conv(x) if self.conv is not None else x


class Downsample(nnx.Module):
  """A stride-2 3x3 conv, or 2x2 average pooling."""

  def __init__(self, channels: int, with_conv: bool, *, dtype, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, stride=2, dtype=dtype, rngs=rngs) if with_conv else None

  def __call__(self, x: Array) -> Array:
    return self.conv(x) if self.conv is not None else downsample_avg(x)


class ResBlock(nnx.Module):
  """Residual block with a time(-and-class) embedding.

  kind='ddpm': the DDPM / DDPM++ block; kind='biggan': the BigGAN block of NCSN++, which can also
  up- or down-sample (nearest / average pooling) inside the block.
  """

  def __init__(self, cin: int, cout: int, temb_dim: int, *, kind: str = 'ddpm', up: bool = False,
               down: bool = False, dropout: float = 0.0, skip_rescale: bool = False, num_groups: int = 32,
               dtype=jnp.float32, rngs: nnx.Rngs):
    if kind not in ('ddpm', 'biggan'):
      raise ValueError(f"unknown resblock_type {kind!r}; choose 'ddpm' or 'biggan'")
    if (up or down) and kind != 'biggan':
      raise ValueError('only BigGAN blocks resample')
    self.up, self.down, self.skip_rescale = up, down, skip_rescale
    self.norm1 = group_norm(cin, num_groups, rngs=rngs)
    self.conv1 = conv(cin, cout, dtype=dtype, rngs=rngs)
    self.temb_proj = dense(temb_dim, cout, dtype=dtype, rngs=rngs)
    self.norm2 = group_norm(cout, num_groups, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)
    self.conv2 = conv(cout, cout, init_scale=0.0, dtype=dtype, rngs=rngs)
    needs_skip = cin != cout or up or down
    self.skip = conv(cin, cout, kernel=1, dtype=dtype, rngs=rngs) if needs_skip else None

  def __call__(self, x: Array, temb: Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> Array:
    dtype = x.dtype
    h = nnx.silu(self.norm1(x)).astype(dtype)
    if self.up:
      h, x = upsample_nearest(h), upsample_nearest(x)
    elif self.down:
      h, x = downsample_avg(h), downsample_avg(x)
    h = self.conv1(h)
    h = h + self.temb_proj(temb)[:, None, None, :]
    h = nnx.silu(self.norm2(h)).astype(h.dtype)
    h = self.dropout(h, deterministic=not train, rngs=rngs)
    h = self.conv2(h)
    if self.skip is not None:
      x = self.skip(x)
    out = x + h
    return out / math.sqrt(2.0) if self.skip_rescale else out


class AttnBlock(nnx.Module):
  """Multi-head self-attention over the H*W positions, through jax.nn.dot_product_attention."""

  def __init__(self, channels: int, *, num_heads: int = 1, skip_rescale: bool = False, num_groups: int = 32,
               dtype=jnp.float32, rngs: nnx.Rngs):
    if channels % num_heads:
      raise ValueError(f'{channels} channels do not split into {num_heads} heads')
    self.num_heads, self.skip_rescale = num_heads, skip_rescale
    self.norm = group_norm(channels, num_groups, rngs=rngs)
    self.q = dense(channels, channels, dtype=dtype, rngs=rngs)
    self.k = dense(channels, channels, dtype=dtype, rngs=rngs)
    self.v = dense(channels, channels, dtype=dtype, rngs=rngs)
    self.out = dense(channels, channels, init_scale=0.0, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    b, hh, ww, c = x.shape
    h = self.norm(x).astype(x.dtype).reshape(b, hh * ww, c)
    split = lambda a: a.reshape(b, hh * ww, self.num_heads, c // self.num_heads)  # [B, T, N, H]
    h = jax.nn.dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
    h = self.out(h.reshape(b, hh * ww, c)).reshape(b, hh, ww, c)
    out = x + h
    return out / math.sqrt(2.0) if self.skip_rescale else out
