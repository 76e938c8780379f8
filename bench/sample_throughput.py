"""Sampling throughput of the DDPM CIFAR-10 U-Net: denoiser forward, DDIM-50 and DPM-Solver++(2M)-20.

End to end: prior noise -> jitted sampler loop (lax.fori_loop, no host sync per step) -> uint8 images on
the device, at batch 256 (32x32). Prints one JSON line per (what, dtype): img_per_s (median over timed
calls), ms per call, compile_s. The PyTorch peer is bench/peer_sampling.py (diffusers UNet2DModel with
torch.compile + bf16 autocast and diffusers' DDIM / DPM-Solver++ schedulers), run in the same device call.

  python bench/sample_throughput.py [--batch 256] [--dtype bfloat16 float32] [--calls 10] [--nf 128]
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
from flax import nnx  # noqa: E402

from configs.cifar10 import ddpm  # noqa: E402
from train import generate, trainer  # noqa: E402


def emit(**kw):
  print(json.dumps(kw), flush=True)


def timed(fn, args, calls: int) -> tuple[float, float]:
  """(compile + first call seconds, median seconds of the following calls)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(calls):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return first, statistics.median(times)


def run(dtype: str, batch: int, calls: int, nf: int) -> None:
  config = ddpm.get_config()
  config.model.dtype, config.model.nf, config.model.dropout = dtype, nf, 0.0
  graphdef, state, _, _ = trainer.init_state(config)
  process = trainer.build_process(config)
  shape = (batch, 32, 32, 3)

  model = nnx.merge(graphdef, state.ema_params, state.buffers)
  forward = jax.jit(lambda x, t: model(x, t, None))
  x = jax.random.normal(jax.random.key(0), shape)
  t = jax.random.uniform(jax.random.key(1), (batch,)) * 999.0
  first, s = timed(forward, (x, t), calls * 4)
  emit(what='denoiser_forward', impl=f'ours jax {dtype}', batch=batch, img_per_s=round(batch / s, 1),
       ms=round(s * 1e3, 2), compile_s=round(first, 1))

  for label, overrides in (('ddim50', dict(sampler='ddim', num_steps=50, eta=0.0, spacing='leading')),
                           ('dpm_solver++2m_20', dict(sampler='dpm_solver', num_steps=20, order=2,
                                                      spacing='logsnr'))):
    for k, v in overrides.items():
      config.sample[k] = v
    settings, sample_fn = trainer.build_sampler(config)
    gen = generate.make_generate_fn(graphdef, process, prediction='eps', sigma_data=0.5, sample_fn=sample_fn,
                                    settings=settings, shape=shape, centered=True)
    args = (state.ema_params, state.buffers, jax.random.key(2), None)
    first, s = timed(gen, args, calls)
    nfe = int(gen(*args)[1])
    emit(what='sample', sampler=label, impl=f'ours jax {dtype}', batch=batch, nfe=nfe,
         img_per_s=round(batch / s, 1), ms=round(s * 1e3, 1), compile_s=round(first, 1))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--dtype', nargs='+', default=['bfloat16', 'float32'])
  parser.add_argument('--calls', type=int, default=10, help='timed sampler calls (median); forward: 4x')
  parser.add_argument('--nf', type=int, default=128, help='128: the DDPM CIFAR-10 network; smaller for smoke tests')
  args = parser.parse_args()
  emit(what='device', device=str(jax.devices()[0]), jax=jax.__version__)
  for dtype in args.dtype:
    try:
      run(dtype, args.batch, args.calls, args.nf)
    except Exception as e:  # one failed configuration must not lose the others
      emit(what='sample_failed', impl=f'ours jax {dtype}', err=repr(e)[:300])


if __name__ == '__main__':
  main()
