"""Forward processes x_t = alpha(t) x_0 + sigma(t) eps, written once as Gaussian perturbation kernels.

Every process exposes the same interface (DESIGN.md): alpha, sigma, log-SNR and its inverse, the prior,
the SDE dx = f(t) x dt + g(t) dW, the reverse SDE / probability-flow ODE, and the value the network is
conditioned on. Samplers and losses use nothing else, so they never special-case a process.

Time arrays `t` may be scalars or [B]; results have the shape of `t`. Pure jax.numpy, no Flax.
"""

import abc
import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import schedules

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]  # (x [B, ...], t [B]) -> score [B, ...]


def bcast(a: Array, x: Array) -> Array:
  """Reshapes a per-example array [B] (or a scalar) to broadcast against x [B, ...]."""
  a = jnp.asarray(a)
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


class Process(abc.ABC):
  """A Gaussian forward process on t in [0, T]; training uses t >= t_eps."""

  T: float = 1.0  # end of the forward process
  t_eps: float = 1e-5  # smallest training time
  sample_t_end: float = 1e-3  # default last time of a sampler before its final denoising step
  prior_std: float = 1.0  # x_T ~ N(0, prior_std^2 I)
  num_timesteps: int | None = None  # N for discrete processes (t = (index + 1) / N), else None

  @abc.abstractmethod
  def alpha(self, t: Array) -> Array:
    """Signal scale alpha(t)."""

  @abc.abstractmethod
  def sigma(self, t: Array) -> Array:
    """Noise scale sigma(t)."""

  @abc.abstractmethod
  def log_snr(self, t: Array) -> Array:
    """lambda(t) = log(alpha^2 / sigma^2), strictly decreasing in t."""

  @abc.abstractmethod
  def t_from_log_snr(self, lam: Array) -> Array:
    """The inverse of log_snr."""

  @abc.abstractmethod
  def f(self, t: Array) -> Array:
    """Drift coefficient: the SDE's drift is f(t) * x, with f = d log alpha / dt."""

  @abc.abstractmethod
  def g2(self, t: Array) -> Array:
    """Squared diffusion coefficient g(t)^2 = d sigma^2 / dt - 2 f sigma^2."""

  @abc.abstractmethod
  def noise_cond(self, t: Array) -> Array:
    """The scalar the network's noise embedding sees at time t."""

  # ---- shared, derived from the above
  def d_alpha(self, t: Array) -> Array:
    """d alpha / dt, by forward-mode autodiff of alpha (exact where f * alpha would be inf * 0)."""
    t = jnp.asarray(t, jnp.float32)
    return jax.jvp(self.alpha, (t,), (jnp.ones_like(t),))[1]

  def d_sigma(self, t: Array) -> Array:
    """d sigma / dt, by forward-mode autodiff of sigma."""
    t = jnp.asarray(t, jnp.float32)
    return jax.jvp(self.sigma, (t,), (jnp.ones_like(t),))[1]

  def shift_time(self, t: Array, shift: float) -> Array:
    """The time whose noise-to-signal ratio sigma / alpha is `shift` times that at t, i.e. log-SNR lowered by
    2 log(shift), clipped to T. On the flow process this is t' = shift t / (1 + (shift - 1) t), the timestep
    shift of Esser et al. (2024); on VP it is the shifted schedule of Hoogeboom et al. (2023)."""
    if shift <= 0:
      raise ValueError(f'time_shift={shift} must be positive')
    if shift == 1:
      return jnp.asarray(t, jnp.float32)
    return jnp.minimum(self.t_from_log_snr(self.log_snr(t) - 2 * math.log(shift)), self.T)

  def marginal(self, x0: Array, t: Array) -> tuple[Array, Array]:
    """Mean and std of x_t given x_0: (alpha x_0 [B, ...], sigma [B, 1, ...])."""
    return bcast(self.alpha(t), x0) * x0, bcast(self.sigma(t), x0)

  def perturb(self, x0: Array, t: Array, eps: Array) -> Array:
    """x_t = alpha(t) x_0 + sigma(t) eps."""
    return bcast(self.alpha(t), x0) * x0 + bcast(self.sigma(t), x0) * eps

  def sde(self, x: Array, t: Array) -> tuple[Array, Array]:
    """Forward SDE coefficients: drift f(t) x [B, ...] and diffusion g(t) [B]."""
    return bcast(self.f(t), x) * x, jnp.sqrt(self.g2(t))

  def prior_sample(self, rng: Array, shape: tuple[int, ...]) -> Array:
    return self.prior_std * jax.random.normal(rng, shape)

  def prior_logp(self, z: Array) -> Array:
    """log N(z; 0, prior_std^2 I), one value per example [B]."""
    d = math.prod(z.shape[1:])
    s2 = self.prior_std ** 2
    return -0.5 * d * math.log(2 * math.pi * s2) - 0.5 * jnp.sum(z.reshape(z.shape[0], -1) ** 2, -1) / s2

  def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> 'ReverseSDE':
    return ReverseSDE(self, score_fn, probability_flow)


@dataclasses.dataclass(frozen=True)
class ReverseSDE:
  """dx = [f x - c g^2 score] dt + g dW_bar, with c = 1 (reverse SDE) or 1/2 and no noise (PF-ODE)."""
  process: Process
  score_fn: ScoreFn
  probability_flow: bool = False

  def sde(self, x: Array, t: Array) -> tuple[Array, Array]:
    drift, g = self.process.sde(x, t)
    c = 0.5 if self.probability_flow else 1.0
    drift = drift - c * bcast(g ** 2, x) * self.score_fn(x, t)
    return drift, (jnp.zeros_like(g) if self.probability_flow else g)


def _int_beta_linear(t, beta_min, beta_max):
  return beta_min * t + 0.5 * (beta_max - beta_min) * t ** 2


def _t_from_int_beta_linear(b, beta_min, beta_max):
  # Root of 0.5 (bmax - bmin) t^2 + bmin t - b = 0, in the cancellation-free form.
  return 2 * b / (beta_min + jnp.sqrt(beta_min ** 2 + 2 * (beta_max - beta_min) * b))


@dataclasses.dataclass(frozen=True)
class VPSDE(Process):
  """Variance preserving (Song et al. 2021): alpha = exp(-1/2 int beta), sigma = sqrt(1 - alpha^2)."""
  beta_min: float = 0.1
  beta_max: float = 20.0
  num_timesteps: int | None = None
  noise_cond_scale: float = 999.0  # score_sde conditions VP networks on (N - 1) t
  t_eps: float = 1e-5
  sample_t_end: float = 1e-3

  def _b(self, t):
    return _int_beta_linear(t, self.beta_min, self.beta_max)

  def beta(self, t):
    return self.beta_min + t * (self.beta_max - self.beta_min)

  def alpha(self, t):
    return jnp.exp(-0.5 * self._b(t))

  def sigma(self, t):
    return jnp.sqrt(-jnp.expm1(-self._b(t)))

  def log_snr(self, t):
    return -jnp.log(jnp.expm1(self._b(t)))

  def t_from_log_snr(self, lam):
    return _t_from_int_beta_linear(jax.nn.softplus(-lam), self.beta_min, self.beta_max)

  def f(self, t):
    return -0.5 * self.beta(t)

  def g2(self, t):
    return self.beta(t)

  def noise_cond(self, t):
    return self.noise_cond_scale * t


@dataclasses.dataclass(frozen=True)
class SubVPSDE(VPSDE):
  """sub-VP (Song et al. 2021): alpha as VP, sigma = 1 - alpha^2; g^2 = beta (1 - alpha^4)."""

  def sigma(self, t):
    return -jnp.expm1(-self._b(t))

  def log_snr(self, t):
    b = self._b(t)
    return -b - 2 * jnp.log(-jnp.expm1(-b))

  def t_from_log_snr(self, lam):
    # alpha^2 / (1 - alpha^2)^2 = e^lam  =>  alpha^2 = 4 e^lam / (1 + r)^2, r = sqrt(1 + 4 e^lam).
    r = jnp.sqrt(1 + 4 * jnp.exp(lam))
    b = -lam - math.log(4.0) + 2 * jnp.log1p(r)
    return _t_from_int_beta_linear(b, self.beta_min, self.beta_max)

  def g2(self, t):
    return self.beta(t) * -jnp.expm1(-2 * self._b(t))


@dataclasses.dataclass(frozen=True)
class VESDE(Process):
  """Variance exploding (Song et al. 2021): alpha = 1, sigma = sigma_min (sigma_max / sigma_min)^t."""
  sigma_min: float = 0.01
  sigma_max: float = 50.0
  t_eps: float = 1e-5
  sample_t_end: float = 1e-5

  @property
  def prior_std(self):
    return self.sigma_max

  def _log_ratio(self):
    return math.log(self.sigma_max / self.sigma_min)

  def alpha(self, t):
    return jnp.ones_like(jnp.asarray(t, jnp.float32))

  def sigma(self, t):
    return self.sigma_min * jnp.exp(t * self._log_ratio())

  def log_snr(self, t):
    return -2 * (math.log(self.sigma_min) + t * self._log_ratio())

  def t_from_log_snr(self, lam):
    return (-0.5 * lam - math.log(self.sigma_min)) / self._log_ratio()

  def f(self, t):
    return jnp.zeros_like(jnp.asarray(t, jnp.float32))

  def g2(self, t):
    return 2 * self._log_ratio() * self.sigma(t) ** 2

  def noise_cond(self, t):
    return jnp.log(self.sigma(t))  # NCSN++ embeds log sigma (Gaussian Fourier features)


@dataclasses.dataclass(frozen=True)
class EDMProcess(Process):
  """EDM sigma space (Karras et al. 2022): t = sigma, alpha = 1, dx = sqrt(2 t) dW."""
  sigma_min: float = 0.002
  sigma_max: float = 80.0

  @property
  def T(self):
    return self.sigma_max

  @property
  def t_eps(self):
    return self.sigma_min

  @property
  def sample_t_end(self):
    return self.sigma_min

  @property
  def prior_std(self):
    return self.sigma_max

  def alpha(self, t):
    return jnp.ones_like(jnp.asarray(t, jnp.float32))

  def sigma(self, t):
    return jnp.asarray(t, jnp.float32)

  def log_snr(self, t):
    return -2 * jnp.log(t)

  def t_from_log_snr(self, lam):
    return jnp.exp(-0.5 * lam)

  def f(self, t):
    return jnp.zeros_like(jnp.asarray(t, jnp.float32))

  def g2(self, t):
    return 2 * jnp.asarray(t, jnp.float32)

  def noise_cond(self, t):
    return 0.25 * jnp.log(t)  # c_noise of the EDM paper


@dataclasses.dataclass(frozen=True)
class FlowProcess(Process):
  """Rectified flow / flow matching's linear path (Liu et al. 2023; Lipman et al. 2023; Esser et al. 2024):
  alpha = 1 - t, sigma = t, so x_t moves on a straight line from the data to the noise with velocity
  dx_t / dt = eps - x_0 (model.prediction='flow'). alpha(1) = 0 would put log-SNR, f and g^2 at infinity, so the
  process ends at T = 1 - 2^-12 (alpha(T) = 2^-12, the finite terminal of zero-terminal-SNR DDPM): x_T holds
  2.4e-4 of the image, and an x0-, v-, flow- or EDM-predicting network samples from N(0, I) there."""
  T: float = 1.0 - 2.0 ** -12
  num_timesteps: int | None = None
  noise_cond_scale: float = 999.0  # conditioned on (N - 1) t, as VP (Stable Diffusion 3 uses 1000 t)
  t_eps: float = 1e-5
  sample_t_end: float = 1e-3

  def alpha(self, t):
    return 1.0 - jnp.asarray(t, jnp.float32)

  def sigma(self, t):
    return jnp.asarray(t, jnp.float32)

  def log_snr(self, t):
    t = jnp.asarray(t, jnp.float32)
    return 2 * (jnp.log1p(-t) - jnp.log(t))

  def t_from_log_snr(self, lam):
    return jax.nn.sigmoid(-0.5 * jnp.asarray(lam, jnp.float32))

  def f(self, t):
    return -1.0 / (1.0 - jnp.asarray(t, jnp.float32))

  def g2(self, t):
    t = jnp.asarray(t, jnp.float32)
    return 2 * t / (1.0 - t)

  def noise_cond(self, t):
    return self.noise_cond_scale * jnp.asarray(t, jnp.float32)


def _interp_compare_all(x: Array, xp: np.ndarray, fp: np.ndarray) -> Array:
  """jnp.interp(x, xp, fp) for increasing xp, locating x by comparing with every node (no while loop; see
  DiscreteDDPM.log_alpha)."""
  x = jnp.asarray(x, jnp.float32)
  xp, fp = jnp.asarray(xp, jnp.float32), jnp.asarray(fp, jnp.float32)
  k = jnp.clip(jnp.sum(x[..., None] >= xp, axis=-1) - 1, 0, xp.shape[0] - 2)
  w = jnp.clip((x - xp[k]) / (xp[k + 1] - xp[k]), 0.0, 1.0)
  return fp[k] + w * (fp[k + 1] - fp[k])


class DiscreteDDPM(Process):
  """DDPM (Ho et al. 2020) on t = (index + 1) / N, index = 0..N-1, with alpha(t_i)^2 = alpha_bar_i.

  Between the grid points log alpha is interpolated linearly (as in DPM-Solver), with alpha(0) = 1, so
  continuous-time samplers and the ODE run on the discrete model too. f is piecewise constant, g^2 = -2 f.
  With zero_terminal_snr the betas are rescaled so that x_T is pure noise (schedules.rescale_zero_terminal_snr);
  alpha(T) is then tiny rather than 0 (schedules.finite_terminal), and only x0-, v- or EDM-predicting networks
  can be sampled from it: x0 = (x - sigma eps) / alpha amplifies an eps network's error by 1 / alpha(T).
  """

  t_eps = 0.0
  T = 1.0

  def __init__(self, schedule: str = 'linear', num_timesteps: int = 1000, beta_min: float = 0.1,
               beta_max: float = 20.0, cosine_s: float = 0.008, zero_terminal_snr: bool = False):
    self.schedule = schedule
    self.num_timesteps = int(num_timesteps)
    self.zero_terminal_snr = bool(zero_terminal_snr)
    self.betas = schedules.discrete_betas(schedule, num_timesteps, beta_min, beta_max, cosine_s)  # [N]
    if self.zero_terminal_snr:
      self.betas = schedules.rescale_zero_terminal_snr(self.betas)
    self.alphas_cumprod = schedules.alphas_cumprod(self.betas)  # [N] float64; alpha_bar_N = 0 with zero SNR
    n = self.num_timesteps
    self._t_nodes = np.arange(n + 1, dtype=np.float32) / n  # [N + 1]
    alpha_bar = schedules.finite_terminal(self.alphas_cumprod)  # alpha(T) tiny, not 0: finite log-SNR
    self._log_alpha = np.concatenate([[0.0], 0.5 * np.log(alpha_bar)]).astype(np.float32)
    self.sample_t_end = 1.0 / n

  def __repr__(self):
    return (f'DiscreteDDPM(schedule={self.schedule!r}, num_timesteps={self.num_timesteps}, '
            f'zero_terminal_snr={self.zero_terminal_snr})')

  def log_alpha(self, t):
    # Linear interpolation on the uniform nodes k / N by arithmetic, not jnp.interp: its searchsorted is a
    # while loop, and a table lookup inside a sampler loop whose offset comes from a nested while loop fails
    # to compile on XLA:GPU (openxla/xla#49299, DynamicSliceAnnotator).
    n = self.num_timesteps
    u = jnp.clip(jnp.asarray(t, jnp.float32) * n, 0.0, float(n))
    k = jnp.minimum(jnp.floor(u).astype(jnp.int32), n - 1)
    la = jnp.asarray(self._log_alpha)
    return la[k] + (u - k) * (la[k + 1] - la[k])

  def alpha(self, t):
    return jnp.exp(self.log_alpha(t))

  def sigma(self, t):
    return jnp.sqrt(-jnp.expm1(2 * self.log_alpha(t)))

  def log_snr(self, t):
    la2 = 2 * self.log_alpha(t)
    return la2 - jnp.log(-jnp.expm1(la2))

  def t_from_log_snr(self, lam):
    log_alpha = -0.5 * jax.nn.softplus(-lam)
    return _interp_compare_all(log_alpha, self._log_alpha[::-1], self._t_nodes[::-1])

  def f(self, t):
    n = self.num_timesteps
    k = jnp.clip(jnp.floor(jnp.asarray(t) * n).astype(jnp.int32), 0, n - 1)
    la = jnp.asarray(self._log_alpha)
    return (la[k + 1] - la[k]) * n

  def g2(self, t):
    return -2 * self.f(t)

  def noise_cond(self, t):
    return jnp.asarray(t) * self.num_timesteps - 1  # the integer timestep index on the grid

  def t_from_index(self, index: Array) -> Array:
    return (jnp.asarray(index, jnp.float32) + 1) / self.num_timesteps


PROCESSES = ('vp', 'subvp', 've', 'ddpm', 'edm', 'flow')


def get_process(name: str, *, schedule: str = 'linear', beta_min: float = 0.1, beta_max: float = 20.0,
                cosine_s: float = 0.008, num_timesteps: int = 1000, sigma_min: float = 0.01,
                sigma_max: float = 50.0, t_eps: float = 1e-5, zero_terminal_snr: bool = False) -> Process:
  """The process registry: typed arguments in, a Process out."""
  if zero_terminal_snr and name != 'ddpm':
    raise ValueError(f"process.zero_terminal_snr rescales a discrete beta schedule: it needs process.name='ddpm', "
                     f'not {name!r}')
  if name in ('vp', 'subvp', 'ddpm') and not 0 < beta_min <= beta_max:
    raise ValueError(f'process {name!r} needs 0 < beta_min <= beta_max, got beta_min={beta_min}, '
                     f'beta_max={beta_max}')
  if name in ('ve', 'edm') and not 0 < sigma_min < sigma_max:
    raise ValueError(f'process {name!r} needs 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, '
                     f'sigma_max={sigma_max}')
  if name in ('vp', 'subvp', 've', 'flow') and not 0 < t_eps < 1:
    raise ValueError(f'process.t_eps={t_eps} must be in (0, 1)')
  if name in ('vp', 'subvp'):
    if schedule != 'linear':
      raise ValueError(f'process {name!r} has the linear beta schedule only (got schedule={schedule!r}); '
                       "use process.name='ddpm' for cosine or scaled_linear")
    cls = VPSDE if name == 'vp' else SubVPSDE
    return cls(beta_min=beta_min, beta_max=beta_max, noise_cond_scale=float(num_timesteps - 1), t_eps=t_eps)
  if name == 've':
    return VESDE(sigma_min=sigma_min, sigma_max=sigma_max, t_eps=t_eps)
  if name == 'flow':
    return FlowProcess(noise_cond_scale=float(num_timesteps - 1), t_eps=t_eps)
  if name == 'edm':
    return EDMProcess(sigma_min=sigma_min, sigma_max=sigma_max)
  if name == 'ddpm':
    return DiscreteDDPM(schedule, num_timesteps, beta_min, beta_max, cosine_s, zero_terminal_snr)
  raise ValueError(f'unknown process {name!r}; choose one of {PROCESSES}')
