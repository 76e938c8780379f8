"""Discrete beta schedules of DDPM-style models, computed in float64 on the host."""

import numpy as np

SCHEDULES = ('linear', 'cosine', 'scaled_linear')
ZERO_SNR_ALPHA_BAR = 2.0 ** -24  # the last alpha_bar of a zero-terminal-SNR schedule where finite values are needed


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


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Betas of the same schedule with alpha_bar_N = 0 (Lin et al. 2024, "Common Diffusion Noise Schedules and
  Sample Steps are Flawed", Algorithm 1), float64 [N].

  sqrt(alpha_bar) is shifted so that its last value is 0 and scaled so that its first is unchanged; beta_N = 1.
  The forward process then ends in pure noise, as the sampler's prior draw assumes: with the usual schedules
  x_T keeps alpha_T x0 of the image (Stable Diffusion's scaled_linear: alpha_T = 0.068), which a trained
  network reads, and a sampler starting from N(0, I) cannot reproduce (e.g. images that are mostly bright).
  """
  root = np.sqrt(alphas_cumprod(betas))
  root = (root - root[-1]) * root[0] / (root[0] - root[-1])
  alpha_bar = root ** 2
  return 1.0 - np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])


def finite_terminal(alpha_bar: np.ndarray) -> np.ndarray:
  """alpha_bar [N] with a zero last value replaced by a tiny positive one, so that log-SNR and the samplers'
  coefficients stay finite and log alpha_bar keeps decreasing.

  The value is 2^-24, diffusers' choice for its solvers with zero terminal SNR (alpha_T = 2.4e-4), unless the
  value before it is already smaller (DDPM's linear schedule rescaled: 4.2e-9); then the last step repeats the
  previous step's ratio, alpha_bar_N = alpha_bar_{N-1}^2 / alpha_bar_{N-2}.
  """
  alpha_bar = np.array(alpha_bar, np.float64)
  if alpha_bar[-1] <= 0:
    previous = alpha_bar[-2]
    alpha_bar[-1] = ZERO_SNR_ALPHA_BAR if ZERO_SNR_ALPHA_BAR < previous else previous ** 2 / alpha_bar[-3]
  return alpha_bar
