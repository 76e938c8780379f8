"""The KL autoencoder of latent diffusion (Rombach et al. 2022), flax.nnx, NHWC.

The module tree mirrors diffusers' AutoencoderKL attribute for attribute (encoder.down_blocks.0.resnets.0.conv1,
...mid_block.attentions.0.to_q, quant_conv, ...), so Stable Diffusion's VAE weights and the weights this project
trains convert to each other by renaming and transposing alone (models/vae_weights.py). The downsampling factor is
2^(len(block_out_channels) - 1): three levels give f = 4, four give Stable Diffusion's f = 8.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from models import layers

Array = jax.Array
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  in_channels: int = 3
  out_channels: int | None = None  # defaults to in_channels
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # one level each; f = 2^(levels - 1)
  layers_per_block: int = 2  # residual blocks per encoder level (the decoder has one more)
  latent_channels: int = 4
  norm_num_groups: int = 32
  mid_attention: bool = True  # self-attention in the middle blocks
  use_quant_conv: bool = True  # 1x1 convs on the moments / before decoding (SD has both)
  use_post_quant_conv: bool = True
  dropout: float = 0.0
  dtype: str = 'float32'  # compute dtype; parameters and normalization stay float32

  @property
  def factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


def _conv(cin: int, cout: int, kernel: int = 3, *, dtype, rngs: nnx.Rngs, padding=None, stride: int = 1) -> nnx.Conv:
  pad = kernel // 2 if padding is None else padding
  return nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                  kernel_init=layers.default_init(), dtype=dtype, rngs=rngs)


def _norm(channels: int, groups: int, *, rngs: nnx.Rngs) -> layers.GroupNorm:
  """GroupNorm with exactly `groups` groups and eps 1e-6 (diffusers' VAE), computed in float32."""
  if channels % groups:
    raise ValueError(f'{channels} channels do not split into norm_num_groups={groups} groups')
  return layers.GroupNorm(channels, groups, 1e-6, rngs=rngs)


class ResnetBlock(nnx.Module):
  """norm-SiLU-conv twice, plus the input (through a 1x1 conv when the width changes); no time embedding."""

  def __init__(self, cin: int, cout: int, *, groups: int, dropout: float, dtype, rngs: nnx.Rngs):
    self.norm1 = _norm(cin, groups, rngs=rngs)
    self.conv1 = _conv(cin, cout, dtype=dtype, rngs=rngs)
    self.norm2 = _norm(cout, groups, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)
    self.conv2 = _conv(cout, cout, dtype=dtype, rngs=rngs)
    self.conv_shortcut = _conv(cin, cout, 1, dtype=dtype, rngs=rngs) if cin != cout else None

  def __call__(self, x: Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> Array:
    dt = x.dtype
    h = self.conv1(self.norm1(x, silu=True, dtype=dt))
    h = self.dropout(self.norm2(h, silu=True, dtype=dt), deterministic=not train, rngs=rngs)
    h = self.conv2(h)
    return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class Attention(nnx.Module):
  """Single-head self-attention over the H*W positions with a residual connection."""

  def __init__(self, channels: int, *, groups: int, dtype, rngs: nnx.Rngs):
    dense = lambda: nnx.Linear(channels, channels, kernel_init=layers.default_init(), dtype=dtype, rngs=rngs)
    self.group_norm = _norm(channels, groups, rngs=rngs)
    self.to_q, self.to_k, self.to_v = dense(), dense(), dense()
    self.to_out = nnx.List([dense()])

  def __call__(self, x: Array) -> Array:
    b, hh, ww, c = x.shape
    h = self.group_norm(x).reshape(b, hh * ww, 1, c)  # [B, T, heads=1, C]
    h = jax.nn.dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))
    return x + self.to_out[0](h).reshape(b, hh, ww, c)


class MidBlock(nnx.Module):
  def __init__(self, channels: int, *, attention: bool, groups: int, dropout: float, dtype, rngs: nnx.Rngs):
    kw = dict(groups=groups, dropout=dropout, dtype=dtype, rngs=rngs)
    self.resnets = nnx.List([ResnetBlock(channels, channels, **kw), ResnetBlock(channels, channels, **kw)])
    self.attentions = nnx.List([Attention(channels, groups=groups, dtype=dtype, rngs=rngs)] if attention else [])

  def __call__(self, x: Array, *, train: bool, rngs) -> Array:
    x = self.resnets[0](x, train=train, rngs=rngs)
    for attn in self.attentions:
      x = attn(x)
    return self.resnets[1](x, train=train, rngs=rngs)


class Downsample(nnx.Module):
  """Pad one pixel at the bottom and right, then a stride-2 3x3 conv (the LDM / diffusers VAE convention)."""

  def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, padding=0, stride=2, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
  def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.conv(layers.upsample_nearest(x))


class Level(nnx.Module):
  """One resolution of the encoder (resnets, then `downsamplers`) or decoder (resnets, then `upsamplers`)."""

  def __init__(self, cin: int, cout: int, num_resnets: int, resample: type | None, *, groups: int, dropout: float,
               dtype, rngs: nnx.Rngs):
    kw = dict(groups=groups, dropout=dropout, dtype=dtype, rngs=rngs)
    self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, **kw) for i in range(num_resnets)])
    resamplers = nnx.List([resample(cout, dtype=dtype, rngs=rngs)] if resample is not None else [])
    if resample is Upsample:
      self.upsamplers = resamplers
    else:
      self.downsamplers = resamplers

  def __call__(self, x: Array, *, train: bool, rngs) -> Array:
    for block in self.resnets:
      x = block(x, train=train, rngs=rngs)
    for resample in getattr(self, 'downsamplers', None) or getattr(self, 'upsamplers', None) or []:
      x = resample(x)
    return x


class Encoder(nnx.Module):
  """Image [B, H, W, C] -> moments [B, H/f, W/f, 2 * latent_channels] (mean, then log-variance)."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    dt, ch = DTYPES[cfg.dtype], cfg.block_out_channels
    kw = dict(groups=cfg.norm_num_groups, dropout=cfg.dropout, dtype=dt, rngs=rngs)
    self.conv_in = _conv(cfg.in_channels, ch[0], dtype=dt, rngs=rngs)
    self.down_blocks = nnx.List([
        Level(ch[max(i - 1, 0)], c, cfg.layers_per_block, Downsample if i < len(ch) - 1 else None, **kw)
        for i, c in enumerate(ch)])
    self.mid_block = MidBlock(ch[-1], attention=cfg.mid_attention, **kw)
    self.conv_norm_out = _norm(ch[-1], cfg.norm_num_groups, rngs=rngs)
    self.conv_out = _conv(ch[-1], 2 * cfg.latent_channels, dtype=dt, rngs=rngs)

  def __call__(self, x: Array, *, train: bool = False, rngs=None) -> Array:
    h = self.conv_in(x)
    for level in self.down_blocks:
      h = level(h, train=train, rngs=rngs)
    h = self.mid_block(h, train=train, rngs=rngs)
    return self.conv_out(self.conv_norm_out(h, silu=True))


class Decoder(nnx.Module):
  """Latent [B, h, w, latent_channels] -> image [B, f h, f w, out_channels]."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    dt, ch = DTYPES[cfg.dtype], tuple(reversed(cfg.block_out_channels))
    kw = dict(groups=cfg.norm_num_groups, dropout=cfg.dropout, dtype=dt, rngs=rngs)
    self.conv_in = _conv(cfg.latent_channels, ch[0], dtype=dt, rngs=rngs)
    self.mid_block = MidBlock(ch[0], attention=cfg.mid_attention, **kw)
    self.up_blocks = nnx.List([
        Level(ch[max(i - 1, 0)], c, cfg.layers_per_block + 1, Upsample if i < len(ch) - 1 else None, **kw)
        for i, c in enumerate(ch)])
    self.conv_norm_out = _norm(ch[-1], cfg.norm_num_groups, rngs=rngs)
    self.conv_out = _conv(ch[-1], cfg.out_channels or cfg.in_channels, dtype=dt, rngs=rngs)

  def features(self, z: Array, *, train: bool = False, rngs=None) -> Array:
    """The activations entering conv_out (the adaptive GAN weight differentiates through conv_out alone)."""
    h = self.mid_block(self.conv_in(z), train=train, rngs=rngs)
    for level in self.up_blocks:
      h = level(h, train=train, rngs=rngs)
    return self.conv_norm_out(h, silu=True)

  def __call__(self, z: Array, *, train: bool = False, rngs=None) -> Array:
    return self.conv_out(self.features(z, train=train, rngs=rngs))


class AutoencoderKL(nnx.Module):
  """encode: image -> (mean, logvar) of q(z | x); decode: z -> image. Images in the model range ([-1, 1]).

  `scaling_factor` and `shift_factor` (buffers, saved with the weights) map posterior samples to the unit-scale
  latents diffusion runs on: z_diffusion = (z - shift) * scale.
  """

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    if cfg.dtype not in DTYPES:
      raise ValueError(f'unknown model dtype {cfg.dtype!r}; choose one of {sorted(DTYPES)}')
    self.cfg = cfg
    dt, zc = DTYPES[cfg.dtype], cfg.latent_channels
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)
    self.quant_conv = _conv(2 * zc, 2 * zc, 1, dtype=dt, rngs=rngs) if cfg.use_quant_conv else None
    self.post_quant_conv = _conv(zc, zc, 1, dtype=dt, rngs=rngs) if cfg.use_post_quant_conv else None
    self.scaling_factor = layers.Buffer(jnp.ones((), jnp.float32))
    self.shift_factor = layers.Buffer(jnp.zeros((), jnp.float32))

  def encode(self, x: Array, *, train: bool = False, rngs=None) -> tuple[Array, Array]:
    """(mean, logvar) [B, h, w, latent_channels], float32; logvar clamped to [-30, 20] as in LDM."""
    moments = self.encoder(x.astype(DTYPES[self.cfg.dtype]), train=train, rngs=rngs)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: Array, *, train: bool = False, rngs=None) -> Array:
    z = z.astype(DTYPES[self.cfg.dtype])
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z, train=train, rngs=rngs).astype(jnp.float32)

  def __call__(self, x: Array, rng: Array | None = None, *, train: bool = False, rngs=None):
    """(reconstruction, mean, logvar); with rng the decoder sees a posterior sample, else the mean."""
    mean, logvar = self.encode(x, train=train, rngs=rngs)
    z = mean if rng is None else sample_posterior(rng, mean, logvar)
    return self.decode(z, train=train, rngs=rngs), mean, logvar

  def to_latent(self, z: Array) -> Array:
    return (z - self.shift_factor[...]) * self.scaling_factor[...]

  def from_latent(self, z: Array) -> Array:
    return z / self.scaling_factor[...] + self.shift_factor[...]


def sample_posterior(rng: Array, mean: Array, logvar: Array) -> Array:
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def kl_to_standard_normal(mean: Array, logvar: Array) -> Array:
  """KL(N(mean, exp(logvar)) || N(0, I)) per example [B], summed over latent dimensions."""
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return kl.reshape(kl.shape[0], -1).sum(-1)


class PatchDiscriminator(nnx.Module):
  """PatchGAN discriminator (pix2pix; LDM's NLayerDiscriminator): one real/fake logit per receptive-field patch.

  GroupNorm replaces BatchNorm so the discriminator is a pure function of its parameters: no running statistics
  are shared between the generator's and the discriminator's passes.
  """

  def __init__(self, in_channels: int, nf: int = 64, num_layers: int = 3, *, rngs: nnx.Rngs):
    conv = lambda cin, cout, stride, bias=True: nnx.Conv(
        cin, cout, (4, 4), strides=stride, padding=((1, 1), (1, 1)), use_bias=bias,
        kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.convs = nnx.List([conv(in_channels, nf, 2)])
    self.norms = nnx.List([])
    ch = nf
    for i in range(1, num_layers + 1):
      out = nf * min(2 ** i, 8)
      self.convs.append(conv(ch, out, 2 if i < num_layers else 1, bias=False))
      self.norms.append(nnx.GroupNorm(out, num_groups=min(32, out // 4), epsilon=1e-5, rngs=rngs))
      ch = out
    self.convs.append(conv(ch, 1, 1))

  def __call__(self, x: Array) -> Array:
    h = nnx.leaky_relu(self.convs[0](x), 0.2)
    for conv, norm in zip(self.convs[1:-1], self.norms):
      h = nnx.leaky_relu(norm(conv(h)), 0.2)
    return self.convs[-1](h)  # [B, h, w, 1]


@dataclasses.dataclass(frozen=True)
class VAETrainerConfig:
  """The trained module of --config.model.name=vae: the autoencoder and, with a GAN loss, its discriminator."""
  vae: VAEConfig = VAEConfig()
  disc_nf: int = 64
  disc_layers: int = 0  # 0: no discriminator


class VAEWithDiscriminator(nnx.Module):
  """Holds the autoencoder (`vae`) and the optional patch discriminator (`disc`) as one parameter tree."""

  def __init__(self, cfg: VAETrainerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.vae = AutoencoderKL(cfg.vae, rngs=rngs)
    out = cfg.vae.out_channels or cfg.vae.in_channels
    self.disc = PatchDiscriminator(out, cfg.disc_nf, cfg.disc_layers, rngs=rngs) if cfg.disc_layers > 0 else None


def psnr(x: Array, y: Array, data_range: float = 255.0) -> Array:
  """Peak signal-to-noise ratio in dB per image [B]."""
  mse = jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)).reshape(x.shape[0], -1), -1)
  return 10.0 * jnp.log10(data_range ** 2 / jnp.maximum(mse, 1e-12))

