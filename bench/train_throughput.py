"""Training throughput of the DDPM CIFAR-10 U-Net (35.7 M parameters): the full jitted step.

One step = eps loss on a uint8 batch scaled on device, backward, Adam with clipping, EMA update; the
state is donated. Prints one JSON line per (dtype, batch, steps_per_call):
  img_per_s (median over timed calls), step_ms, compile_s, peak_mem_gb, and MFU (FLOPs per step / step time /
  peak; the peak is the H100 SXM dense bf16 rate, 989 TFLOP/s, as in the PyTorch peer's log) by two counts:
  - matmul_flops_per_img, mfu_matmul_vs_989tf: the convolutions' and matrix products' multiply-adds x 2, every
    window tap (padding included), read from the step's jaxpr (`matmul_flops`): torch's FlopCounterMode convention,
    by which the peer reports its MFU. 37.32 GFLOP per image for the DDPM network, equal to FlopCounterMode's count
    of the peer's diffusers network run with math attention (tests/test_bench_tools.py); the peer's own log says
    37.49 because on a GPU FlopCounterMode also counts the flash-attention backward's recomputed scores.
  - flops_per_img, mfu_vs_989tf: XLA's cost analysis of the lowered program (only the window taps inside the
    image, plus elementwise operations): 35.0 GFLOP per image.

  python bench/train_throughput.py [--batch 128 512] [--dtype bfloat16 float32] [--steps 20]
      [--variant base 'model.dropout=0.0' 'model.attention=pallas'] [--profile DIR] [--dump_hlo DIR]

A variant is a comma-separated list of config overrides (key=value), measured as one more row: an ablation that
says what a part of the step costs. --profile traces 5 steps of each row with jax.profiler into DIR/<row> and
prints where the device time goes (bench/profile_ops.py: time per op kind and the top ops). --dump_hlo writes each
row's compiled program (the optimized HLO: fusions, layouts, library calls) to DIR/<row>.hlo.txt.gz, to study the
GPU's program where no GPU is at hand; the profile's top ops name its fusions.

The PyTorch peer (diffusers UNet2DModel, torch.compile + bf16 autocast) is ../shared/bench/peer_pytorch.py,
run in the same device call; bench/RESULTS.md records both.
"""

import argparse
import ast
import gzip
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import profile_ops  # noqa: E402
from configs.cifar10 import ddpm  # noqa: E402
from train import posthoc_ema, trainer  # noqa: E402
from train import step as step_lib  # noqa: E402

PEAK_FLOPS = 989e12


def emit(**kw):
  print(json.dumps(kw), flush=True)


def overrides(variant: str) -> dict:
  """'model.dropout=0.0,model.attention=cudnn' -> {'model.dropout': 0.0, 'model.attention': 'cudnn'}; commas
  inside brackets belong to the value ('training.ema_profiles=(0.05,0.1)')."""
  out = {}
  items, depth, current = [], 0, ''
  for ch in variant if variant != 'base' else '':
    depth += (ch in '([') - (ch in ')]')
    if ch == ',' and depth == 0:
      items.append(current)
      current = ''
    else:
      current += ch
  for item in filter(None, items + [current]):
    key, _, value = item.partition('=')
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def build_step(dtype: str, batch: int, steps_per_call: int, image_size: int = 32, nf: int = 128,
               variant: str = 'base'):
  """(jitted step with the state donated, state, host batches [k, B, ...]) of the DDPM CIFAR-10 network."""
  config = ddpm.get_config()
  config.model.dtype = dtype
  config.model.nf = nf
  config.data.image_size = image_size
  for key, value in overrides(variant).items():
    section, name = key.split('.')
    config[section][name] = value
  graphdef, state, tx, schedule = trainer.init_state(config)
  process = trainer.build_process(config)
  gammas = posthoc_ema.profile_gammas(config.training.ema_profiles)
  settings = step_lib.StepSettings(prediction='eps', loss=trainer.build_loss(config), ema_decay=0.9999,
                                   ema_profile_gammas=gammas, random_flip=True)
  one = step_lib.make_train_step(graphdef, process, tx, schedule, settings, jax.random.key(0))
  fn = jax.jit(step_lib.multi_step(one, steps_per_call), donate_argnums=0)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (steps_per_call, batch, image_size, image_size, 3), dtype=np.uint8)
  return fn, state, {'image': images, 'label': np.zeros((steps_per_call, batch), np.int32)}


def row_name(dtype: str, batch: int, steps_per_call: int, variant: str) -> str:
  """A row's file name (its --dump_hlo program, its --profile trace), e.g. bfloat16_b512_k1_base."""
  return f'{dtype}_b{batch}_k{steps_per_call}_{variant}'.replace('=', '-').replace(',', '+')


def step_flops(lowered) -> float:
  """FLOPs of one optimizer step, from the cost analysis of the program as lowered (before XLA:GPU turns
  convolutions into cuDNN custom calls, which the compiled program's analysis does not count). With several steps
  per call the analysis counts the scan's loop body once, so it is one step's count either way (asserted in
  tests/test_bench_tools.py). jax 0.11 on GPUs returns None here: then the row's flops and MFU are null, and
  RESULTS.md uses the CPU's count of the same lowered program."""
  cost = lowered.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  return float(cost.get('flops', 0.0))


def matmul_flops(jaxpr) -> float:
  """Multiply-adds x 2 of the convolutions and dot products a (closed) jaxpr runs, sub-jaxprs included (a scan's
  body times its length, a cond's costliest branch, a while body once). Every window tap counts, padding included,
  as in torch's FlopCounterMode; an input-dilated convolution (the input gradient of a strided one) counts the taps
  that meet its input, i.e. the strided convolution's own multiply-adds. Attention run by a fused kernel (the cuDNN
  or Pallas variants) is not seen: 1.0 of the DDPM network's 37.3 GFLOP per image."""
  total = 0.0
  for eqn in getattr(jaxpr, 'jaxpr', jaxpr).eqns:
    name, params = eqn.primitive.name, eqn.params
    out = eqn.outvars[0].aval.shape if eqn.outvars else ()
    if name == 'conv_general_dilated':
      kernel = eqn.invars[1].aval.shape
      out_features = kernel[params['dimension_numbers'].rhs_spec[0]]
      total += 2.0 * math.prod(out) * math.prod(kernel) / out_features / math.prod(params['lhs_dilation'])
    elif name == 'dot_general':
      (contracting, _), _ = params['dimension_numbers']
      total += 2.0 * math.prod(out) * math.prod(eqn.invars[0].aval.shape[d] for d in contracting)
    is_jaxpr = lambda sub: hasattr(getattr(sub, 'jaxpr', sub), 'eqns')
    inner = [[sub for sub in (v if isinstance(v, (tuple, list)) else (v,)) if is_jaxpr(sub)] for v in params.values()]
    for subs in filter(None, inner):
      counts = [matmul_flops(sub) for sub in subs]
      total += (max(counts) if name == 'cond' else sum(counts)) * (params['length'] if name == 'scan' else 1)
  return total


def measure(dtype: str, batch: int, steps_per_call: int, timed_calls: int, image_size: int, nf: int,
            variant: str = 'base', profile_dir: str | None = None, hlo_dir: str | None = None) -> dict:
  fn, state, batches = build_step(dtype, batch, steps_per_call, image_size, nf, variant)
  batches = jax.device_put(batches)

  t0 = time.perf_counter()
  traced = fn.trace(state, batches)
  lowered = traced.lower()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  flops = step_flops(lowered)
  mm_flops = matmul_flops(traced.jaxpr) / steps_per_call  # the scan's body counts once per step here

  for _ in range(3):  # warm-up
    state, metrics = compiled(state, batches)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(timed_calls):
    t = time.perf_counter()
    state, metrics = compiled(state, batches)
    jax.block_until_ready(metrics)
    times.append((time.perf_counter() - t) / steps_per_call)
  step_s = statistics.median(times)
  mem = jax.devices()[0].memory_stats() or {}
  name = row_name(dtype, batch, steps_per_call, variant)
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
    with gzip.open(os.path.join(hlo_dir, f'{name}.hlo.txt.gz'), 'wt') as f:
      f.write(compiled.as_text())
  if profile_dir:
    def call():
      nonlocal state
      state, m = compiled(state, batches)
      return m
    try:  # a failed profile must not lose the row
      summary = profile_ops.profile(call, 5, os.path.join(profile_dir, name), compiled.as_text())
      emit(what='train_profile', impl=f'ours jax {dtype}', batch=batch, variant=variant,
           per_step_ms=round(summary['device_ms_per_call'] / steps_per_call, 3), **summary)
    except Exception as e:  # noqa: BLE001
      emit(what='train_profile_failed', batch=batch, variant=variant, err=repr(e)[:1500])
  # float32 rows: float32 parameters and activations; convolutions and matmuls at XLA's default precision, which
  # lets Ampere and Hopper GPUs use TF32 (as PyTorch's cudnn.allow_tf32 default does for convolutions).
  precision = jax.config.jax_default_matmul_precision or 'default'
  return dict(what='train', impl=f'ours jax {dtype}', precision=precision, batch=batch, steps_per_call=steps_per_call,
              variant=variant,
              img_per_s=round(batch / step_s, 1), step_ms=round(step_s * 1e3, 2),
              step_ms_min=round(min(times) * 1e3, 2), compile_s=round(compile_s, 1),
              matmul_flops_per_img=round(mm_flops / batch),
              mfu_matmul_vs_989tf=round(mm_flops / step_s / PEAK_FLOPS, 4),
              flops_per_img=round(flops / batch) if flops else None,
              mfu_vs_989tf=round(flops / step_s / PEAK_FLOPS, 4) if flops else None,
              peak_mem_gb=round(mem.get('peak_bytes_in_use', 0) / 2 ** 30, 2),
              loss_finite=bool(np.isfinite(np.asarray(metrics['loss'])).all()))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, nargs='+', default=[128, 512])
  parser.add_argument('--dtype', nargs='+', default=['bfloat16', 'float32'])
  parser.add_argument('--steps_per_call', type=int, nargs='+', default=[1])
  parser.add_argument('--steps', type=int, default=20, help='timed calls (median)')
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--nf', type=int, default=128, help='128: the DDPM CIFAR-10 network; smaller for smoke tests')
  parser.add_argument('--variant', nargs='+', default=['base'], help="'base' or config overrides 'a.b=v,c.d=w'")
  parser.add_argument('--profile', default=None, help='trace 5 steps of each row into this folder and summarize')
  parser.add_argument('--dump_hlo', default=None, help="write each row's compiled HLO (gzipped) into this folder")
  args = parser.parse_args()
  emit(what='device', device=str(jax.devices()[0]), jax=jax.__version__, backend=jax.default_backend())
  for dtype in args.dtype:
    for batch in args.batch:
      for k in args.steps_per_call:
        for variant in args.variant:
          try:
            emit(**measure(dtype, batch, k, args.steps, args.image_size, args.nf, variant, args.profile,
                           args.dump_hlo))
          except Exception as e:  # one failed configuration (e.g. out of memory) must not lose the others
            emit(what='train_failed', impl=f'ours jax {dtype}', batch=batch, steps_per_call=k, variant=variant,
                 err=repr(e)[:300])


if __name__ == '__main__':
  main()
