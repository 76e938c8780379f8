"""Building blocks of the DDPM++ / NCSN++ U-Net (Ho et al. 2020; Song et al. 2021), in flax.nnx, NHWC.

Initialization follows score_sde: fan-avg uniform variance scaling, and a zero scale for the last layer of
every residual branch so each block starts as the identity.
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from models import resample

Array = jax.Array


class Buffer(nnx.Variable):
  """A fixed, non-trainable array (e.g. random Fourier frequencies): saved, never optimized."""


def default_init(scale: float = 1.0):
  if scale == 0.0:
    return nnx.initializers.zeros
  return nnx.initializers.variance_scaling(scale, 'fan_avg', 'uniform')


def conv(cin: int, cout: int, kernel: int = 3, *, stride: int = 1, init_scale: float = 1.0, dtype=jnp.float32,
         padding: tuple[int, int] | None = None, rngs: nnx.Rngs) -> nnx.Conv:
  pad = padding or (kernel // 2,) * 2  # (before, after); default symmetric, as PyTorch's Conv2d(padding=k // 2)
  return nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=(pad, pad),
                  kernel_init=default_init(init_scale), dtype=dtype, rngs=rngs)


def dense(cin: int, cout: int, *, init_scale: float = 1.0, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(cin, cout, kernel_init=default_init(init_scale), dtype=dtype, rngs=rngs)


_CAST_IN_EACH_CALL = (nnx.Conv, nnx.ConvTranspose, nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Embed)


def cast_params_once(model: nnx.Module) -> nnx.Module:
  """A copy of `model` whose convolution, dense and embedding layers hold their parameters in their compute dtype.

  flax casts them in every call (promote_dtype), which a sampler's loop repeats at every network evaluation: on
  XLA:GPU about 90 conversion kernels per evaluation of the DDPM CIFAR-10 network in bfloat16, which XLA does not
  hoist out of the loop. Cast here once, before the loop, the layers compute the same values. For inference;
  other parameters (GroupNorm's float32 scale and bias) keep their dtype.
  """
  dtypes = {(*path, name): module.dtype for path, module in nnx.iter_graph(model)
            if isinstance(module, _CAST_IN_EACH_CALL) and module.dtype is not None
            for name in ('kernel', 'bias', 'embedding') if isinstance(getattr(module, name, None), nnx.Param)}
  graphdef, state = nnx.split(model)
  cast = lambda path, var: var.replace(var.get_value().astype(dtypes[path])) if path in dtypes else var
  return nnx.merge(graphdef, nnx.map_state(cast, state))


class GroupNorm(nnx.GroupNorm):
  """flax's GroupNorm in float32 (statistics, affine), optionally fused with SiLU; the output has the input's dtype
  unless `dtype` is given.

  On GPUs the backward pass is written out (group_norm_act): autodiff's keeps a float32 copy of the activation's
  gradient between the reductions and the input gradient; the written one recomputes it from the (bf16) input,
  which moves 45 % fewer bytes per layer on XLA:GPU (bench/gpu_program.py). Elsewhere this is flax's module.
  """

  def __init__(self, channels: int, num_groups: int, epsilon: float = 1e-6, *, rngs: nnx.Rngs):
    super().__init__(channels, num_groups=num_groups, epsilon=epsilon, dtype=jnp.float32, rngs=rngs)

  def __call__(self, x: Array, *, silu: bool = False, dtype=None) -> Array:
    if for_xla_gpu():
      y = group_norm_act(x, self.scale[...], self.bias[...], self.num_groups, self.epsilon, silu)
    else:
      y = super().__call__(x)
      y = (nnx.silu(y) if silu else y).astype(x.dtype)
    return y if dtype is None else y.astype(dtype)


def group_norm(channels: int, num_groups: int, *, rngs: nnx.Rngs) -> GroupNorm:
  """The U-Net's GroupNorm: at most num_groups groups of at least 4 channels; eps 1e-6 as in score_sde."""
  return GroupNorm(channels, min(num_groups, channels // 4) or 1, 1e-6, rngs=rngs)


def _grouped(x: Array, groups: int) -> Array:
  """[B, ..., C] -> float32 [B, N, G, C / G]."""
  return x.astype(jnp.float32).reshape(x.shape[0], -1, groups, x.shape[-1] // groups)


def _normalized(xg: Array, mean: Array, rstd: Array, scale: Array, bias: Array) -> tuple[Array, Array]:
  """(z = scale * xhat + bias, xhat) of grouped x [B, N, G, Cg], float32."""
  xhat = (xg - mean) * rstd
  return xhat * scale.reshape(xg.shape[2:]) + bias.reshape(xg.shape[2:]), xhat


def _group_sum(a: Array) -> Array:
  """Sum of [B, N, G, Cg] over positions and each group's channels -> [B, 1, G, 1].

  XLA:GPU splits a reduction over the non-adjacent axes 1 and 3 in two kernels and computes the statistics in a
  third. Summed over positions first and over the group's channels as Cg elementwise adds (up to 32 channels per
  group: the U-Nets have 4 to 16), the channel sum joins the statistics' kernel: one kernel fewer per sum
  (bench/gpu_program.py), and the reduction still reads the layer's input in its own shape, so XLA can still fuse
  it with the producer of that input (a skip connection's concatenation)."""
  if a.shape[3] > 32:
    return jnp.sum(a, axis=(1, 3), keepdims=True)
  # The barrier keeps XLA from moving the slices into the reduction (Cg reductions of slices, chained kernels).
  a = jax.lax.optimization_barrier(jnp.sum(a, axis=1, keepdims=True))  # [B, 1, G, Cg]
  return functools.reduce(jnp.add, [a[..., j:j + 1] for j in range(a.shape[3])])


def _group_norm_fwd(x, scale, bias, groups, eps, silu):
  xg = _grouped(x, groups)
  n = xg.shape[1] * xg.shape[3]
  mean = _group_sum(xg) / n  # [B, 1, G, 1]
  var = jnp.maximum(_group_sum(jnp.square(xg)) / n - jnp.square(mean), 0.0)
  rstd = jax.lax.rsqrt(var + eps)
  z, _ = _normalized(xg, mean, rstd, scale, bias)
  y = z * jax.nn.sigmoid(z) if silu else z
  return y.reshape(x.shape).astype(x.dtype), (x, mean, rstd, scale, bias)


def _group_norm_bwd(groups, eps, silu, residuals, dy):
  del eps
  x, mean, rstd, scale, bias = residuals
  xg, dyg = _grouped(x, groups), _grouped(dy, groups)  # [B, N, G, Cg]
  gamma = scale.reshape(xg.shape[2:])

  # First pass: the per-(image, channel) sums of dz = dL/dz and of dz * xhat. The statistics pass through an
  # optimization barrier so that XLA cannot share this pass's sigmoid(z) with the forward pass's (the same
  # expression), which it would then write out in float32 in the forward pass and read back here.
  mean, rstd = jax.lax.optimization_barrier((mean, rstd))
  z, xhat = _normalized(xg, mean, rstd, scale, bias)
  dz = dyg
  if silu:
    s = jax.nn.sigmoid(z)
    dz = dz * (s * (1 + z * (1 - s)))
  # Both sums as one complex sum: dz then has a single consumer, and XLA:GPU computes it inside the reduction. With
  # two consumers its cost model declines to compute dz twice and writes it to memory in float32 instead (on the H200
  # description, bench/gpu_program.py: 4.4 against 2.4 GB per [512, 32, 32, 384] layer, forward and backward).
  s12 = jnp.sum(dz * jax.lax.complex(jnp.ones_like(xhat), xhat), axis=1)  # [B, G, Cg]
  s1, s2 = jnp.real(s12), jnp.imag(s12)
  n = xg.shape[1] * xg.shape[3]
  m1 = (jnp.sum(s1 * gamma, axis=-1, keepdims=True) / n)[:, None]  # [B, 1, G, 1] group mean of dxhat
  m2 = (jnp.sum(s2 * gamma, axis=-1, keepdims=True) / n)[:, None]  # ... of dxhat * xhat

  # Second pass: the input gradient, with dz and xhat recomputed from x and dy in another (algebraically equal)
  # form, so that XLA cannot share the first pass's values, which it would keep in float32 between the passes.
  a = rstd * gamma  # [B, 1, G, Cg]: z = a x + b
  z = xg * a + (bias.reshape(gamma.shape) - mean * a)
  dz = dyg
  if silu:
    s = jax.nn.sigmoid(z)
    dz = dz * (s + z * s * (1 - s))
  dx = dz * a - rstd * m1 - (xg * rstd - mean * rstd) * (rstd * m2)
  # The parameter gradients sum the per-image sums (the barrier keeps XLA from rewriting this as one reduction
  # over images and positions, which would read a stored float32 dz).
  s1, s2 = jax.lax.optimization_barrier((s1, s2))
  return dx.reshape(x.shape).astype(x.dtype), jnp.sum(s2, axis=0).reshape(-1), jnp.sum(s1, axis=0).reshape(-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm_act(x: Array, scale: Array, bias: Array, groups: int, eps: float, silu: bool) -> Array:
  """GroupNorm of x [B, ..., C] in `groups` groups (float32 statistics, fast variance E[x^2] - E[x]^2 as flax's),
  scale and bias [C], then SiLU if `silu`; in x's dtype. Reverse-mode differentiable through _group_norm_bwd;
  forward mode (jax.jvp) is not defined for it, which is why the likelihood's divergence uses reverse mode."""
  return _group_norm_fwd(x, scale, bias, groups, eps, silu)[0]


group_norm_act.defvjp(_group_norm_fwd, _group_norm_bwd)


def for_xla_gpu() -> bool:
  """Whether to shape the program for XLA:GPU: GroupNorm runs group_norm_act (its written backward pass), which
  saves memory traffic there, ResBlock keeps its embedding add out of the convolution (a cuDNN side input that
  XLA:GPU materializes), and the training step writes convolution kernels' gradients out row-major and pins the
  layout of the state it carries through several steps per call (train/step). The CPU is compute-bound here and
  recomputing costs more than it saves (the README's MNIST model, one training step at batch 32 on 2 cores: 161 ms
  with the written backward pass, 129 ms with flax's GroupNorm), and has no side inputs to avoid."""
  return jax.default_backend() == 'gpu'


@jax.custom_vjp
def _forward_barrier(x: Array) -> Array:
  """An optimization barrier in the forward pass only: the gradient passes as it is, so XLA may still share its
  uses (e.g. one reduction for a convolution's bias gradient and an embedding's)."""
  return jax.lax.optimization_barrier(x)


_forward_barrier.defvjp(lambda x: (jax.lax.optimization_barrier(x), None), lambda _, g: (g,))


ATTENTION = ('xla', 'cudnn', 'pallas')


def check_attention(attention: str) -> str:
  """The attention implementation: 'xla' (any backend), 'cudnn' (jax.nn.dot_product_attention's fused cuDNN flash
  attention: NVIDIA GPUs, bf16 / fp16 compute, heads of at most 128 channels) or 'pallas' (jax's Pallas / Triton
  flash attention, jax.experimental.pallas.ops.gpu.attention: NVIDIA GPUs, any head width, unmasked attention)."""
  if attention not in ATTENTION:
    raise ValueError(f'unknown attention implementation {attention!r}; choose one of {ATTENTION}')
  if attention != 'xla' and jax.default_backend() != 'gpu':
    raise ValueError(f"attention={attention!r} needs an NVIDIA GPU; this backend is {jax.default_backend()!r} "
                     "(use 'xla')")
  return attention


def attention(q: Array, k: Array, v: Array, *, implementation: str, mask: Array | None = None,
              interpret: bool = False) -> Array:
  """Softmax attention of q [B, T, N, H] over k, v [B, S, N, H] (mask [B, 1 | N, T, S] or None) -> [B, T, N, H].

  'pallas' runs the flash kernel (no [T, S] matrix in memory, forward or backward) where it applies: without a
  mask and with T and S multiples of its blocks; masked cross-attention to text stays on XLA. interpret=True runs
  the Pallas kernel in interpreter mode (tests on the CPU)."""
  block = 64  # 64 x 64 tiles: 128 x 128 ones exceed the H100's shared memory for 256-wide heads
  if implementation == 'pallas' and mask is None and q.shape[1] % min(block, q.shape[1]) == 0 \
      and k.shape[1] % min(block, k.shape[1]) == 0:
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention
    bq, bk = min(block, q.shape[1]), min(block, k.shape[1])
    sizes = pallas_attention.BlockSizes(block_q=bq, block_k=bk, block_q_dkv=min(32, bq), block_kv_dkv=min(32, bk),
                                        block_q_dq=min(32, bq), block_kv_dq=min(32, bk))
    return pallas_attention.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, block_sizes=sizes, interpret=interpret)
  return jax.nn.dot_product_attention(q, k, v, mask=mask,
                                      implementation='xla' if implementation == 'pallas' else implementation)


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
  """x2 nearest-neighbour upsampling [B, H, W, C] -> [B, 2H, 2W, C] as a broadcast: its gradient is a 2x2 sum
  that fuses (jax.image.resize's 'nearest' is a gather, whose gradient is a scatter-add: 9 more kernels and 2.3 GB
  more traffic per step of the DDPM CIFAR-10 network at batch 512 on XLA:GPU, bench/gpu_program.py)."""
  b, h, w, c = x.shape
  return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


def downsample_avg(x: Array) -> Array:
  return nnx.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nnx.Module):
  """x2 upsampling, nearest-neighbour then an optional 3x3 conv; with `fir_kernel`, FIR upsampling, fused with the
  conv when there is one (NCSN++). The conv maps channels to out_channels (default: channels)."""

  def __init__(self, channels: int, with_conv: bool, *, out_channels: int | None = None, fir_kernel=None, dtype,
               rngs: nnx.Rngs):
    out_channels = out_channels or channels
    if out_channels != channels and not with_conv:
      raise ValueError('Upsample changes the channels only with a conv')
    self.fir_kernel = tuple(fir_kernel) if fir_kernel else None
    self.conv = conv(channels, out_channels, dtype=dtype, rngs=rngs) if with_conv else None

  def __call__(self, x: Array) -> Array:
    if self.fir_kernel is None:
      x = upsample_nearest(x)
      return self.conv(x) if self.conv is not None else x
    if self.conv is None:
      return resample.upsample_fir(x, self.fir_kernel)
    dt = self.conv.dtype
    return resample.upsample_conv_fir(x.astype(dt), self.conv.kernel[...].astype(dt), self.fir_kernel) + \
        self.conv.bias[...].astype(dt)


class Downsample(nnx.Module):
  """x2 downsampling, a stride-2 3x3 conv or 2x2 average pooling; with `fir_kernel`, FIR downsampling, fused with
  the conv when there is one (NCSN++). The conv maps channels to out_channels (default: channels). Its padding is
  'symmetric' (one pixel on each side) or 'tf' (TensorFlow's SAME at stride 2: one pixel after, none before; Ho et
  al.'s DDPM and its released weights)."""

  def __init__(self, channels: int, with_conv: bool, *, out_channels: int | None = None, fir_kernel=None,
               padding: str = 'symmetric', dtype, rngs: nnx.Rngs):
    out_channels = out_channels or channels
    if out_channels != channels and not with_conv:
      raise ValueError('Downsample changes the channels only with a conv')
    if padding not in ('symmetric', 'tf'):
      raise ValueError(f"unknown downsample padding {padding!r}; choose 'symmetric' or 'tf'")
    self.fir_kernel = tuple(fir_kernel) if fir_kernel else None
    pad = (0, 1) if padding == 'tf' else None
    self.conv = conv(channels, out_channels, stride=1 if fir_kernel else 2, padding=None if fir_kernel else pad,
                     dtype=dtype, rngs=rngs) if with_conv else None

  def __call__(self, x: Array) -> Array:
    if self.fir_kernel is None:
      return self.conv(x) if self.conv is not None else downsample_avg(x)
    if self.conv is None:
      return resample.downsample_fir(x, self.fir_kernel)
    dt = self.conv.dtype
    return resample.conv_downsample_fir(x.astype(dt), self.conv.kernel[...].astype(dt), self.fir_kernel) + \
        self.conv.bias[...].astype(dt)


class ResBlock(nnx.Module):
  """Residual block with a time(-and-class) embedding.

  kind='ddpm': the DDPM / DDPM++ block; kind='biggan': the BigGAN block of NCSN++, which can also
  up- or down-sample inside the block (nearest / average pooling, or FIR with `fir_kernel`).
  """

  def __init__(self, cin: int, cout: int, temb_dim: int, *, kind: str = 'ddpm', up: bool = False,
               down: bool = False, dropout: float = 0.0, skip_rescale: bool = False, num_groups: int = 32,
               fir_kernel=None, dtype=jnp.float32, rngs: nnx.Rngs):
    if kind not in ('ddpm', 'biggan'):
      raise ValueError(f"unknown resblock_type {kind!r}; choose 'ddpm' or 'biggan'")
    if (up or down) and kind != 'biggan':
      raise ValueError('only BigGAN blocks resample')
    self.up, self.down, self.skip_rescale = up, down, skip_rescale
    self.fir_kernel = tuple(fir_kernel) if fir_kernel else None
    self.norm1 = group_norm(cin, num_groups, rngs=rngs)
    self.conv1 = conv(cin, cout, dtype=dtype, rngs=rngs)
    self.temb_proj = dense(temb_dim, cout, dtype=dtype, rngs=rngs)
    self.norm2 = group_norm(cout, num_groups, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)
    self.conv2 = conv(cout, cout, init_scale=0.0, dtype=dtype, rngs=rngs)
    needs_skip = cin != cout or up or down
    self.skip = conv(cin, cout, kernel=1, dtype=dtype, rngs=rngs) if needs_skip else None

  def _resample(self, x: Array) -> Array:
    if self.fir_kernel is None:
      return upsample_nearest(x) if self.up else downsample_avg(x)
    return resample.upsample_fir(x, self.fir_kernel) if self.up else resample.downsample_fir(x, self.fir_kernel)

  def __call__(self, x: Array, temb: Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> Array:
    h = self.norm1(x, silu=True)
    if self.up or self.down:
      h, x = self._resample(h), self._resample(x)
    h = self.conv1(h)
    if for_xla_gpu():
      # XLA:GPU would make the embedding's add the convolution's cuDNN side input, written out broadcast to
      # [B, H, W, C] first (a kernel and 2 x the activation's bytes per block); behind the barrier the add joins
      # norm2's kernels (bench/gpu_program.py).
      h = _forward_barrier(h)
    h = h + self.temb_proj(temb)[:, None, None, :]
    h = self.norm2(h, silu=True)
    h = self.dropout(h, deterministic=not train, rngs=rngs)
    h = self.conv2(h)
    if self.skip is not None:
      x = self.skip(x)
    out = x + h
    return out / math.sqrt(2.0) if self.skip_rescale else out


class AttnBlock(nnx.Module):
  """Multi-head self-attention over the H*W positions (`attention`: XLA, cuDNN or Pallas)."""

  def __init__(self, channels: int, *, num_heads: int = 1, skip_rescale: bool = False, num_groups: int = 32,
               attention: str = 'xla', dtype=jnp.float32, rngs: nnx.Rngs):
    if channels % num_heads:
      raise ValueError(f'{channels} channels do not split into {num_heads} heads')
    self.num_heads, self.skip_rescale, self.attention = num_heads, skip_rescale, check_attention(attention)
    self.norm = group_norm(channels, num_groups, rngs=rngs)
    self.q = dense(channels, channels, dtype=dtype, rngs=rngs)
    self.k = dense(channels, channels, dtype=dtype, rngs=rngs)
    self.v = dense(channels, channels, dtype=dtype, rngs=rngs)
    self.out = dense(channels, channels, init_scale=0.0, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    b, hh, ww, c = x.shape
    h = self.norm(x).reshape(b, hh * ww, c)
    split = lambda a: a.reshape(b, hh * ww, self.num_heads, c // self.num_heads)  # [B, T, N, H]
    h = attention(split(self.q(h)), split(self.k(h)), split(self.v(h)), implementation=self.attention)
    h = self.out(h.reshape(b, hh * ww, c)).reshape(b, hh, ww, c)
    out = x + h
    return out / math.sqrt(2.0) if self.skip_rescale else out


def _heads(x: Array, n: int) -> Array:
  b, t, c = x.shape
  return x.reshape(b, t, n, c // n)  # [B, T, N, H]


class CrossAttention(nnx.Module):
  """Multi-head attention of x [B, T, C] over a context [B, S, D] (itself when context is None); `mask`
  [B, S] (1 = a real token) keeps padding tokens out of the keys."""

  def __init__(self, channels: int, context_dim: int | None = None, *, num_heads: int = 1, attention: str = 'xla',
               dtype=jnp.float32, rngs: nnx.Rngs):
    if channels % num_heads:
      raise ValueError(f'{channels} channels do not split into {num_heads} heads')
    kv = context_dim or channels
    self.num_heads, self.attention = num_heads, check_attention(attention)
    self.q = nnx.Linear(channels, channels, use_bias=False, dtype=dtype, rngs=rngs)
    self.k = nnx.Linear(kv, channels, use_bias=False, dtype=dtype, rngs=rngs)
    self.v = nnx.Linear(kv, channels, use_bias=False, dtype=dtype, rngs=rngs)
    self.out = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array, context: Array | None = None, mask: Array | None = None) -> Array:
    ctx = x if context is None else context.astype(x.dtype)
    attn_mask = None if mask is None else mask.astype(bool)[:, None, None, :]  # [B, 1, T, S] broadcast
    h = attention(_heads(self.q(x), self.num_heads), _heads(self.k(ctx), self.num_heads),
                  _heads(self.v(ctx), self.num_heads), mask=attn_mask, implementation=self.attention)
    return self.out(h.reshape(x.shape))


class GEGLU(nnx.Module):
  """The gated-GELU feed-forward of Stable Diffusion's transformer blocks: (a * gelu(g)) W, 4x inner width."""

  def __init__(self, channels: int, mult: int = 4, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.proj = nnx.Linear(channels, 2 * mult * channels, dtype=dtype, rngs=rngs)
    self.out = nnx.Linear(mult * channels, channels, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    a, g = jnp.split(self.proj(x), 2, axis=-1)
    return self.out(a * jax.nn.gelu(g, approximate=False))


class TransformerBlock(nnx.Module):
  """Pre-LN self-attention, cross-attention to the context, GEGLU feed-forward, each residual."""

  def __init__(self, channels: int, context_dim: int, *, num_heads: int, attention: str = 'xla', dtype=jnp.float32,
               rngs: nnx.Rngs):
    ln = lambda: nnx.LayerNorm(channels, epsilon=1e-5, dtype=jnp.float32, rngs=rngs)
    self.norm1, self.norm2, self.norm3 = ln(), ln(), ln()
    self.attn1 = CrossAttention(channels, num_heads=num_heads, attention=attention, dtype=dtype, rngs=rngs)
    self.attn2 = CrossAttention(channels, context_dim, num_heads=num_heads, attention=attention, dtype=dtype,
                                rngs=rngs)
    self.ff = GEGLU(channels, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array, context: Array, mask: Array | None) -> Array:
    dt = x.dtype
    x = x + self.attn1(self.norm1(x).astype(dt))
    x = x + self.attn2(self.norm2(x).astype(dt), context, mask)
    return x + self.ff(self.norm3(x).astype(dt))


class SpatialTransformer(nnx.Module):
  """Latent diffusion's spatial transformer (Rombach et al. 2022): GroupNorm, a linear projection of the
  H*W positions to tokens, `depth` transformer blocks attending to the text context, a zero-initialized
  projection back, and the residual — so a new block starts as the identity."""

  def __init__(self, channels: int, context_dim: int, *, num_heads: int = 1, depth: int = 1,
               skip_rescale: bool = False, num_groups: int = 32, attention: str = 'xla', dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.skip_rescale = skip_rescale
    self.norm = group_norm(channels, num_groups, rngs=rngs)
    self.proj_in = dense(channels, channels, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([TransformerBlock(channels, context_dim, num_heads=num_heads, attention=attention,
                                             dtype=dtype, rngs=rngs)
                            for _ in range(depth)])
    self.proj_out = dense(channels, channels, init_scale=0.0, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array, context: Array, mask: Array | None = None) -> Array:
    b, hh, ww, c = x.shape
    h = self.proj_in(self.norm(x).reshape(b, hh * ww, c))  # [B, T, C]
    for block in self.blocks:
      h = block(h, context, mask)
    out = x + self.proj_out(h).reshape(b, hh, ww, c)
    return out / math.sqrt(2.0) if self.skip_rescale else out
