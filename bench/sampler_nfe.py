"""Sample quality against NFE for every sampler, with the exact score of a Gaussian mixture (no training).

The test bed is a 4-component mixture of anisotropic Gaussians on 4x4x1 "images" (diffusion/exact_score.py);
the exact model isolates each sampler's own discretization error. For every sampler and NFE budget it
reports the sliced Wasserstein distance to fresh target samples and the total-variation error of the
component weights, writes bench/results/sampler_nfe.{json,md,png}, and prints the markdown table.

Rows marked "tuned steps" first fit their time grid (samplers/step_schedule.py) to a 200-step DPM-Solver++ 3M
teacher on 2,048 prior draws of a different seed, then are measured like every other row (fresh noise, fresh
target samples); they run at NFE <= 20, where the grid matters.

  python bench/sampler_nfe.py [--n 50000] [--process vp] [--samplers 'UniPC bh2 (order 2),DDPM ancestral']
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataclasses  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from diffusion import processes  # noqa: E402
from diffusion.exact_score import GaussianMixture  # noqa: E402
from samplers import get_sampler  # noqa: E402
from samplers.step_schedule import TuneSettings, tune_timesteps  # noqa: E402

NFES = (5, 10, 20, 50, 100, 1000)
TUNED_NFES = (5, 10, 20)
TEACHER = ('dpm_solver', {'order': 3, 'spacing': 'logsnr', 'num_steps': 200})
TUNE = TuneSettings(num_iters=200, lr=0.05)
TUNE_BATCH = 2048
# name -> (sampler, options, steps for an NFE budget)
SAMPLERS = {
    'DDPM ancestral': ('ddpm', {}, lambda n: n),
    'DDIM (eta=0)': ('ddim', {'spacing': 'logsnr'}, lambda n: n),
    'PC (reverse diffusion + Langevin)': ('pc', {}, lambda n: (n + 1) // 2),
    'PF-ODE Heun': ('ode', {'ode_method': 'heun', 'spacing': 'logsnr'}, lambda n: (n + 1) // 2),
    'DPM-Solver++ 2M': ('dpm_solver', {'order': 2, 'spacing': 'logsnr'}, lambda n: n),
    'DPM-Solver++ 3M': ('dpm_solver', {'order': 3, 'spacing': 'logsnr'}, lambda n: n),
    'EDM Heun': ('heun', {}, lambda n: (n + 1) // 2),
    'UniPC bh2 (order 2)': ('unipc', {'order': 2, 'unipc_variant': 'bh2', 'spacing': 'logsnr'}, lambda n: n),
    'UniPC bh2 (order 3)': ('unipc', {'order': 3, 'unipc_variant': 'bh2', 'spacing': 'logsnr'}, lambda n: n),
    'UniPC bh1 (order 2)': ('unipc', {'order': 2, 'unipc_variant': 'bh1', 'spacing': 'logsnr'}, lambda n: n),
    'DPM-Solver++ 3M (tuned steps)': ('dpm_solver', {'order': 3, 'spacing': 'logsnr'}, lambda n: n),
    'UniPC bh2 (order 2; tuned steps)': ('unipc', {'order': 2, 'unipc_variant': 'bh2', 'spacing': 'logsnr'},
                                         lambda n: n),
    'DDIM (eta=0; tuned steps)': ('ddim', {'spacing': 'logsnr'}, lambda n: n),
}


def sliced_wasserstein(a, b, n_proj=128, seed=0):
  dirs = np.random.default_rng(seed).normal(size=(a.shape[1], n_proj))
  dirs /= np.linalg.norm(dirs, axis=0)
  return float(np.mean(np.abs(np.sort(a @ dirs, 0) - np.sort(b @ dirs, 0))))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--n', type=int, default=50_000, help='samples per run (SW noise falls as 1/sqrt(n))')
  parser.add_argument('--process', default='vp')
  parser.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results'))
  parser.add_argument('--samplers', default='', help='comma-separated row labels to run (default: all)')
  args = parser.parse_args()
  labels = [l.strip() for l in args.samplers.split(',') if l.strip()] or list(SAMPLERS)
  unknown = sorted(set(labels) - set(SAMPLERS))
  if unknown:
    parser.error(f'unknown samplers {unknown}; choose from {list(SAMPLERS)}')
  process = processes.get_process(args.process)
  mixture = GaussianMixture.random(jax.random.key(0), 4, (4, 4, 1), mean_scale=0.8, std_range=(0.05, 0.25))
  target, _ = mixture.sample(jax.random.key(1), args.n)
  target = np.asarray(target).reshape(args.n, -1)
  floor = sliced_wasserstein(target, np.asarray(mixture.sample(jax.random.key(2), args.n)[0]).reshape(args.n, -1))
  weights = np.asarray(mixture.weights)

  rows = []
  model_fn = mixture.model_fn(process)
  for label in labels:
    name, options, steps_for = SAMPLERS[label]
    tuned = 'tuned steps' in label
    for nfe_budget in TUNED_NFES if tuned else NFES:
      steps = max(steps_for(nfe_budget), 2)
      settings, fn = get_sampler(name, num_steps=steps, **options)
      extra = {}
      if tuned:
        teacher_settings, teacher_fn = get_sampler(TEACHER[0], **TEACHER[1])
        start = time.perf_counter()
        result = tune_timesteps(jax.random.key(100), model_fn, process, (TUNE_BATCH, 4, 4, 1), fn, settings,
                                teacher_fn, teacher_settings, TUNE)
        settings = dataclasses.replace(settings, timesteps=result.timesteps)
        extra = dict(timesteps=[round(t, 6) for t in result.timesteps], tune_seconds=time.perf_counter() - start,
                     tune_mse=[result.initial_loss, result.loss])
      run = jax.jit(lambda r: fn(r, model_fn, process, (args.n, 4, 4, 1), settings))
      x, nfe = run(jax.random.key(3))
      x = np.asarray(x).reshape(args.n, -1)
      freq = np.bincount(np.asarray(mixture.component_posterior(x.reshape(args.n, 4, 4, 1))).argmax(-1), minlength=4)
      rows.append(dict(sampler=label, budget=nfe_budget, nfe=int(nfe), steps=steps, sw=sliced_wasserstein(x, target),
                       weight_tv=0.5 * float(np.abs(freq / args.n - weights).sum()), **extra))
      print(json.dumps(rows[-1]), flush=True)

  os.makedirs(args.out, exist_ok=True)
  ref = next((r['sw'] for r in rows if r['sampler'] == 'DDPM ancestral' and r['steps'] == 1000), float('nan'))
  with open(os.path.join(args.out, 'sampler_nfe.json'), 'w') as f:
    json.dump({'process': args.process, 'n': args.n, 'noise_floor_sw': floor, 'rows': rows}, f, indent=1)
  lines = [f'Sliced Wasserstein distance to the target ({args.process}, {args.n} samples; two target draws differ by '
           f'{floor:.4f}; 1000-step DDPM: {ref:.4f})', '', '| sampler | ' + ' | '.join(f'~{n} NFE' for n in NFES) + ' |',
           '|---|' + '---|' * len(NFES)]
  def cells(label, fmt):
    by_budget = {r['budget']: r for r in rows if r['sampler'] == label}
    return ' | '.join(fmt(by_budget[n]) if n in by_budget else '—' for n in NFES)

  for label in labels:
    lines.append(f'| {label} | ' + cells(label, lambda r: f"{r['sw']:.4f} ({r['nfe']})") + ' |')
  lines += ['', 'Total-variation error of the component weights (samples assigned by their exact posterior)', '',
            '| sampler | ' + ' | '.join(f'~{n} NFE' for n in NFES) + ' |', '|---|' + '---|' * len(NFES)]
  for label in labels:
    lines.append(f'| {label} | ' + cells(label, lambda r: f"{r['weight_tv']:.4f}") + ' |')
  table = '\n'.join(lines)
  with open(os.path.join(args.out, 'sampler_nfe.md'), 'w') as f:
    f.write(table + '\n')
  print(table)

  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label in labels:
    pts = [(r['nfe'], r['sw']) for r in rows if r['sampler'] == label]
    ax.plot(*zip(*pts), marker='o', label=label)
  ax.axhline(floor, color='gray', ls='--', label='two target draws')
  ax.set(xscale='log', yscale='log', xlabel='NFE', ylabel='sliced Wasserstein distance',
         title=f'Exact-score test bed ({args.process})')
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, 'sampler_nfe.png'), dpi=120)


if __name__ == '__main__':
  main()
