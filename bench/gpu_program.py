"""The training step's XLA:GPU program without a GPU: its kernels and the bytes each one moves.

GPU time is scarce; between GPU sessions this compiles the step for an H100 or H200 *description* (deviceless
ahead-of-time compilation through jax's CUDA plugin: jax.experimental.topologies with a target config) and reads
the optimized HLO that XLA:GPU would run: which kernels it launches (fusions, cuDNN convolutions, GEMM fusions,
copies), where each comes from in the JAX program, and the DRAM bytes each one reads and writes. The sum over
kernels, divided by the memory bandwidth, is a memory roofline of the step; with the FLOPs of the lowered
program over the peak rate, it says how far the measured step time is from its bounds, and an optimization that
removes kernels or bytes can be checked before the next GPU session measures it.

Limits: no autotuning happens without a device (XLA's default fusion and convolution choices stand, as with
--xla_gpu_autotune_level=0), bytes count each kernel's operands and outputs once (the L2 cache may serve some),
and the training step is read at the top level (one step per call: --steps_per_call 1); --preflight also counts
the kernels of each while loop's body, which run once per iteration (a sampler's network evaluation).

Needs jax's CUDA plugin of the same version as jax (`pip install "jax[cuda12]==<jax version>"`), no GPU:
  python bench/gpu_program.py [--target h100|h200] [--dtype bfloat16] [--batch 512] [--variant 'a.b=v']
      [--top 20] [--hlo out.hlo.txt.gz]

Before a GPU session, `--preflight [NAME_PART]` compiles every program bench/device_run.sh will run (training
steps, sampling loops of both networks, FID features) for the target and says which fail to compile: XLA:GPU
compile errors show up here without a GPU (the sampling loops' openxla/xla#49299 failure does, at its commit).
"""

import argparse
import collections
import functools
import gzip
import json
import os
import re
import sys
import time

os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')  # no GPU here: skip the CUDA driver probe
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

# Hopper SXM parts by the vendor's datasheets (the fields XLA:GPU's compiler reads from a device description).
_HOPPER = '''gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth} l2_cache_size: 52428800 clock_rate_ghz: 1.98 device_memory_size: {memory}
  shared_memory_per_block_optin: 232448 cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA" dnn_version_info {{ major: 9 minor: 8 }} runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{name}"
'''
TARGETS = {  # name -> (device description, memory bandwidth bytes/s, dense bf16 FLOP/s)
    'h100': (_HOPPER.format(bandwidth=3352320000000, memory=84929347584, name='NVIDIA H100 80GB HBM3'),
             3.35e12, 989e12),
    'h200': (_HOPPER.format(bandwidth=4800000000000, memory=150754820096, name='NVIDIA H200'), 4.8e12, 989e12),
}
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 'f32': 4, 's32': 4,
                'u32': 4, 'f64': 8, 's64': 8, 'u64': 8}
_SHAPE = re.compile(r'\b(pred|[suf]\d+|bf16)\[([\d,]*)\]')
_KERNEL = re.compile(r'^\s*(?:ROOT\s+)?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*?)\)(, .*)?$')
# A while loop is no kernel: its body's kernels run once per iteration (loop_bodies); its operands are not traffic.
_NOT_KERNELS = {'parameter', 'constant', 'bitcast', 'get-tuple-element', 'tuple', 'after-all', 'partition-id',
                'while'}


def shape_bytes(text: str) -> int:
  """Bytes of every array shape written in `text` (e.g. '(bf16[512,32,32,128]{3,2,1,0}, f32[512]{0})')."""
  return sum(_DTYPE_BYTES[dt] * int(np.prod([int(d) for d in dims.split(',') if d] or [1]))
             for dt, dims in _SHAPE.findall(text) if dt in _DTYPE_BYTES)


def _instructions(hlo_text: str, computation: str | None = None) -> str:
  """The instruction lines of the entry computation (or of the named one)."""
  start = hlo_text.index('\nENTRY') if computation is None else hlo_text.index(f'\n%{computation} ')
  body = hlo_text[start:]
  return body[body.index('\n', 1) + 1:body.index('\n}')]


def kernels(hlo_text: str, computation: str | None = None, launched: bool = False) -> list[dict]:
  """The kernels of the program's entry computation (or of the named one, e.g. a loop body), in order: name, kind,
  bytes read + written, JAX origin, and the instruction (op, result shape, operand shapes, attributes).

  A command buffer (a `call` of a computation that XLA:GPU's CommandBufferScheduling outlined, launched as one
  CUDA graph) stands for its kernels, each marked with `graph` (the computation's name); XLA versions that form
  graphs from the thunk sequence instead leave no trace in the HLO. launched=True lists what one run launches: a
  while loop's body kernels once per iteration where XLA knows the trip count (`known_trip_count`; once otherwise,
  its condition left out)."""
  shapes, out = {}, []
  for line in _instructions(hlo_text, computation).splitlines():
    m = _KERNEL.match(line)
    if not m:
      continue
    name, result, op, args, rest = m.group(1), m.group(2), m.group(3), m.group(4), m.group(5) or ''
    shapes[name] = result
    if op == 'call' or (launched and op == 'while'):
      callee = re.search(r'(?:to_apply|body)=%([\w.\-]+)', rest).group(1)
      inner = kernels(hlo_text, callee, launched=launched)
      if op == 'call':
        out += [{'graph': callee, **k} for k in inner]
      else:
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
        out += [dict(k) for _ in range(int(trips.group(1)) if trips else 1) for k in inner]
      continue
    if op in _NOT_KERNELS:
      continue
    if op == 'custom-call':
      kind = re.search(r'custom_call_target="([^"]+)"', rest).group(1)
      result = re.sub(r'u8\[\d+\]\{0\}', '', result)  # a library call's scratch space is not traffic
    elif op == 'fusion':
      kind = 'fusion ' + re.search(r'kind=(k\w+)', rest).group(1)
    else:
      kind = op
    operands = [shapes.get(o, '') for o in re.findall(r'%([\w.\-]+)', args)]
    origin = re.search(r'op_name="([^"]*)"', rest)
    out.append({'name': name, 'kind': kind, 'bytes': sum(map(shape_bytes, operands)) + shape_bytes(result),
                'origin': origin.group(1) if origin else '', 'op': op, 'result': m.group(2), 'operands': operands,
                'attrs': rest})
  return out


def loop_bodies(hlo_text: str) -> list[str]:
  """Names of the body computations of the entry's while loops (a sampler's loop, several steps per call): their
  kernels run once per iteration, which the entry's count does not show."""
  return re.findall(r'= .*? while\(.*?body=%([\w.\-]+)', _instructions(hlo_text))


def summarize(ks: list[dict], bandwidth: float, flops: float | None, peak_flops: float, top: int) -> dict:
  """Totals, bytes per kernel kind and per JAX origin (forward / backward, last op), and the top kernels."""
  per_kind, per_origin = collections.defaultdict(lambda: [0, 0]), collections.defaultdict(lambda: [0, 0])
  for k in ks:
    per_kind[k['kind']][0] += 1
    per_kind[k['kind']][1] += k['bytes']
    phase = 'backward' if 'transpose(' in k['origin'] else 'forward'
    per_origin[f"{phase} {k['origin'].split('/')[-1] or '?'}"][0] += 1
    per_origin[f"{phase} {k['origin'].split('/')[-1] or '?'}"][1] += k['bytes']
  total = sum(k['bytes'] for k in ks)
  table = lambda d: [{'what': w, 'kernels': n, 'gb': round(b / 1e9, 3), 'ms_at_bandwidth': round(b / bandwidth * 1e3, 3)}
                     for w, (n, b) in sorted(d.items(), key=lambda kv: -kv[1][1])]
  return {'kernels': len(ks), 'gb_moved': round(total / 1e9, 2), 'memory_bound_ms': round(total / bandwidth * 1e3, 2),
          'gflop': None if flops is None else round(flops / 1e9, 1),
          'compute_bound_ms': None if flops is None else round(flops / peak_flops * 1e3, 2),
          'per_kind': table(per_kind), 'per_origin': table(per_origin)[:top],
          'top': [{'name': k['name'], 'kind': k['kind'], 'gb': round(k['bytes'] / 1e9, 3), 'origin': k['origin']}
                  for k in sorted(ks, key=lambda k: -k['bytes'])[:top]]}


def compile_for(target: str, fn, *args, **kwargs):
  """fn (jitted, or a functools.partial of a jitted function) compiled for a one-GPU `target` description, with
  every argument replicated on it."""
  from jax.experimental import topologies
  if isinstance(fn, functools.partial):
    fn, args, kwargs = fn.func, fn.args + args, {**fn.keywords, **kwargs}
  topology = topologies.get_topology_desc(platform='cuda', target_config=TARGETS[target][0], topology='1x1x1')
  mesh = topologies.make_mesh(topology, (1,), ('data',))
  spec = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=NamedSharding(mesh, PartitionSpec()))
  lowered = fn.trace(*jax.tree.map(spec, args), **jax.tree.map(spec, kwargs)).lower()
  return lowered, lowered.compile()


def device_programs():
  """(name, build) of every program bench/device_run.sh runs; build() -> (jitted callable, args)."""
  from bench import fid_throughput, sample_throughput, train_throughput
  from eval import inception
  out = []
  rows = [(d, b, 1, 'base') for d in ('bfloat16', 'float32') for b in (128, 512)]  # train
  rows += [('bfloat16', b, 4, 'base') for b in (128, 512)]  # graphs
  rows += [('bfloat16', 512, 1, v) for v in ('model.attention=pallas', 'model.dropout=0.0')]  # profile

  def train(dtype, batch, k, variant):
    fn, state, batches = train_throughput.build_step(dtype, batch, k, variant=variant)
    return fn, (state, batches)

  for row in rows:
    out.append(('train {} b{} k{} {}'.format(*row), functools.partial(train, *row)))
  sampling = functools.cache(lambda network, dtype: sample_throughput.programs(network, dtype, 256)[0])  # built once
  for network in sample_throughput.NETWORKS:
    for dtype in ('bfloat16', 'float32'):
      for label in ('denoiser_forward', 'denoiser_forward_cast_once', 'ddim50', 'dpm_solver++2m_20'):
        out.append((f'sample {network} {dtype} {label}', lambda n=network, d=dtype, l=label: sampling(n, d)[l]))
  for label, (dtype, precision) in fid_throughput.NUMERICS.items():
    def fid(dtype=dtype, precision=precision):
      model = inception.InceptionV3(with_logits=False, dtype=dtype, precision=precision)
      return inception.make_blocks_fn(model, ('pool3',)), (np.zeros((500, 32, 32, 3), np.float32),)
    out.append((f'fid {label} b500', fid))
  return out


def preflight(target: str, only: str = '') -> bool:
  """Compiles every program of the device run (those whose name contains `only`) for `target`; prints a JSON
  line each (compiled or the error, kernels of the top-level program and of each loop body per iteration, compile
  seconds); True if all compile.
  XLA:GPU compile errors (e.g. openxla/xla#49299, which cost an H100 session's sampling rows) show here."""
  ok = True
  for name, build in device_programs():
    if only not in name:
      continue
    t0 = time.perf_counter()
    try:
      fn, args = build()
      _, compiled = compile_for(target, fn, *args)
      text = compiled.as_text()
      line = {'program': name, 'compiled': True, 'kernels': len(kernels(text)),
              'loop_body_kernels': [len(kernels(text, body)) for body in loop_bodies(text)]}
    except Exception as e:  # noqa: BLE001 (report every program, then fail)
      ok, line = False, {'program': name, 'compiled': False, 'err': repr(e)[:400]}
    print(json.dumps({**line, 'target': target, 'seconds': round(time.perf_counter() - t0, 1)}), flush=True)
  return ok


def main():
  from bench import train_throughput
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--target', default='h100', choices=sorted(TARGETS))
  parser.add_argument('--dtype', default='bfloat16')
  parser.add_argument('--batch', type=int, default=512)
  parser.add_argument('--nf', type=int, default=128)
  parser.add_argument('--variant', default='base', help="'base' or config overrides 'a.b=v,c.d=w'")
  parser.add_argument('--top', type=int, default=20)
  parser.add_argument('--hlo', default=None, help='also write the optimized HLO text here (gzipped)')
  parser.add_argument('--preflight', nargs='?', const='', default=None, metavar='NAME_PART',
                      help="compile every program of bench/device_run.sh (or those whose name contains NAME_PART)")
  args = parser.parse_args()
  from models import layers
  # The programs are for a GPU; this host's backend is the CPU: make the model's GPU choices.
  host_check = layers.check_attention
  layers.check_attention = lambda a: a if a in layers.ATTENTION else host_check(a)  # unknown names still fail
  layers.for_xla_gpu = lambda: True
  if args.preflight is not None:
    sys.exit(0 if preflight(args.target, args.preflight) else 1)
  fn, state, batches = train_throughput.build_step(args.dtype, args.batch, 1, nf=args.nf, variant=args.variant)
  _, compiled = compile_for(args.target, fn, state, batches)
  text = compiled.as_text()
  if args.hlo:
    with gzip.open(args.hlo, 'wt') as f:
      f.write(text)
  try:  # the FLOPs of the program as written, lowered for the host (the device-less lowering has no cost analysis)
    cost = fn.lower(state, batches).cost_analysis()
    flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost).get('flops', 0.0))
  except Exception:  # noqa: BLE001 (a GPU-only kernel, e.g. Pallas / Triton attention, has no host lowering)
    flops = None
  _, bandwidth, peak = TARGETS[args.target]
  print(json.dumps({'target': args.target, 'dtype': args.dtype, 'batch': args.batch, 'variant': args.variant,
                    **summarize(kernels(text), bandwidth, flops, peak, args.top)}))


if __name__ == '__main__':
  main()
