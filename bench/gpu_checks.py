"""GPU-only checks the CPU test suite cannot make: model.attention='cudnn' (fused cuDNN attention through
jax.nn.dot_product_attention) and model.attention='pallas' (jax's Pallas / Triton flash attention kernels, which
the CPU tests run only in the Pallas interpreter), in bfloat16, for the attention blocks of both benchmark
networks (DDPM CIFAR-10: one head of 256 channels at 16x16, output and input gradient; the text LDM: 4 heads of
32 with a padding mask over 24 text tokens) and for a whole text U-Net forward and input gradient.

Each implementation in bfloat16 is compared with XLA in float32 (the same parameters and inputs), beside XLA's
own bfloat16 error: one JSON line per (check, implementation) with the largest difference relative to the
output's scale, and ok when it is at most max(2e-2, 3 x XLA's bfloat16 error), or the error raised.

  python bench/gpu_checks.py
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from models import layers  # noqa: E402
from models.unet import UNet, UNetConfig  # noqa: E402

TOLERANCE = 2e-2


def emit(**kw):
  print(json.dumps(kw), flush=True)


def relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-6))


def randomized(module):
  """The module with random (not zero-initialized) parameters."""
  graphdef, state = nnx.split(module)
  state = jax.tree.map(lambda v: v + 0.05 * jax.random.normal(jax.random.key(v.size), v.shape, v.dtype)
                       if jnp.issubdtype(v.dtype, jnp.floating) else v, state)
  return nnx.merge(graphdef, state)


def check(name, build, *inputs):
  """build(impl, dtype) -> module; its output in bfloat16 per implementation against XLA's in float32."""
  cast = lambda dtype: jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                                    inputs)
  run = lambda m, dtype: jax.jit(lambda *a: m(*a))(*cast(dtype))
  reference = randomized(build('xla', jnp.float32))
  with jax.default_matmul_precision('highest'):  # float32 proper (a GPU's default lets matmuls use TF32)
    truth = run(reference, jnp.float32)
  xla_err = None
  for impl in ('xla', 'cudnn', 'pallas'):
    try:
      module = build(impl, jnp.bfloat16)
      nnx.update(module, nnx.state(reference))  # parameters are float32 whatever the compute dtype
      err = relative_error(run(module, jnp.bfloat16), truth)
      xla_err = err if impl == 'xla' else xla_err
      emit(what='gpu_check', check=name, attention=impl, rel_err_vs_fp32=round(err, 5),
           ok=err <= max(TOLERANCE, 3 * (xla_err or 0.0)))
    except Exception as e:  # a configuration an implementation rejects is a result too
      emit(what='gpu_check', check=name, attention=impl, ok=False, err=repr(e)[:300])


class Grad(nnx.Module):
  """The gradient of a scalar loss with respect to the input, as a module call."""

  def __init__(self, m):
    self.m = m

  def __call__(self, x, *args):
    return jax.grad(lambda x: jnp.sum(self.m(x, *args).astype(jnp.float32) ** 2))(x)


def main():
  emit(what='device', device=str(jax.devices()[0]), jax=jax.__version__)
  key = jax.random.key(0)
  x16 = jax.random.normal(key, (64, 16, 16, 256))
  ddpm_block = lambda impl, dt: layers.AttnBlock(256, num_heads=1, attention=impl, dtype=dt, rngs=nnx.Rngs(0))
  check('AttnBlock 256 ch, 1 head, 16x16 (DDPM CIFAR-10)', ddpm_block, x16)
  check('AttnBlock input gradient (DDPM CIFAR-10)', lambda impl, dt: Grad(ddpm_block(impl, dt)), x16)
  x8, ctx = jax.random.normal(key, (64, 64, 128)), jax.random.normal(key, (64, 24, 384))
  mask = (jnp.arange(24)[None] < jax.random.randint(key, (64, 1), 2, 25)).astype(jnp.int32)
  check('CrossAttention 128 ch, 4 heads, 24 masked text tokens (text LDM)',
        lambda impl, dt: layers.CrossAttention(128, 384, num_heads=4, attention=impl, dtype=dt, rngs=nnx.Rngs(0)),
        x8, ctx, mask)
  check('self-attention 128 ch, 4 heads, 8x8 (text LDM)',
        lambda impl, dt: layers.CrossAttention(128, num_heads=4, attention=impl, dtype=dt, rngs=nnx.Rngs(0)), x8)

  cfg = dict(image_size=16, in_channels=4, nf=64, ch_mult=(1, 2, 2), attn_resolutions=(8, 4), num_heads=4,
             num_groups=16, dropout=0.0, context_dim=384, pooled_dim=384)
  cond = {'tokens': ctx, 'mask': mask, 'pooled': ctx[:, 0]}
  xs, ts = jax.random.normal(key, (64, 16, 16, 4)), jnp.linspace(0.01, 0.99, 64)
  unet = lambda impl, dt: UNet(UNetConfig(**cfg, attention=impl, dtype=jnp.dtype(dt).name), rngs=nnx.Rngs(0))
  check('text U-Net forward', unet, xs, ts, cond)
  check('text U-Net input gradient', lambda impl, dt: Grad(unet(impl, dt)), xs, ts, cond)


if __name__ == '__main__':
  main()
