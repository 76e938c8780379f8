"""FIR up- and downsampling of NHWC feature maps: StyleGAN2's upfirdn2d, which NCSN++ uses with the [1, 3, 3, 1]
filter (Karras et al. 2020; Song et al. 2021). Nearest / average-pool resampling is in models/layers.py.

The FIR forms follow score_sde's up_or_down_sampling: a separable filter normalized to unit sum (times factor^2
when upsampling, so a constant image keeps its value), zeros outside the image, and fused "upsample then conv" /
"conv then downsample" forms that pad once. The filter runs as sums of shifted slices, which XLA fuses.
"""

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
_DIMS = ('NHWC', 'HWIO', 'NHWC')


def fir_taps(kernel, gain: float = 1.0) -> np.ndarray:
  """The 1-D taps of a separable FIR kernel, normalized so that the 2-D filter (their outer product) sums to `gain`."""
  k = np.asarray(kernel, np.float64)
  if k.ndim != 1 or len(k) < 1 or k.sum() == 0:
    raise ValueError(f'an FIR kernel is a 1-D separable kernel with a non-zero sum, got {kernel!r}')
  return k / k.sum() * np.sqrt(gain)


def _down_1d(x: Array, taps: np.ndarray, axis: int, down: int, pad: tuple[int, int]) -> Array:
  """upfirdn along one axis without upsampling: pad, then a sum of K strided slices."""
  x = jnp.pad(x, [(0, 0)] * axis + [pad] + [(0, 0)] * (x.ndim - axis - 1))
  flipped = taps[::-1]  # convolution = correlation with the flipped filter
  length = (x.shape[axis] - len(taps)) // down + 1
  return sum(float(flipped[i]) * jax.lax.slice_in_dim(x, i, i + (length - 1) * down + 1, down, axis)
             for i in range(len(taps)))


def _phases(n: int, taps: np.ndarray, up: int, pad: tuple[int, int]):
  """Polyphase form of upsampling one axis of length n: (outputs per phase m, pad (lo, hi) of the input, and for
  each of the `up` phases its (weight, input offset) taps). Output sample up * j + p is the sum over phase p's taps
  of weight * padded_input[j + offset]: the taps that would land on inserted zeros are left out."""
  flipped = taps[::-1]
  out_len = n * up + pad[0] + pad[1] - len(taps) + 1
  m = -(-out_len // up)
  phases = [[(float(flipped[i]), (p + i - pad[0]) // up) for i in range(len(taps)) if (p + i - pad[0]) % up == 0]
            for p in range(up)]
  shifts = [s for phase in phases for _, s in phase]
  lo, hi = max(0, -min(shifts)), max(0, m - 1 + max(shifts) - (n - 1))
  return out_len, m, (lo, hi), [[(w, s + lo) for w, s in phase] for phase in phases]


def upfirdn(x: Array, taps: np.ndarray, *, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)) -> Array:
  """StyleGAN2's upfirdn2d on [B, H, W, C] with the separable filter outer(taps, taps): insert up - 1 zeros after
  every sample, pad (before, after) zeros, convolve, keep every down-th sample. Output side
  (H * up + sum(pad) - K) // down + 1.

  It runs as sums of shifted slices, elementwise work that XLA fuses (a depthwise convolution is 10-30x slower on
  XLA:CPU): downsampling along H, then W; upsampling in polyphase form, the up^2 output phases computed at the input
  resolution from the taps that meet input samples and interleaved once, so no zeros are inserted."""
  if min(pad) < 0:
    raise ValueError(f'upfirdn pads with zeros; got {pad}')
  if up == 1:
    return _down_1d(_down_1d(x, taps, 1, down, pad), taps, 2, down, pad)
  if down != 1:
    raise ValueError('upfirdn upsamples or downsamples, not both')
  b, h, w, c = x.shape
  len_h, m_h, pad_h, phases_h = _phases(h, taps, up, pad)
  len_w, m_w, pad_w, phases_w = _phases(w, taps, up, pad)
  x = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
  rows = []
  for phase_h in phases_h:
    row = []
    for phase_w in phases_w:
      row.append(sum(wh * ww * x[:, sh:sh + m_h, sw:sw + m_w] for wh, sh in phase_h for ww, sw in phase_w))
    rows.append(jnp.stack(row, axis=3))  # [B, m_h, m_w, up, C]
  y = jnp.stack(rows, axis=2).reshape(b, m_h * up, m_w * up, c)  # [B, m_h, up, m_w, up, C] interleaved
  return y[:, :len_h, :len_w]


def upsample_fir(x: Array, kernel, factor: int = 2) -> Array:
  """FIR upsampling [B, H, W, C] -> [B, factor H, factor W, C] (score_sde's upsample_2d)."""
  k = fir_taps(kernel, factor ** 2)
  p = k.shape[0] - factor
  return upfirdn(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_fir(x: Array, kernel, factor: int = 2) -> Array:
  """FIR downsampling [B, H, W, C] -> [B, H / factor, W / factor, C] (score_sde's downsample_2d)."""
  k = fir_taps(kernel)
  p = k.shape[0] - factor
  return upfirdn(x, k, down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_fir(x: Array, w: Array, kernel, factor: int = 2) -> Array:
  """FIR upsampling fused with a conv of w [k, k, Cin, Cout] (k odd): [B, H, W, Cin] -> [B, 2H, 2W, Cout].

  score_sde's upsample_conv_2d (StyleGAN2's fused op) runs a transposed conv of stride `factor`, then the filter,
  padded once so that no border sample is lost. The same numbers come from the filter padded by (k - 1) / 2 more on
  each side, then a VALID conv: a plain convolution, where the transposed one (a dilated input) is 3x slower on
  XLA:CPU. tests/test_ncsnpp.py checks the two forms against each other and against diffusers."""
  conv_k = w.shape[0]
  k = fir_taps(kernel, factor ** 2)
  p, c = k.shape[0] - factor, (conv_k - 1) // 2
  x = upfirdn(x, k, up=factor, pad=((p + 1) // 2 + factor - 1 + c, p // 2 + c))
  return jax.lax.conv_general_dilated(x, w, (1, 1), 'VALID', dimension_numbers=_DIMS)


def conv_downsample_fir(x: Array, w: Array, kernel, factor: int = 2) -> Array:
  """FIR downsampling fused with a conv of w [k, k, Cin, Cout]: [B, H, W, Cin] -> [B, H/2, W/2, Cout] (score_sde's
  conv_downsample_2d): the filter, padded once, then a conv of stride `factor`."""
  conv_k = w.shape[0]
  k = fir_taps(kernel)
  p = (k.shape[0] - factor) + (conv_k - 1)
  x = upfirdn(x, k, pad=((p + 1) // 2, p // 2))
  return jax.lax.conv_general_dilated(x, w, (factor, factor), 'VALID', dimension_numbers=_DIMS)
