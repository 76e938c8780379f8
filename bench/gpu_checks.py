"""GPU-only checks the CPU test suite cannot make: model.attention='cudnn' (fused cuDNN attention through
jax.nn.dot_product_attention) against the XLA implementation, in bfloat16, for the attention blocks of both
benchmark networks (DDPM CIFAR-10: one head of 256 channels at 16x16; the text LDM: 4 heads of 32 with a padding
mask over 24 text tokens) and for a whole U-Net forward and gradient. Prints one JSON line per check with the
largest difference relative to the output's scale and ok (<= 2e-2, bfloat16 rounding), or the error.

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


def twin(build):
  """(cudnn module, xla module) with the same random (not zero-initialized) parameters."""
  xla = build('xla')
  graphdef, state = nnx.split(xla)
  state = jax.tree.map(lambda v: v + 0.05 * jax.random.normal(jax.random.key(v.size), v.shape, v.dtype)
                       if jnp.issubdtype(v.dtype, jnp.floating) else v, state)
  xla = nnx.merge(graphdef, state)
  cudnn = build('cudnn')
  nnx.update(cudnn, nnx.state(xla))
  return cudnn, xla


def check(name, build, *inputs):
  try:
    cudnn, xla = twin(build)
    err = relative_error(jax.jit(lambda *a: cudnn(*a))(*inputs), jax.jit(lambda *a: xla(*a))(*inputs))
    emit(what='gpu_check', check=name, rel_err=round(err, 5), ok=err <= TOLERANCE)
  except Exception as e:  # a configuration cuDNN rejects is a result too
    emit(what='gpu_check', check=name, ok=False, err=repr(e)[:300])


def main():
  emit(what='device', device=str(jax.devices()[0]), jax=jax.__version__)
  bf16, key = jnp.bfloat16, jax.random.key(0)
  x16 = jax.random.normal(key, (64, 16, 16, 256), bf16)
  check('AttnBlock 256 ch, 1 head, 16x16 (DDPM CIFAR-10)',
        lambda impl: layers.AttnBlock(256, num_heads=1, attention=impl, dtype=bf16, rngs=nnx.Rngs(0)), x16)
  x8, ctx = jax.random.normal(key, (64, 64, 128), bf16), jax.random.normal(key, (64, 24, 384), jnp.float32)
  mask = (jnp.arange(24)[None] < jax.random.randint(key, (64, 1), 2, 25)).astype(jnp.int32)
  check('CrossAttention 128 ch, 4 heads, 24 masked text tokens (text LDM)',
        lambda impl: layers.CrossAttention(128, 384, num_heads=4, attention=impl, dtype=bf16, rngs=nnx.Rngs(0)),
        x8, ctx, mask)
  check('self-attention 128 ch, 4 heads, 8x8 (text LDM)',
        lambda impl: layers.CrossAttention(128, num_heads=4, attention=impl, dtype=bf16, rngs=nnx.Rngs(0)), x8)

  cfg = dict(image_size=16, in_channels=4, nf=64, ch_mult=(1, 2, 2), attn_resolutions=(8, 4), num_heads=4,
             num_groups=16, dropout=0.0, dtype='bfloat16', context_dim=384, pooled_dim=384)
  cond = {'tokens': ctx, 'mask': mask, 'pooled': ctx[:, 0]}
  xs, ts = jax.random.normal(key, (64, 16, 16, 4)), jnp.linspace(0.01, 0.99, 64)
  check('text U-Net forward', lambda impl: UNet(UNetConfig(**cfg, attention=impl), rngs=nnx.Rngs(0)), xs, ts, cond)

  def gradient_of(impl):
    unet = UNet(UNetConfig(**cfg, attention=impl), rngs=nnx.Rngs(0))

    class Grad(nnx.Module):  # the gradient of a scalar loss with respect to the input, as a module call
      def __init__(self, m):
        self.m = m

      def __call__(self, x, t, c):
        return jax.grad(lambda x: jnp.sum(self.m(x, t, c).astype(jnp.float32) ** 2))(x)

    return Grad(unet)

  check('text U-Net input gradient', gradient_of, xs, ts, cond)


if __name__ == '__main__':
  main()
