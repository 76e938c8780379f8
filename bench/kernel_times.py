"""Device times of a program's kernels without a profiler: XLA:GPU's autotuning results, matched to the compiled
program.

The lent GPUs' traces held no kernel events (2026-12-04, an H200 under gVisor), so no profile has said where a
training step's time goes. But while compiling, XLA:GPU's autotuner looks up each cuDNN convolution, each GEMM and,
with its fusion autotuner, most fusions (1,545 of the 1,592 kernels of the batch-128 bf16 step for the H200
description, counted from XLA's log of a deviceless compile), times on the device the candidates of those it must
choose for, and `--xla_gpu_dump_autotune_results_to=FILE.textproto` (bench/device_run.sh sets it for each step)
writes each distinct instruction's choice with its measured run time. This matches those entries to the kernels of
the compiled program (`train_throughput.py --dump_hlo`, `sample_throughput.py --dump_hlo`), sums them over the
program's launches, and sets the sum against the measured step: what the convolutions, GEMMs and fusions take (and
the TFLOP/s of those with FLOPs), the untimed kernels' bytes at the memory bandwidth (a lower bound), and the rest
(launch gaps, or kernels slower in the step than alone).

Matching: an entry's key is XLA's canonical text of the instruction (a library call) or of its fused computation
(AutotuneCacheKey); a library call matches by kind, shapes with layouts, window and identifying config fields, a
fusion by its computation written the same way (constants' values left out), else, for a GEMM fusion XLA rewrote
after autotuning, by its parameter, root and dot shapes, else by its parameter and root shapes and operations (for
another XLA version's printing). tests/fixtures/xla_gpu_autotune_keys.json.gz holds XLA's own keys of a small step
to check this against.

Limits: a run time is XLA's measurement of the kernel alone, warm, on its own buffers (the step's own launch may
differ, e.g. with a cold L2); an entry measured once stands for every launch of its key (entries that share a key
are averaged, `ambiguous`); an instruction XLA did not have to choose for may carry no time; entries the program no
longer holds (e.g. a GEMM fusion then handed to cuBLAS) are left over. The kernels are those one run of the program
launches: those of command buffers (CUDA graphs) the HLO shows are counted and `graph_kernels` says how many (XLA
versions that form graphs from the thunk sequence leave no trace in the HLO), a loop body's once per iteration
(several steps per call); every figure is per run of the program (per call).

  python bench/kernel_times.py AUTOTUNE.textproto [...] --hlo PROGRAM.hlo.txt.gz [--call_ms 64.9]
      [--target h200] [--top 15]
  python bench/kernel_times.py --run OUT_DIR [--target h200]   # every program of a device_run.sh call

--run reads what a bench/device_run.sh call returned (its autotune_*.textproto, hlo.tar and hlo_graphs.tar, and the
*.log rows) and prints one line per program that has a timed row: the training steps (those of the `graphs` step,
run with command buffers, as graphs/<row>) and the forward rows (the other programs' entries in the same files
count as unmatched). A program compiled here for the GPU description (bench/gpu_program.py --hlo, e.g. a variant
not yet run) can be read against a device run's entries the same way: its unchanged kernels get their device
times, the new ones their bytes at bandwidth.
"""

import argparse
import collections
import functools
import gzip
import json
import math
import os
import re
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import gpu_program  # noqa: E402

# An array shape with its layout as XLA prints it: bf16[128,32,32,128]{3,2,1,0}, f32[] (scalars may have no layout).
_SHAPE = r'(?:pred|[suf]\d+|bf16|f8e\w+)\[[\d,]*\](?:\{[^}]*\})?'
_SCRATCH = re.compile(r'^[us]8\[\d+\]\{0\}$')  # a library call's workspace, sized by the algorithm it chose
_CONV = {  # cuDNN convolution target -> where (input, filter, output) are: an operand index or 'result'
    '__cudnn$convForward': (0, 1, 'result'), '__cudnn$convBiasActivationForward': (0, 1, 'result'),
    '__cudnn$convBackwardInput': ('result', 1, 0), '__cudnn$convBackwardFilter': (0, 'result', 1)}
# backend_config fields that tell apart library calls of the same shapes (the chosen algorithm is not one of them:
# the key is taken before autotuning)
_CONFIG_KEYS = ('activation_mode', 'conv_result_scale', 'side_input_scale', 'leakyrelu_alpha', 'epilogue',
                'alpha_real', 'alpha_imag', 'beta', 'lhs_contracting_dimensions', 'rhs_contracting_dimensions',
                'lhs_batch_dimensions', 'rhs_batch_dimensions')


@functools.cache
def _results_class():
  """A protobuf class for XLA's AutotuneResults text format, with only the fields read here (the rest are skipped):
  version, results { device hlo result { run_time, scratch_bytes, which backend } }."""
  from google.protobuf import descriptor_pb2, descriptor_pool, duration_pb2, message_factory
  fd = descriptor_pb2.FieldDescriptorProto
  file = descriptor_pb2.FileDescriptorProto(name='bench_autotune.proto', package='bench_autotune', syntax='proto3',
                                            dependency=['google/protobuf/duration.proto'])

  def message(name, *fields):
    m = file.message_type.add(name=name)
    for number, (field, kind, label) in enumerate(fields, 1):
      type_name = kind if kind.startswith('.') else None
      m.field.add(name=field, number=number, label=label or fd.LABEL_OPTIONAL,
                  type=fd.TYPE_MESSAGE if type_name else getattr(fd, kind), type_name=type_name)

  message('Any')  # a backend's config: only its presence is read
  message('Other', ('name', 'TYPE_STRING', None))
  backends = ('conv', 'gemm', 'triton', 'cuda_conv_plan', 'custom_kernel_fusion', 'algorithm', 'failure')
  message('Result', ('scratch_bytes', 'TYPE_INT64', None), ('run_time', '.google.protobuf.Duration', None),
          ('other', '.bench_autotune.Other', None), *((b, '.bench_autotune.Any', None) for b in backends))
  message('Entry', ('device', 'TYPE_STRING', None), ('hlo', 'TYPE_STRING', None),
          ('result', '.bench_autotune.Result', None), ('version', 'TYPE_INT32', None))
  message('Results', ('version', 'TYPE_INT32', None), ('results', '.bench_autotune.Entry', fd.LABEL_REPEATED))
  pool = descriptor_pool.DescriptorPool()
  pool.AddSerializedFile(duration_pb2.DESCRIPTOR.serialized_pb)
  pool.Add(file)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName('bench_autotune.Results'))


def read_results(text: str) -> list[dict]:
  """The entries of an autotune results file (text format): hlo (the instruction's canonical text), device,
  run_ms, backend ('algorithm' for cuDNN, 'gemm' for cuBLAS, 'triton', or other's name), failed."""
  from google.protobuf import text_format
  results = _results_class()()
  text_format.Parse(text, results, allow_unknown_field=True)
  out = []
  for e in results.results:
    r = e.result
    backend = next((b for b in ('algorithm', 'conv', 'cuda_conv_plan', 'gemm', 'triton', 'custom_kernel_fusion')
                    if r.HasField(b)), r.other.name or '?')
    out.append({'hlo': e.hlo, 'device': e.device, 'run_ms': r.run_time.ToNanoseconds() / 1e6, 'backend': backend,
                'failed': r.HasField('failure')})
  return out


def _shapes(text: str) -> list[str]:
  return re.findall(_SHAPE, text)


def _dims(shape: str) -> list[int]:
  return [int(d) for d in shape[shape.index('[') + 1:shape.index(']')].split(',') if d]


def _config(text: str) -> tuple:
  """The identifying backend_config fields in `text` (JSON as XLA prints it; order-free)."""
  found = re.findall(r'"(%s)":("[^"]*"|\[[^\]]*\]|[-\d.e]+)' % '|'.join(_CONFIG_KEYS), text)
  return tuple(sorted(found))


def _attr(name: str, text: str) -> str:
  m = re.search(rf'\b{name}=(\{{[^}}]*\}}|[\w\->]+)', text)
  return m.group(1) if m else ''


def call_signature(result: str, operands: list[str], attrs: str) -> tuple:
  """What identifies a library call across the autotune key and the compiled program: kind, shapes with layouts
  (the workspace left out), window, dimension labels, feature groups and the identifying config fields (the key is
  taken before autotuning, so the chosen algorithm and its workspace are not in it)."""
  target = re.search(r'custom_call_target="([^"]+)"', attrs).group(1)
  return ('call', target, tuple(s for s in _shapes(result) if not _SCRATCH.match(s)), tuple(operands),
          _attr('window', attrs), _attr('dim_labels', attrs), _attr('feature_group_count', attrs), _config(attrs))


_LINE = re.compile(r'^\s*(ROOT\s+)?%?([\w.\-]+) = (\(.*?\)|\S+) ([a-z][\w\-]*)\((.*?)\)(, .*)?$')
# XLA prints only "essential" constants' values in keys ({...} for the others): values are left out on both sides
_CONSTANT = re.compile(r' constant\(.*?\)(?=, [a-z_]+=|$)', re.M)


def canonical_fusion(lines: list[str]) -> str:
  """A fused computation of the compiled program written as XLA's autotuning keys write it (AutotuneCacheKey:
  instructions renamed tmp_<i> in order, operands with their shapes, no metadata, backend configs or called
  computations), constants' values left out."""
  names, shapes, out = {}, {}, []
  for line in lines:
    m = _LINE.match(line)
    if not m:
      continue
    root, name, result, op, args, attrs = m.groups()
    operands = re.findall(r'%([\w.\-]+)', args)
    args = ', '.join(f'{shapes[o]} {names[o]}' for o in operands) if operands else args
    attrs = re.sub(r', (metadata|backend_config)=\{.*?\}(?=, [a-z_]+=|$)', '', attrs or '')
    attrs = re.sub(r', (to_apply|calls)=%[\w.\-]+', '', attrs)
    names[name], shapes[name] = f'tmp_{len(names)}', result
    out.append(f"  {'ROOT ' if root else ''}{names[name]} = {result} {op}({args}){attrs}")
  return _CONSTANT.sub(' constant(C)', '{\n' + '\n'.join(out) + '\n}')


def _computation(lines: list[str]) -> tuple[dict, float | None]:
  """({'loose': ..., 'shape': ...} keys, FLOPs of its dots) of a fused computation's lines, in the program's form
  (operands named) or a key's (operands written with their shapes). The loose key of a GEMM fusion (parameter,
  root and dot shapes, dot dimensions) still matches after XLA rewrote its inside once autotuned; the shape key of
  any fusion (parameter and root shapes, its operations counted) matches where the exact text does not (another
  XLA version's printing), at the price of joining fusions that differ only in how the same operations connect."""
  parameters, shapes, root, dots, flops, ops = {}, {}, '', [], 0.0, collections.Counter()
  for line in lines:
    m = _LINE.match(line)
    if not m:
      continue
    is_root, name, result, op, args, attrs = m.groups()
    shapes[name] = result
    ops[op] += 1
    if op == 'parameter':
      parameters[int(args)] = result
    if is_root:
      root = result
    if op == 'dot':
      lhs = _shapes(args)[:1] or [shapes.get(re.findall(r'%?([\w.\-]+)', args)[0], '')]
      contracting = [int(c) for c in _attr('lhs_contracting_dims', attrs or '').strip('{}').split(',') if c]
      flops += 2 * math.prod(_dims(result)) * math.prod(_dims(lhs[0])[c] for c in contracting)
      dots.append((result, *(_attr(f'{side}_{kind}_dims', attrs or '') for side in ('lhs', 'rhs')
                             for kind in ('batch', 'contracting'))))
  inputs = tuple(parameters[i] for i in sorted(parameters))
  return {'loose': ('gemm fusion', inputs, root, tuple(dots)) if dots else None,
          'shape': ('fusion', inputs, root, tuple(sorted(ops.items())))}, flops or None


def call_flops(target: str, result: str, operands: list[str], attrs: str) -> float | None:
  """Multiply-adds x 2 of a cuDNN convolution (from its input / filter / output geometry) or a cuBLAS GEMM."""
  results = [s for s in _shapes(result) if not _SCRATCH.match(s)]
  pick = lambda where: results[0] if where == 'result' else operands[where]
  if target in _CONV:
    _, filt, out = (pick(w) for w in _CONV[target])
    labels = _attr('dim_labels', attrs)  # e.g. b01f_o01i->b01f: input, filter, output dimension labels
    out_features = _dims(filt)[labels.split('_')[1].split('->')[0].index('o')]
    return 2.0 * math.prod(_dims(out)) * math.prod(_dims(filt)) / out_features
  contracting = [int(c) for c in re.findall(r'\d+', dict(_config(attrs)).get('lhs_contracting_dimensions', ''))]
  if target.startswith('__cublas') and contracting:
    return 2.0 * math.prod(_dims(results[0])) * math.prod(_dims(operands[0])[c] for c in contracting)
  return None


def key_match(hlo: str) -> dict:
  """The keys (exact, loose, shape; None where a level does not apply) of an autotune entry's canonical instruction
  text: a fusion's computation (constants' values left out), a library call's signature."""
  if hlo.lstrip().startswith('{'):  # a fusion: its computation, operands written as 'shape tmp_i'
    keys, _ = _computation(hlo.strip().strip('{}').splitlines())
    return {'exact': _CONSTANT.sub(' constant(C)', hlo.strip()), **keys}
  m = re.match(r'^(\(.*?\)|\S+) custom-call\((.*?)\)(, .*)?$', hlo.strip(), re.S)
  exact = call_signature(m.group(1), _shapes(m.group(2)), m.group(3) or '') if m else ('unparsed', hlo)
  return {'exact': exact, 'loose': None, 'shape': None}


def program_kernels(hlo_text: str) -> list[dict]:
  """The kernels one run of the program launches (gpu_program.kernels(launched=True): command buffers' kernels
  included, a loop body's once per iteration) with, for library calls and fusions, the keys their autotune entries
  match (`keys`: exact, loose, shape), their shapes and FLOPs."""
  kernels = gpu_program.kernels(hlo_text, launched=True)
  strip = lambda shapes: ', '.join(re.sub(r'\{[^}]*\}', '', s) for s in shapes if not _SCRATCH.match(s))

  @functools.cache
  def fusion(computation: str) -> tuple[dict, float | None]:  # a loop body's fusions recur once per iteration
    lines = gpu_program._instructions(hlo_text, computation).splitlines()
    keys, flops = _computation(lines)
    return {'exact': canonical_fusion(lines), **keys}, flops

  for k in kernels:
    op, result, operands, attrs = k['op'], k['result'], k['operands'], k['attrs']
    if op == 'custom-call':
      target = re.search(r'custom_call_target="([^"]+)"', attrs).group(1)
      k.update(keys={'exact': call_signature(result, operands, attrs), 'loose': None, 'shape': None},
               flops=call_flops(target, result, operands, attrs))
    elif op == 'fusion':
      keys, flops = fusion(re.search(r'calls=%([\w.\-]+)', attrs).group(1))
      k.update(keys=keys, flops=flops)
    else:
      continue
    k['shapes'] = f'{strip(operands)} -> {strip(_shapes(result))}'
  return kernels


def attribute(kernels: list[dict], entries: list[dict]) -> dict:
  """Each kernel's measured run time (ms, `run_ms`) from the entries of its exact key, else of its loose key (a
  GEMM fusion rewritten after autotuning), else of its shape key (`match` says which); several entries for one key
  are averaged (`ambiguous`). Returns the count of entries no kernel matched."""
  index = collections.defaultdict(list)
  for i, e in enumerate(entries):
    if not e['failed'] and e['run_ms'] > 0:
      for how, key in key_match(e['hlo']).items():
        if key is not None:
          index[how, key].append(i)
  used = set()
  for k in kernels:
    for how in ('exact', 'loose', 'shape'):
      key = k.get('keys', {}).get(how)
      matched = index.get((how, key), []) if key is not None else []
      if matched:
        k.update(run_ms=sum(entries[i]['run_ms'] for i in matched) / len(matched), match=how,
                 backend='/'.join(sorted({entries[i]['backend'] for i in matched})), ambiguous=len(matched) > 1)
        used.update(matched)
        break
  valid = {i for ids in index.values() for i in ids}
  return {'unmatched_entries': len(valid - used)}


def summarize(kernels: list[dict], leftover: dict, bandwidth: float, call_ms: float | None, top: int) -> dict:
  """Measured time per kernel kind (with the TFLOP/s of those with FLOPs), the untimed kernels' bytes at bandwidth,
  the rest of the measured run (call_ms), and the slowest kernels."""
  timed = [k for k in kernels if 'run_ms' in k]
  untimed = [k for k in kernels if 'run_ms' not in k]
  per_kind = collections.defaultdict(lambda: {'kernels': 0, 'ms': 0.0, 'gflop': 0.0, 'gb': 0.0})
  for k in timed:
    row = per_kind[k['kind']]
    row['kernels'] += 1
    row['ms'] += k['run_ms']
    row['gflop'] += (k.get('flops') or 0) / 1e9
    row['gb'] += k['bytes'] / 1e9
  for row in per_kind.values():
    row['tflop_per_s'] = round(row['gflop'] / row['ms'], 1) if row['ms'] else None
    row.update(ms=round(row['ms'], 3), gflop=round(row['gflop'], 1), gb=round(row['gb'], 3))
  timed_ms = sum(k['run_ms'] for k in timed)
  untimed_gb = sum(k['bytes'] for k in untimed) / 1e9
  out = {'kernels': len(kernels), 'graph_kernels': sum('graph' in k for k in kernels), 'timed_kernels': len(timed),
         'timed_ms': round(timed_ms, 3),
         'ambiguous_kernels': sum(k['ambiguous'] for k in timed),
         'matched_by': dict(collections.Counter(k['match'] for k in timed)), **leftover,
         'per_kind': dict(sorted(per_kind.items(), key=lambda kv: -kv[1]['ms'])),
         'other_kernels': len(untimed), 'other_gb': round(untimed_gb, 3),
         'other_ms_at_bandwidth': round(untimed_gb * 1e9 / bandwidth * 1e3, 3)}
  if call_ms is not None:  # what neither the timed kernels nor the others' traffic at full bandwidth account for
    out['call_ms'] = call_ms
    out['rest_ms'] = round(call_ms - timed_ms - out['other_ms_at_bandwidth'], 3)
  out['top'] = [{'name': k['name'], 'kind': k['kind'], 'shapes': k['shapes'],
                 'backend': k['backend'], 'ms': round(k['run_ms'], 4),
                 'tflop_per_s': round(k['flops'] / k['run_ms'] / 1e9, 1) if k.get('flops') else None,
                 'gb_per_s': round(k['bytes'] / k['run_ms'] / 1e6, 1), 'origin': k['origin']}
                for k in sorted(timed, key=lambda k: -k['run_ms'])[:top]]
  return out


_PREFIX = {'graphs.log': 'graphs/', 'hlo_graphs.tar': 'graphs/'}  # device_run.sh's graphs step


def run_rows(folder: str) -> tuple[list[dict], dict[str, str], dict[str, tuple[float, int]]]:
  """(autotune entries, program name -> HLO text, program name -> (measured ms per call, steps per call)) of a
  device_run.sh call's output folder: the training rows and the forward rows, named as their programs
  (train_throughput / sample_throughput.row_name), those of the `graphs` step (run under command-buffer flags,
  returned in hlo_graphs.tar) prefixed 'graphs/'."""
  from bench import sample_throughput, train_throughput
  entries, programs, times = [], {}, {}
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if name.startswith('autotune_') and name.endswith('.textproto'):
      with open(path) as f:
        entries += read_results(f.read())
    elif name.startswith('hlo') and name.endswith('.tar'):
      with tarfile.open(path) as tar:
        for member in tar.getmembers():
          if member.name.endswith('.hlo.txt.gz'):
            program = _PREFIX.get(name, '') + os.path.basename(member.name)[:-len('.hlo.txt.gz')]
            programs[program] = gzip.decompress(tar.extractfile(member).read()).decode()
    elif name.endswith('.log'):
      pre = _PREFIX.get(name, '')
      with open(path) as f:
        for line in f:
          row = json.loads(line) if line.startswith('{') else {}
          dtype = row.get('impl', '?').split()[-1]  # 'ours jax bfloat16'
          if row.get('what') == 'train' and 'steps_per_call' in row:  # ours (the peer's rows have no such field)
            k = row['steps_per_call']
            times[pre + train_throughput.row_name(dtype, row['batch'], k, row['variant'])] = (row['step_ms'] * k, k)
          elif row.get('what') in ('denoiser_forward', 'denoiser_forward_cast_once'):
            times[pre + sample_throughput.row_name(row['network'], dtype, row['what'])] = (row['ms'], 1)
  return entries, programs, times


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('autotune', nargs='*', help='autotune results files (text format) of the device run')
  parser.add_argument('--hlo', help="the compiled program's HLO text (.hlo.txt or .hlo.txt.gz)")
  parser.add_argument('--run', help="a device_run.sh call's output folder: every program with a timed row")
  parser.add_argument('--call_ms', type=float, default=None, help='the measured time of one run of the program')
  parser.add_argument('--target', default='h200', choices=sorted(gpu_program.TARGETS), help='for the bandwidth')
  parser.add_argument('--top', type=int, default=15)
  args = parser.parse_args()
  bandwidth = gpu_program.TARGETS[args.target][1]
  if args.run:
    entries, programs, times = run_rows(args.run)
    for name in sorted(set(programs) & set(times)):
      kernels = program_kernels(programs[name])
      leftover = attribute(kernels, entries)
      call_ms, steps = times[name]
      print(json.dumps({'program': name, 'steps_per_call': steps, 'entries': len(entries),
                        **summarize(kernels, leftover, bandwidth, call_ms, args.top)}))
    return
  if not (args.autotune and args.hlo):
    parser.error('give autotune files and --hlo, or --run')
  entries = []
  for path in args.autotune:
    with open(path) as f:
      entries += read_results(f.read())
  with (gzip.open if args.hlo.endswith('.gz') else open)(args.hlo, 'rt') as f:
    kernels = program_kernels(f.read())
  leftover = attribute(kernels, entries)
  print(json.dumps({'hlo': os.path.basename(args.hlo), 'entries': len(entries),
                    'devices': sorted({e['device'] for e in entries}),
                    **summarize(kernels, leftover, bandwidth, args.call_ms, args.top)}))


if __name__ == '__main__':
  main()
