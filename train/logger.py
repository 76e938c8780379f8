"""Training logs: TensorBoard scalars, a metrics.jsonl file, and a console progress bar.

Only process 0 writes, so multi-host runs log once.
"""

import json
import os
import sys
import time

import jax
from tensorboardX import SummaryWriter
from tqdm import tqdm


class Logger:

  def __init__(self, workdir: str, total_steps: int, start_step: int, progress_bar: bool = True):
    self.active = jax.process_index() == 0
    self._writer = SummaryWriter(os.path.join(workdir, 'tb')) if self.active else None
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a') if self.active else None
    self._bar = tqdm(total=total_steps, initial=start_step, disable=not (self.active and progress_bar),
                     dynamic_ncols=True, file=sys.stderr, unit='step')
    self._last = (start_step, time.perf_counter())

  def scalars(self, step: int, metrics: dict[str, float]) -> None:
    now = time.perf_counter()
    steps_per_s = (step - self._last[0]) / max(now - self._last[1], 1e-9)
    self._last = (step, now)
    metrics = dict(metrics, steps_per_s=steps_per_s)
    if not self.active:
      return
    for k, v in metrics.items():
      self._writer.add_scalar(k, v, step)
    self._jsonl.write(json.dumps({'step': step, **metrics}) + '\n')
    self._jsonl.flush()
    self._bar.set_postfix(loss=f'{metrics["loss"]:.4f}', steps_per_s=f'{steps_per_s:.2f}')

  def advance(self, n: int) -> None:
    self._bar.update(n)

  def info(self, msg: str) -> None:
    if self.active:
      self._bar.write(msg, file=sys.stderr)

  def close(self) -> None:
    self._bar.close()
    if self.active:
      self._writer.close()
      self._jsonl.close()
