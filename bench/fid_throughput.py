"""FID feature throughput: our FID InceptionV3 (eval/inception.py) on uint8 32x32 images, resized to 299
on the device, pool3 features out — images/s (median of timed calls) at batch 500.

Numerics, stated per line: 'fp32 strict' (precision HIGHEST: true float32 convolutions, what FID uses by
default), 'fp32/tf32' (precision DEFAULT: the GPU may use TF32, as the PyTorch peer does with
cudnn.allow_tf32=True), and 'bf16'. Weights are random (the architecture, not the values, costs time), as in
the peer, pytorch-fid's InceptionV3 in ../shared/bench/peer_pytorch.py, run in the same device call.

  python bench/fid_throughput.py [--batch 500] [--calls 10]
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from eval import inception  # noqa: E402


def emit(**kw):
  print(json.dumps(kw), flush=True)


NUMERICS = {'fp32/tf32': (jnp.float32, jax.lax.Precision.DEFAULT), 'fp32 strict': (jnp.float32, None),
            'bf16': (jnp.bfloat16, None)}  # label -> (dtype, precision; None: the model's default)


def random_weights(model: inception.InceptionV3) -> None:
  """He-scaled normal kernels and unit batch-norm statistics, so activations stay finite."""
  rng = np.random.default_rng(0)
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param) and path[-1] == 'kernel':
      value = var[...]
      var[...] = jnp.asarray(rng.normal(size=value.shape) * np.sqrt(2.0 / np.prod(value.shape[:-1])), value.dtype)


def run(label: str, dtype, precision, batch: int, calls: int, size: int) -> None:
  model = inception.InceptionV3(with_logits=False, dtype=dtype, precision=precision)
  random_weights(model)
  fn = inception.make_feature_fn(model)
  images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (batch, size, size, 3), np.uint8))
  f = jax.jit(lambda u8: u8.astype(jnp.float32) / 255.0)
  x = f(images)
  t0 = time.perf_counter()
  jax.block_until_ready(fn(x))
  first = time.perf_counter() - t0
  jax.block_until_ready(fn(x))
  times = []
  for _ in range(calls):
    t = time.perf_counter()
    out = fn(f(images))
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t)
  s = statistics.median(times)
  emit(what='fid_inception_features', impl=f'ours jax {label}', batch=batch, input_px=size,
       img_per_s=round(batch / s, 1), ms=round(s * 1e3, 2), compile_s=round(first, 1),
       finite=bool(np.isfinite(np.asarray(out)).all()))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=500)
  parser.add_argument('--calls', type=int, default=10)
  parser.add_argument('--size', type=int, default=32)
  parser.add_argument('--numerics', nargs='+', default=['fp32/tf32', 'fp32 strict', 'bf16'])
  args = parser.parse_args()
  emit(what='device', device=str(jax.devices()[0]), jax=jax.__version__)
  for label in args.numerics:
    try:
      run(label, *NUMERICS[label], args.batch, args.calls, args.size)
    except Exception as e:  # one failed configuration must not lose the others
      emit(what='fid_failed', impl=f'ours jax {label}', err=repr(e)[:300])


if __name__ == '__main__':
  main()
