"""Discrete beta schedules of DDPM-style models, computed in float64 on the host."""

import numpy as np

SCHEDULES = ('linear', 'cosine', 'scaled_linear')


def discrete_betas(schedule: str, num_timesteps: int, beta_min: float = 0.1, beta_max: float = 20.0,
                   cosine_s: float = 0.008) -> np.ndarray:
  """beta_1..beta_N, float64 [N].

  linear:        beta_i linear from beta_min / N to beta_max / N (Ho et al. 2020: 1e-4 .. 0.02 for N=1000).
  scaled_linear: sqrt(beta_i) linear between the same end points (Stable Diffusion: beta_min=0.85,
                 beta_max=12 gives 0.00085 .. 0.012).
  cosine:        alpha_bar(t) = cos^2(((t / N + s) / (1 + s)) * pi / 2), beta_i clipped at 0.999
                 (Nichol & Dhariwal 2021).
  """
  n = int(num_timesteps)
  if schedule == 'linear':
    return np.linspace(beta_min / n, beta_max / n, n, dtype=np.float64)
  if schedule == 'scaled_linear':
    return np.linspace(np.sqrt(beta_min / n), np.sqrt(beta_max / n), n, dtype=np.float64) ** 2
  if schedule == 'cosine':
    f = lambda i: np.cos((i / n + cosine_s) / (1 + cosine_s) * np.pi / 2) ** 2
    i = np.arange(n, dtype=np.float64)
    return np.minimum(1.0 - f(i + 1) / f(i), 0.999)
  raise ValueError(f'unknown noise schedule {schedule!r}; choose one of {SCHEDULES}')


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
  """alpha_bar_i = prod_{j <= i} (1 - beta_j), float64 [N]."""
  return np.cumprod(1.0 - np.asarray(betas, np.float64))
