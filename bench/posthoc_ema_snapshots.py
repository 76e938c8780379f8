"""How many EMA snapshots post-hoc EMA needs: reconstruction error against the directly run EMA (CPU, seconds).

A scalar parameter trajectory (a random walk plus a decaying transient, 4,000 steps) is averaged by two
power-function EMAs (sigma_rel 0.05 and 0.10, EDM2's profiles) saved every T / S steps; the EMA of each target
width at the last step is reconstructed from the S snapshots (train/posthoc_ema.py) and compared with the same
EMA run directly. Errors are relative to how much the two saved EMAs differ there.

  python bench/posthoc_ema_snapshots.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from train import posthoc_ema  # noqa: E402

STEPS = 4000
TARGETS = (0.03, 0.07, 0.15, 0.25)


def power_ema(trajectory: np.ndarray, gamma: float) -> np.ndarray:
  ema, out = 0.0, []
  for t, value in enumerate(trajectory, start=1):
    decay = (1 - 1 / t) ** (gamma + 1)
    ema = decay * ema + (1 - decay) * value
    out.append(ema)
  return np.array(out)


def main():
  rng = np.random.default_rng(0)
  trajectory = np.cumsum(rng.normal(size=STEPS)) * 0.1 + 5 * np.exp(-np.arange(1, STEPS + 1) / 800)
  gammas = [posthoc_ema.sigma_rel_to_gamma(s) for s in (0.05, 0.10)]
  runs = [power_ema(trajectory, g) for g in gammas]
  spread = abs(runs[0][-1] - runs[1][-1])
  direct = {s: power_ema(trajectory, posthoc_ema.sigma_rel_to_gamma(s))[-1] for s in TARGETS}
  print('| snapshots | ' + ' | '.join(f'sigma_rel {s}' for s in TARGETS) + ' |')
  print('|---|' + '---|' * len(TARGETS))
  for count in (4, 8, 10, 20, 40, 100):
    every = STEPS // count
    times = [t for t in range(every, STEPS + 1, every) for _ in gammas]
    snap_gammas = [g for _ in range(every, STEPS + 1, every) for g in gammas]
    values = [run[t - 1] for t in range(every, STEPS + 1, every) for run in runs]
    errors = []
    for s in TARGETS:
      w = posthoc_ema.coefficients(times, snap_gammas, STEPS, posthoc_ema.sigma_rel_to_gamma(s))
      errors.append(abs(np.dot(w, values) - direct[s]) / spread)
    print(f'| {count} | ' + ' | '.join(f'{100 * e:.2f} %' for e in errors) + ' |')


if __name__ == '__main__':
  main()
