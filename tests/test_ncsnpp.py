"""NCSN++: FIR resampling, the progressive input / output paths and attention once per up level, against diffusers'
NCSN++ port (tests/fixtures/ncsnpp.npz, from tests/fixtures/make_ncsnpp_fixtures.py) and scipy's upfirdn."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal
from flax import nnx

from models import layers, resample, unet_weights
from models.unet import UNet, UNetConfig
from tests.fixtures.make_ncsnpp_fixtures import weight

FIXTURE = np.load(os.path.join(os.path.dirname(__file__), 'fixtures', 'ncsnpp.npz'))
FIR = (1, 3, 3, 1)

# diffusers' NETWORK of the fixture script, as a UNetConfig.
NCSNPP = UNetConfig(image_size=16, in_channels=3, nf=16, ch_mult=(1, 2, 8), num_res_blocks=1, attn_resolutions=(4,),
                    dropout=0.0, resblock_type='biggan', skip_rescale=True, embedding_type='fourier',
                    fourier_scale=16.0, fir=True, fir_kernel=FIR, progressive='output_skip',
                    progressive_input='input_skip', progressive_combine='sum', up_attention='once')


def _scipy_fir(x: np.ndarray, up: int, down: int, gain: float, pad0: int, size: tuple[int, int]) -> np.ndarray:
  """upfirdn2d from scipy's 1-D upfirdn along H and W: scipy convolves in full, so upfirdn2d's output sample o is
  full-convolution sample o * down + K - 1 - pad0."""
  k = np.array(FIR, np.float64) / sum(FIR) * math.sqrt(gain)
  y = scipy.signal.upfirdn(k, scipy.signal.upfirdn(k, x.astype(np.float64), up=up, axis=1), up=up, axis=2)
  start = len(FIR) - 1 - pad0
  return y[:, start::down, start::down][:, :size[0], :size[1]]


def test_fir_resampling_matches_scipy_and_diffusers():
  x = FIXTURE['fir_x']  # [2, 8, 6, 3]
  up, down = resample.upsample_fir(jnp.asarray(x), FIR), resample.downsample_fir(jnp.asarray(x), FIR)
  assert up.shape == (2, 16, 12, 3) and down.shape == (2, 4, 3, 3)
  np.testing.assert_allclose(up, _scipy_fir(x, 2, 1, 4.0, 2, (16, 12)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(down, _scipy_fir(x, 1, 2, 1.0, 1, (4, 3)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(up, FIXTURE['fir_up'], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(down, FIXTURE['fir_down'], rtol=1e-5, atol=1e-5)
  for key, fn in (('up_conv', resample.upsample_conv_fir), ('down_conv', resample.conv_downsample_fir)):
    y = fn(jnp.asarray(x), jnp.asarray(FIXTURE[f'fir_{key}_kernel']), FIR) + FIXTURE[f'fir_{key}_bias']
    np.testing.assert_allclose(y, FIXTURE[f'fir_{key}'], rtol=1e-5, atol=1e-5)
  # a constant image keeps its value away from the zero-padded border
  ones = jnp.ones((1, 8, 8, 1))
  np.testing.assert_allclose(resample.upsample_fir(ones, FIR)[0, 2:-2, 2:-2], 1.0, rtol=1e-6)
  np.testing.assert_allclose(resample.downsample_fir(ones, FIR)[0, 1:-1, 1:-1], 1.0, rtol=1e-6)


@pytest.mark.parametrize('kernel', [(1, 1), (1, 2, 1), (1, 3, 3, 1), (1, 4, 6, 4, 1)])
@pytest.mark.parametrize('conv_k', [1, 3])
def test_fused_fir_conv_equals_stylegan2_forms(kernel, conv_k):
  """upsample_conv_fir (the filter with a wider pad, then a VALID conv) equals StyleGAN2's fused op, written here as
  score_sde writes it: a stride-2 transposed conv, then the filter padded ((p + 1) // 2 + 1, p // 2 + 1) with
  p = K - 2 - (k - 1); conv_downsample_fir equals the filter padded ((p + 1) // 2, p // 2) with p = K - 2 + k - 1,
  then a stride-2 conv."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 6, 3))
  w = jax.random.normal(jax.random.key(1), (conv_k, conv_k, 3, 4))
  dims = ('NHWC', 'HWIO', 'NHWC')
  taps = np.asarray(kernel, np.float64) / sum(kernel)
  p = len(kernel) - 2 - (conv_k - 1)
  if min((p + 1) // 2 + 1, p // 2 + 1) >= 0:
    t = jax.lax.conv_general_dilated(x, w, (1, 1), ((conv_k - 1, conv_k - 1),) * 2, lhs_dilation=(2, 2),
                                     dimension_numbers=dims)
    ref = _filter(t, taps * 2, ((p + 1) // 2 + 1, p // 2 + 1))
    np.testing.assert_allclose(resample.upsample_conv_fir(x, w, kernel), ref, rtol=1e-5, atol=1e-5)
  p = len(kernel) - 2 + conv_k - 1
  ref = jax.lax.conv_general_dilated(_filter(x, taps, ((p + 1) // 2, p // 2)), w, (2, 2), 'VALID',
                                     dimension_numbers=dims)
  np.testing.assert_allclose(resample.conv_downsample_fir(x, w, kernel), ref, rtol=1e-5, atol=1e-5)


def _filter(x, taps, pad):
  """[B, H, W, C] zero-padded by pad on H and W, then convolved (VALID) with outer(taps, taps), with numpy."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), pad, pad, (0, 0)))
  k = np.outer(taps, taps)[::-1, ::-1]
  K = len(taps)
  out = np.zeros((x.shape[0], x.shape[1] - K + 1, x.shape[2] - K + 1, x.shape[3]))
  for i in range(K):
    for j in range(K):
      out += k[i, j] * x[:, i:i + out.shape[1], j:j + out.shape[2]]
  return out


def test_fir_layers_take_the_fused_path_and_change_channels():
  rngs = nnx.Rngs(0)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  up = layers.Upsample(4, True, out_channels=6, fir_kernel=FIR, dtype=jnp.float32, rngs=rngs)
  down = layers.Downsample(4, True, out_channels=6, fir_kernel=FIR, dtype=jnp.float32, rngs=rngs)
  np.testing.assert_allclose(up(x), resample.upsample_conv_fir(x, up.conv.kernel[...], FIR) + up.conv.bias[...],
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(down(x), resample.conv_downsample_fir(x, down.conv.kernel[...], FIR)
                             + down.conv.bias[...], rtol=1e-6, atol=1e-6)
  assert up(x).shape == (2, 16, 16, 6) and down(x).shape == (2, 4, 4, 6)
  with pytest.raises(ValueError, match='only with a conv'):
    layers.Downsample(4, False, out_channels=6, fir_kernel=FIR, dtype=jnp.float32, rngs=rngs)


def _load_fixture_weights(model: UNet, cfg: UNetConfig) -> None:
  """Sets every parameter to the fixture's diffusers tensor (weight(name, shape)) through models/unet_weights'
  name map and layout change (not its NCSN++ output negation: this test compares with diffusers' score output)."""
  shapes = json.loads(str(FIXTURE['tensors']))
  tensors = {name: weight(name, tuple(shape)) for name, shape in shapes.items()}
  names = unet_weights.module_names(dataclasses.asdict(cfg), 'ncsnpp')
  used = set()
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name = unet_weights.diffusers_name(path, names, tensors)
    var[...] = jnp.asarray(unet_weights.to_ours(name, tensors[name], var.shape))
    used.add(name)
  model.fourier.w[...] = jnp.asarray(tensors['time_proj.weight'])
  assert used | {'time_proj.weight'} == set(tensors)


def test_ncsnpp_matches_diffusers():
  """score_sde's NCSN++ layout (BigGAN blocks with FIR resampling, Fourier features of log sigma, input_skip and
  output_skip pyramids, attention once per up level, skip rescaling) equals diffusers' port in parameter count and
  output, the output divided by sigma as diffusers does."""
  model = UNet(NCSNPP, rngs=nnx.Rngs(0))
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == int(FIXTURE['num_params']), (n, int(FIXTURE['num_params']))
  _load_fixture_weights(model, NCSNPP)
  sigma = jnp.asarray(FIXTURE['sigma'])
  out = nnx.jit(lambda m, x, c: m(x, c))(model, jnp.asarray(FIXTURE['x']), jnp.log(sigma)) / sigma[:, None, None, None]
  ref = FIXTURE['out']
  for i in range(len(ref)):
    scale = np.abs(ref[i]).max()
    np.testing.assert_allclose(np.asarray(out[i]) / scale, ref[i] / scale, rtol=2e-5, atol=2e-5)


def test_up_attention_once_per_level():
  def attention_blocks(cfg):
    model = nnx.eval_shape(lambda: UNet(cfg, rngs=nnx.Rngs(0)))
    return sum(isinstance(layer, layers.AttnBlock) for block in model.up for layer in block)

  cfg = UNetConfig(image_size=16, nf=16, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(8,), num_groups=4)
  assert attention_blocks(cfg) == 3
  assert attention_blocks(UNetConfig(**{**cfg.__dict__, 'up_attention': 'once'})) == 1


@pytest.mark.parametrize('options', [
    dict(resblock_type='biggan', progressive='none', progressive_input='residual'),  # score_sde's CIFAR-10 NCSN++
    dict(resblock_type='ddpm', progressive='residual', progressive_input='residual'),
    dict(resblock_type='biggan', progressive='residual', progressive_input='input_skip', progressive_combine='cat'),
    dict(resblock_type='ddpm', resamp_with_conv=False, progressive='output_skip', progressive_input='input_skip'),
])
def test_progressive_paths_train(options):
  """Every progressive combination builds, keeps the image shape, and has a finite gradient for every parameter;
  the input pyramid is used (the output depends on it through more than conv_in)."""
  cfg = UNetConfig(image_size=16, in_channels=3, nf=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
                   num_groups=4, dropout=0.0, fir=True, skip_rescale=True, up_attention='once', **options)
  model = UNet(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  noise = lambda p: np.float32(0.05) * np.random.default_rng(p.size).standard_normal(p.shape, np.float32)
  params = jax.tree.map(lambda p: p + noise(p), params)  # numpy draws: no random kernel compiled per shape
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))

  def loss(params):
    return jnp.mean(nnx.merge(graphdef, params, rest)(x, jnp.array([0.3, 0.7])) ** 2)

  value, grads = jax.jit(jax.value_and_grad(loss))(params)  # one program: op by op, this compiles ~900 kernels
  assert np.isfinite(float(value))
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(np.asarray(g)))
  pyramid_grads = [np.asarray(g[...]) for path, g in nnx.to_flat_state(grads) if path[0] == 'input_pyramid']
  assert pyramid_grads and all(np.abs(g).max() > 0 for g in pyramid_grads)


def test_unknown_progressive_options_are_rejected():
  for key, value in (('progressive', 'skip'), ('progressive_input', 'output_skip'), ('progressive_combine', 'add'),
                     ('up_attention', 'last')):
    with pytest.raises(ValueError, match=f'unknown {key}'):
      UNet(UNetConfig(image_size=16, nf=16, ch_mult=(1, 2), num_res_blocks=1, **{key: value}), rngs=nnx.Rngs(0))
