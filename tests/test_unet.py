"""The DDPM++ / NCSN++ U-Net: parameter count of the DDPM configuration, shapes, dtypes, attention."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import build_model, layers
from models.unet import UNet, UNetConfig

TINY = dict(image_size=16, in_channels=3, nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
            num_groups=4, dropout=0.1)


def _count(module) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_ddpm_cifar10_parameter_count():
  """Ho et al.'s CIFAR-10 network: diffusers' UNet2DModel in this configuration has 35,746,307 parameters."""
  abstract = nnx.eval_shape(lambda: UNet(UNetConfig(), rngs=nnx.Rngs(0)))
  n = _count(abstract)
  assert abs(n - 35_746_307) / 35_746_307 < 0.01, n


@pytest.mark.parametrize('options', [
    dict(resblock_type='ddpm', embedding_type='positional'),
    dict(resblock_type='biggan', skip_rescale=True, embedding_type='fourier', num_classes=10),
    dict(resblock_type='ddpm', resamp_with_conv=False, num_heads=2, dtype='bfloat16'),
])
def test_output_shape_dtype_and_conditioning(options):
  cfg = UNetConfig(**{**TINY, **options})
  model = UNet(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params)), 'parameters stay float32'
  # perturb the zero-initialized output layers so the network is not the zero function
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape), params)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  labels = jnp.array([1, 2]) if cfg.num_classes else None

  @jax.jit
  def apply(params, x, t, labels):
    return nnx.merge(graphdef, params, rest)(x, t, labels)

  y = apply(params, x, jnp.array([0.1, 5.0]), labels)
  assert y.shape == x.shape
  assert y.dtype == (jnp.bfloat16 if cfg.dtype == 'bfloat16' else jnp.float32)
  assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
  # the output depends on the noise level (and on the label when class-conditional)
  y2 = apply(params, x, jnp.array([3.0, 5.0]), labels)
  assert float(jnp.abs(y2[0] - y[0]).max()) > 1e-3
  np.testing.assert_allclose(np.asarray(y2[1], np.float32), np.asarray(y[1], np.float32), rtol=1e-5, atol=1e-5)
  if cfg.num_classes:
    y3 = apply(params, x, jnp.array([0.1, 5.0]), jnp.array([7, 2]))
    assert float(jnp.abs(y3[0] - y[0]).max()) > 1e-3


@pytest.mark.parametrize('resblock_type', ['ddpm', 'biggan'])
def test_program_shaped_for_xla_gpu_computes_the_same_function(resblock_type, monkeypatch):
  """The U-Net as shaped for XLA:GPU (layers.for_xla_gpu: GroupNorm's written backward pass and statistics,
  ResBlock's barrier before the embedding add) gives the CPU program's outputs and parameter gradients, in float32;
  the barriers are in its program and not in the CPU's."""
  model = UNet(UNetConfig(**{**TINY, 'dropout': 0.0, 'resblock_type': resblock_type}), rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape), params)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  t = jnp.array([0.3, 4.0])
  results = {}
  for gpu in (False, True):
    monkeypatch.setattr(layers, 'for_xla_gpu', lambda gpu=gpu: gpu)
    loss = lambda params: jnp.sum(nnx.merge(graphdef, params, rest)(x, t) ** 2)  # new each time: traced again
    results[gpu] = jax.jit(jax.value_and_grad(loss))(params), str(jax.make_jaxpr(loss)(params))
  (value, grads), text = results[True]
  (value_ref, grads_ref), text_ref = results[False]
  np.testing.assert_allclose(value, value_ref, rtol=1e-5)
  # one scale for all leaves: the attention's key bias has an exactly zero gradient (softmax ignores a shift shared
  # by all keys), so its own scale is float noise
  scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(grads_ref))
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(a / scale, b / scale, rtol=1e-5, atol=1e-5)
  assert text.count('optimization_barrier') >= 2 * TINY['num_res_blocks'] and 'optimization_barrier' not in text_ref


def test_cast_params_once_keeps_the_outputs_and_casts_only_the_layers_that_cast():
  """A bfloat16 class-conditional network with its conv / dense / embedding parameters cast once
  (layers.cast_params_once, what samplers run) computes exactly what it computes with float32 parameters cast in
  each call; GroupNorm's parameters, and layers without a compute dtype, stay float32."""
  cfg = UNetConfig(**{**TINY, 'dtype': 'bfloat16', 'num_classes': 10, 'dropout': 0.0})
  graphdef, params, rest = nnx.split(UNet(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape), params)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  args = (x, jnp.array([0.1, 5.0]), jnp.array([1, 2]))

  @jax.jit
  def both(params):
    model = nnx.merge(graphdef, params, rest)
    y = model(*args)
    cast = layers.cast_params_once(model)
    return y, cast(*args), nnx.state(cast, nnx.Param), nnx.state(model, nnx.Param)

  y, y_cast, cast_params, model_params = both(params)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(model_params)), 'the model itself is left alone'
  assert float(jnp.abs(y.astype(jnp.float32)).max()) > 1e-3
  np.testing.assert_array_equal(np.asarray(y_cast, np.float32), np.asarray(y, np.float32))
  dtypes = {jax.tree_util.keystr(path): leaf.dtype
            for path, leaf in jax.tree_util.tree_leaves_with_path(cast_params)}
  assert dtypes["['conv_in']['kernel'].value"] == jnp.bfloat16
  assert dtypes["['class_emb']['embedding'].value"] == jnp.float32  # an nnx.Embed without a compute dtype
  norms = [d for k, d in dtypes.items() if 'norm' in k]
  assert norms and all(d == jnp.float32 for d in norms)
  assert sum(d == jnp.bfloat16 for d in dtypes.values()) > len(dtypes) // 2


def test_fresh_network_outputs_zero():
  """score_sde's zero-initialized last layers: every residual branch and the output start at zero."""
  model = UNet(UNetConfig(**TINY), rngs=nnx.Rngs(0))
  y = model(jnp.ones((1, 16, 16, 3)), jnp.array([3.0]))
  assert float(jnp.abs(y).max()) == 0.0


def test_dropout_is_active_only_in_training():
  cfg = UNetConfig(**{**TINY, 'dropout': 0.5})
  model = UNet(cfg, rngs=nnx.Rngs(0))
  _, params, rest = nnx.split(model, nnx.Param, ...)
  params = jax.tree.map(lambda p: p + 0.05, params)
  nnx.update(model, params)
  x, t = jnp.ones((1, 16, 16, 3)), jnp.array([1.0])
  np.testing.assert_array_equal(model(x, t), model(x, t))
  a = model(x, t, train=True, rngs=nnx.Rngs(dropout=0))
  b = model(x, t, train=True, rngs=nnx.Rngs(dropout=1))
  assert float(jnp.abs(a - b).max()) > 1e-4


def test_attention_matches_softmax_reference():
  block = layers.AttnBlock(8, num_heads=2, num_groups=2, rngs=nnx.Rngs(0))
  _, params = nnx.split(block, nnx.Param)
  nnx.update(block, jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(p.size), p.shape), params))
  x = jax.random.normal(jax.random.key(2), (2, 4, 4, 8))
  h = block.norm(x).reshape(2, 16, 8)
  q, k, v = (f(h).reshape(2, 16, 2, 4) for f in (block.q, block.k, block.v))
  w = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k) / 2.0, axis=-1)
  ref = x + block.out(jnp.einsum('bhqk,bkhd->bqhd', w, v).reshape(2, 16, 8)).reshape(x.shape)
  np.testing.assert_allclose(block(x), ref, rtol=1e-5, atol=1e-5)


def test_registry_rejects_unknown_names_and_options():
  with pytest.raises(ValueError, match='unknown model'):
    build_model('unet3d', {}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='does not take'):
    build_model('ddpmpp', {'nff': 3}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='not divisible'):
    UNet(UNetConfig(image_size=28, ch_mult=(1, 2, 2, 2)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
    UNet(UNetConfig(image_size=8, nf=16, ch_mult=(1, 2), attn_resolutions=(4,), attention='flash'), rngs=nnx.Rngs(0))
  if jax.default_backend() != 'gpu':
    with pytest.raises(ValueError, match="attention='cudnn' needs an NVIDIA GPU"):
      UNet(UNetConfig(image_size=8, nf=16, ch_mult=(1, 2), attn_resolutions=(4,), attention='cudnn',
                    context_dim=8), rngs=nnx.Rngs(0))


def _primitives(jaxpr) -> set[str]:
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      names |= _primitives(sub)
  return names


def test_remat_gives_the_same_loss_and_gradients():
  """Activation checkpointing changes memory, not values (dropout on: the same masks are recomputed)."""
  def loss_and_grads(remat):
    cfg = UNetConfig(image_size=16, in_channels=1, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                     num_groups=2, dropout=0.3, remat=remat)
    model = UNet(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 1))
    t = jnp.array([3.0, 500.0])

    def loss(params):
      m = nnx.merge(graphdef, params, rest)
      return jnp.mean(m(x, t, train=True, rngs=nnx.Rngs(dropout=7)) ** 2 + x)

    # conv_out starts at zero: perturb it so the gradient reaches every block
    params = jax.tree.map(lambda p: p + 0.01, params)
    recomputes = bool({'remat2', 'checkpoint'} & _primitives(jax.make_jaxpr(loss)(params).jaxpr))
    assert recomputes == remat
    return jax.jit(jax.value_and_grad(loss))(params)

  (l0, g0), (l1, g1) = loss_and_grads(False), loss_and_grads(True)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)
  assert any(float(jnp.abs(a).max()) > 0 for a in jax.tree.leaves(g0))


def test_upsample_nearest_is_resize_nearest_without_a_scatter_in_its_gradient():
  """The broadcast upsampling equals jax.image.resize('nearest') at x2, value and gradient; its gradient is a sum
  (resize's is a scatter-add, which XLA:GPU runs as separate, slow kernels)."""
  x = jax.random.normal(jax.random.key(0), (2, 3, 5, 4))
  w = jax.random.normal(jax.random.key(1), (2, 6, 10, 4))
  ref = lambda x: jax.image.resize(x, (2, 6, 10, 4), 'nearest')
  np.testing.assert_array_equal(layers.upsample_nearest(x), ref(x))
  grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * w))
  np.testing.assert_allclose(grad(layers.upsample_nearest)(x), grad(ref)(x), rtol=1e-6, atol=1e-6)
  assert 'scatter' not in str(jax.make_jaxpr(grad(layers.upsample_nearest))(x))
  assert 'scatter' in str(jax.make_jaxpr(grad(ref))(x))


@pytest.mark.parametrize('shape,groups', [((3, 5, 4, 16), 4), ((2, 7, 12), 3), ((2, 3, 3, 66), 1)])  # 4, 4, 66 wide
@pytest.mark.parametrize('silu', [False, True])
@pytest.mark.parametrize('written', [True, False])
def test_group_norm_matches_flax_in_value_and_gradient(shape, groups, silu, written, monkeypatch):
  """layers.GroupNorm (float32 statistics; the written backward pass of GPUs, or autodiff) equals nnx.GroupNorm
  (+ SiLU) under autodiff: outputs and the gradients of x, scale and bias, in float32; in bfloat16 up to its
  rounding. Narrow groups take the written statistics' channel sum as elementwise adds, the 66-wide group the plain
  sum (layers._group_sum)."""
  monkeypatch.setattr(layers, 'for_xla_gpu', lambda: written)
  c = shape[-1]
  ours = layers.GroupNorm(c, groups, 1e-6, rngs=nnx.Rngs(0))
  ref = nnx.GroupNorm(c, num_groups=groups, epsilon=1e-6, dtype=jnp.float32, rngs=nnx.Rngs(0))
  keys = jax.random.split(jax.random.key(1), 4)
  params = {'scale': 1 + 0.3 * jax.random.normal(keys[0], (c,)), 'bias': 0.2 * jax.random.normal(keys[1], (c,))}
  x = 3.0 + 2.0 * jax.random.normal(keys[2], shape)  # an offset mean: the fast variance's cancellation shows
  w = jax.random.normal(keys[3], shape)

  def loss(module, params, x, fused):
    graphdef, state = nnx.split(module)
    state = nnx.State(state)
    state.replace_by_pure_dict(params)
    module = nnx.merge(graphdef, state)
    y = module(x, silu=True) if fused and silu else module(x)
    if silu and not fused:
      y = nnx.silu(y)
    return jnp.sum(y.astype(jnp.float32) * w), y.astype(x.dtype)

  for dtype, tol in ((jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)):
    xd = x.astype(dtype)
    (_, y), grads = jax.value_and_grad(lambda p, x: loss(ours, p, x, True), argnums=(0, 1), has_aux=True)(params, xd)
    (_, y_ref), grads_ref = jax.value_and_grad(lambda p, x: loss(ref, p, x, False), argnums=(0, 1),
                                               has_aux=True)(params, xd)
    assert y.dtype == dtype and grads[1].dtype == dtype
    np.testing.assert_allclose(np.float32(y), np.float32(y_ref), rtol=tol, atol=tol)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
      scale = float(jnp.max(jnp.abs(jnp.float32(b))))
      np.testing.assert_allclose(np.float32(a) / scale, np.float32(b) / scale, rtol=tol, atol=tol)


def test_pallas_flash_attention_matches_xla():
  """attention='pallas' (jax's Pallas flash kernel, run by its interpreter here) gives XLA's attention and gradients;
  a masked call stays on XLA."""
  ks = jax.random.split(jax.random.key(0), 4)
  q, k, v, w = (jax.random.normal(key, (2, 128, 1, 32)) for key in ks)
  ref = lambda q, k, v: layers.attention(q, k, v, implementation='xla')
  flash = lambda q, k, v: layers.attention(q, k, v, implementation='pallas', interpret=True)
  np.testing.assert_allclose(flash(q, k, v), ref(q, k, v), rtol=2e-5, atol=2e-5)
  grads = lambda f: jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(grads(flash), grads(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  assert 'pallas_call' in str(jax.make_jaxpr(flash)(q, k, v))
  mask = jnp.ones((2, 1, 128, 128), bool)
  masked = jax.make_jaxpr(lambda q, k, v: layers.attention(q, k, v, implementation='pallas', mask=mask,
                                                           interpret=True))(q, k, v)
  assert 'pallas_call' not in str(masked)

