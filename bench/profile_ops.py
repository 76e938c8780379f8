"""Where a compiled program's device time goes: a jax.profiler trace summarized per XLA op, without TensorBoard.

`profile(call, calls, logdir, hlo_text)` traces `calls` calls of a compiled step and returns the device time per
call, its split over op kinds (convolution, matmul, attention, reduction / elementwise fusions, copies) and the
top ops with their time per call, share, kind and the JAX operation they come from. It also says whether the step
is bound by launching its kernels rather than running them: the kernels launched per call, the time from the
first kernel's start to the last one's end and the share of it in which no kernel ran (idle_share), and how many
kernels ran under 5 microseconds and for how long in all (short_ops). The trace (an XSpace that
jax.profiler writes) is read with jax.profiler.ProfileData: on a GPU the op events of the '/device:GPU:N' plane's
'XLA Ops' line, on the CPU the host events that carry an hlo_op (the CPU is for testing this code). Kinds come
from the optimized HLO text of the program (`compiled.as_text()`): an op's own line and, for a fusion, the
instructions of its fused computation.

  python bench/profile_ops.py <logdir> [--calls N] [--top 25]   # a trace written before (kinds from op names)
"""

import argparse
import collections
import glob
import json
import os
import re

import jax

_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$')
_COMPUTATION = re.compile(r'^%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def parse_hlo(text: str) -> tuple[dict[str, str], dict[str, str]]:
  """(instruction name -> its line, computation name -> its body) of an HLO module's text."""
  lines, bodies, current = {}, {}, None
  for line in text.splitlines():
    if current is None:
      m = _COMPUTATION.match(line) or (re.match(r'^ENTRY\s+%?([\w.\-]+)', line) if line.startswith('ENTRY') else None)
      if m:
        current, bodies[m.group(1)] = m.group(1), ''
      continue
    if line.strip() == '}':
      current = None
      continue
    bodies[current] += line + '\n'
    m = _INSTRUCTION.match(line)
    if m:
      lines[m.group(1)] = m.group(2)
  return lines, bodies


def kind_of(name: str, line: str, body: str) -> str:
  """The kind of an op from its name, its HLO line and (a fusion's) fused computation."""
  text = f'{name} {line} {body}'
  if re.search(r'fmha|flash_attention|dot_product_attention|\bmha_(?:forward|backward|preprocess)', text, re.I):
    return 'attention'
  if re.search(r'\bconvolution\(|cudnn\$conv|convForward|convBackward', text):
    return 'convolution'
  if re.search(r'\bdot\(|__cublas|gemm', text):
    return 'matmul'
  if re.search(r'\breduce\(|\breduce-window\(', text):
    return 'reduction'
  if re.search(r'\bthreefry|\brng', text):
    return 'random bits'
  if re.match(r'(copy|transpose)', name) or re.search(r'\b(copy|transpose)\(', line):
    return 'copy / transpose'
  if re.search(r'\bfusion\(|\bfusion', f'{name} {line}'):
    return 'elementwise fusion'
  return 'other'


SHORT_NS = 5_000  # a kernel under 5 us costs about what launching it does


def _op_events(data: 'jax.profiler.ProfileData'):
  """(op name, start ns, duration ns) of every XLA op event: the devices' 'XLA Ops' lines, else host events
  with an hlo_op."""
  lines = [line for p in data.planes if p.name.startswith('/device:') for line in p.lines if line.name == 'XLA Ops']
  if lines:
    for line in lines:
      for event in line.events:
        yield event.name, event.start_ns, event.duration_ns
    return
  for plane in data.planes:
    if plane.name == '/host:CPU':
      for line in plane.lines:
        for event in line.events:
          if any(k == 'hlo_op' for k, _ in event.stats):
            yield event.name, event.start_ns, event.duration_ns


def busy_and_span(intervals: list[tuple[int, int]]) -> tuple[int, int]:
  """(ns in which at least one interval runs, ns from the first start to the last end) of (start, end) pairs."""
  if not intervals:
    return 0, 0
  intervals = sorted(intervals)
  busy, (lo, hi) = 0, intervals[0]
  for start, end in intervals[1:]:
    if start > hi:
      busy, lo, hi = busy + hi - lo, start, end
    else:
      hi = max(hi, end)
  return busy + hi - lo, max(e for _, e in intervals) - intervals[0][0]


def summarize(logdir: str, calls: int, top: int = 25, hlo_text: str = '') -> dict:
  """The summary of the newest trace under logdir, per call of the traced function."""
  files = sorted(glob.glob(os.path.join(logdir, '**', '*.xplane.pb'), recursive=True), key=os.path.getmtime)
  if not files:
    raise FileNotFoundError(f'no *.xplane.pb under {logdir}')
  per_op = collections.Counter()
  intervals, short = [], [0, 0]
  data = jax.profiler.ProfileData.from_file(files[-1])
  for name, start, ns in _op_events(data):
    per_op[name] += ns
    intervals.append((start, start + ns))
    if ns < SHORT_NS:
      short[0], short[1] = short[0] + 1, short[1] + ns
  if not per_op:  # e.g. no GPU activity was recorded (the H200 trace of 2026-12-04): say what the trace holds
    raise ValueError('no XLA op events in the trace; planes and lines: ' + '; '.join(
        f"{p.name}: {','.join(line.name for line in p.lines)}" for p in data.planes))
  busy, span = busy_and_span(intervals)
  lines, bodies = parse_hlo(hlo_text)

  def describe(name: str) -> tuple[str, str]:
    line = lines.get(name, '')
    called = _CALLS.search(line)
    body = bodies.get(called.group(1), '') if called else ''
    origin = _OP_NAME.search(line) or _OP_NAME.search(body)
    return kind_of(name, line, body), origin.group(1) if origin else ''

  total = sum(per_op.values())
  kinds = collections.Counter()
  for name, ns in per_op.items():
    kinds[describe(name)[0]] += ns
  ms = lambda ns: round(ns / 1e6 / calls, 3)
  share = lambda ns: round(ns / total, 4) if total else 0.0
  rows = []
  for name, ns in per_op.most_common(top):
    kind, origin = describe(name)
    rows.append({'op': name, 'kind': kind, 'ms': ms(ns), 'share': share(ns), 'from': origin[-120:]})
  return dict(trace=files[-1], ops=len(per_op), launches_per_call=round(len(intervals) / calls, 1),
              device_ms_per_call=ms(total), span_ms_per_call=ms(span),
              idle_share=round(1 - busy / span, 4) if span else 0.0,
              short_ops={'under_us': SHORT_NS // 1000, 'per_call': round(short[0] / calls, 1), 'ms': ms(short[1])},
              kinds={k: {'ms': ms(v), 'share': share(v)} for k, v in kinds.most_common()}, top=rows)


def profile(call, calls: int, logdir: str, hlo_text: str = '', top: int = 25) -> dict:
  """Traces `calls` calls of call() (a compiled, warmed-up step that returns what to wait for) and summarizes."""
  with jax.profiler.trace(logdir):
    for _ in range(calls):
      out = call()
    jax.block_until_ready(out)
  return summarize(logdir, calls, top, hlo_text)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('logdir')
  parser.add_argument('--calls', type=int, default=1, help='calls of the traced function in the trace')
  parser.add_argument('--top', type=int, default=25)
  args = parser.parse_args()
  print(json.dumps(summarize(args.logdir, args.calls, args.top)))


if __name__ == '__main__':
  main()
