"""What every sampler shares: the call signature, time grids and the jitted loop.

A sampler is `sample(rng, model_fn, process, shape, settings, cond=None) -> (samples, nfe)`, with
model_fn(x, t, cond) -> (x0, eps) from diffusion.parameterization. Loops run inside jit with
lax.fori_loop (`step_loop`): no host sync per step.
"""

import contextlib
import contextvars
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.processes import Process

Array = jax.Array
SPACINGS = ('linspace', 'leading', 'trailing', 'logsnr', 'karras')


def time_grid(process: Process, num_steps: int, spacing: str = 'linspace', t_end: float | None = None,
              rho: float = 7.0) -> Array:
  """num_steps decreasing times [K], from T down to the last sampling time t_end.

  Any process:
    linspace  uniform in t on [t_end, T]
    logsnr    uniform in log-SNR (DPM-Solver's spacing)
    karras    uniform in s^(1/rho), s = sigma / alpha the noise level (EDM, rho = 7)
  Discrete processes only, on their integer grid t = (index + 1) / N (diffusers' spacings):
    leading   index = k * (N // K)              trailing  index = round(N - k N / K) - 1
    linspace  index = round(linspace(0, N - 1, K))   (replaces the continuous linspace)
  t_end defaults to process.sample_t_end (1 / N for discrete processes).
  """
  with jax.ensure_compile_time_eval():  # a constant of the program, also when called under jit
    return _time_grid(process, int(num_steps), spacing, t_end, rho)


def settings_grid(process: Process, settings: Any, spacing: str | None = None) -> Array:
  """The time grid a sampler's settings ask for: their explicit `timesteps` when given (e.g. a grid tuned by
  samplers/step_schedule.py), otherwise `num_steps` points of `spacing` (default settings.spacing) moved by
  settings.time_shift (shift_grid)."""
  timesteps = getattr(settings, 'timesteps', None)
  if timesteps is not None and len(timesteps):
    return explicit_grid(process, timesteps, settings.num_steps)
  ts = time_grid(process, settings.num_steps, spacing or settings.spacing, settings.t_end,
                 getattr(settings, 'rho', 7.0))
  return shift_grid(process, ts, getattr(settings, 'time_shift', 1.0))


def shift_grid(process: Process, ts: Array, shift: float) -> Array:
  """A grid [K] from T with every later time moved to `shift` times its noise-to-signal ratio sigma / alpha
  (Process.shift_time; shift > 1 spends more steps at high noise, as Stable Diffusion 3 at high resolution).
  The first time stays T, where the prior is drawn."""
  if shift == 1:
    return ts
  with jax.ensure_compile_time_eval():
    out = np.asarray(jnp.concatenate([ts[:1], process.shift_time(ts[1:], shift)]), np.float64)
  if not np.all(np.diff(out) < 0):
    raise ValueError(f'time_shift={shift} maps several times of the {out.size}-point grid onto T; use fewer steps '
                     'or a smaller shift')
  return jnp.asarray(out, jnp.float32)


def explicit_grid(process: Process, timesteps: Any, num_steps: int | None = None) -> Array:
  """A given decreasing grid [K] as an array. Concrete grids are checked (decreasing, inside (0, T], K equal
  to num_steps when given); a traced grid (optimized by gradient descent) passes through unchanged."""
  if isinstance(timesteps, jax.core.Tracer):
    return timesteps
  ts = np.asarray(timesteps, np.float64)
  if ts.ndim != 1 or ts.size < 1:
    raise ValueError(f'timesteps must be a 1-d sequence of times, got shape {ts.shape}')
  if num_steps is not None and ts.size != num_steps:
    raise ValueError(f'{ts.size} timesteps given but num_steps={num_steps}')
  if not np.all(np.diff(ts) < 0) or ts[-1] <= 0 or ts[0] > float(process.T) * (1 + 1e-6):
    raise ValueError(f'timesteps must decrease strictly inside (0, T={float(process.T):g}], got {ts.tolist()}')
  return jnp.asarray(ts, jnp.float32)


def _time_grid(process: Process, k: int, spacing: str, t_end: float | None, rho: float) -> Array:
  if k < 1:
    raise ValueError(f'num_steps must be >= 1, got {k}')
  if spacing not in SPACINGS:
    raise ValueError(f'unknown timestep spacing {spacing!r}; choose one of {SPACINGS}')
  n = process.num_timesteps
  discrete = n is not None and hasattr(process, 't_from_index')
  t_end = process.sample_t_end if t_end is None else t_end
  if spacing in ('logsnr', 'karras') and k > 1:
    ends = (process.T, t_end)
    if spacing == 'logsnr':
      lam = np.linspace(*(float(process.log_snr(t)) for t in ends), k)
    else:
      s_max, s_min = (float(process.sigma(t) / process.alpha(t)) for t in ends)
      lam = -2 * rho * np.log(s_max ** (1 / rho) + np.linspace(0, 1, k) * (s_min ** (1 / rho) - s_max ** (1 / rho)))
    inner = process.t_from_log_snr(jnp.asarray(lam[1:-1], jnp.float32))
    return jnp.concatenate([jnp.array([process.T], jnp.float32), inner, jnp.array([t_end], jnp.float32)])
  if not discrete:
    if spacing in ('leading', 'trailing'):
      raise ValueError(f"timestep spacing {spacing!r} needs a discrete process (process.name='ddpm')")
    return jnp.asarray(np.linspace(process.T, t_end, k), jnp.float32)
  if k > n:
    raise ValueError(f'num_steps={k} exceeds the {n} steps of the discrete process')
  if spacing == 'leading':
    index = np.arange(k) * (n // k)
  elif spacing == 'trailing':
    index = np.round(np.arange(n, 0, -n / k)).astype(np.int64)[::-1] - 1
  else:
    index = np.round(np.linspace(0, n - 1, k)).astype(np.int64)
  return process.t_from_index(jnp.asarray(index[::-1].copy()))


_UNROLL = contextvars.ContextVar('unroll_sampler_loops', default=False)


@contextlib.contextmanager
def unrolled_loops():
  """Samplers traced inside this context unroll their step loop (K copies of the step in the program).

  For differentiating a few-step sampler end to end (samplers/step_schedule.py): XLA:CPU runs reverse mode
  through an unrolled loop about 6x faster than through lax.fori_loop, whose backward pass stacks each step's
  residuals (MNIST default model, 10-step DPM-Solver++ at batch 16 with guidance, 2 CPU cores: 4.8 -> 0.75 s
  per gradient). Forward sampling gains nothing from it and keeps the compact loop. It acts when a sampler is
  traced: a function jax already traced (and cached) outside the context keeps its rolled loop."""
  token = _UNROLL.set(True)
  try:
    yield
  finally:
    _UNROLL.reset(token)


def step_loop(num_steps: int, body: Callable[[Any, Any], Any], carry: Any) -> Any:
  """lax.fori_loop(0, num_steps, body, carry): every sampler's step loop (unrolled inside `unrolled_loops`)."""
  return jax.lax.fori_loop(0, num_steps, body, carry, unroll=True if _UNROLL.get() else 1)


def run_grid(rng: Array, model_fn, process: Process, shape: tuple[int, ...], ts: Array,
             step: Callable[[Array, Array, Array, Array], Array], *, nfe_per_step: int, denoise: bool,
             clip_range: tuple[float, float] | None = None, cond: Any = None) -> tuple[Array, int]:
  """The loop of every grid sampler: a prior draw at ts[0], then x <- step(x, t_i, t_{i+1}, rng_i) for
  i = 0..K-2 in one `step_loop`, then (optionally) the final noise removal. Returns (x, NFE)."""
  rng_prior, rng_loop = jax.random.split(rng)
  x = process.prior_sample(rng_prior, shape)
  x = step_loop(ts.shape[0] - 1, lambda i, x: step(x, ts[i], ts[i + 1], jax.random.fold_in(rng_loop, i)), x)
  nfe = (ts.shape[0] - 1) * nfe_per_step
  if denoise:
    x, nfe = denoise_step(model_fn, x, ts[-1], cond, clip_range), nfe + 1
  return x, nfe


def clip_x0(x0: Array, clip_range: tuple[float, float] | None) -> Array:
  return x0 if clip_range is None else jnp.clip(x0, *clip_range)


def broadcast_t(t: Array, x: Array) -> Array:
  return jnp.full(x.shape[:1], t, jnp.float32)


def denoise_step(model_fn, x: Array, t: Array, cond: Any, clip_range) -> Array:
  """The final noise-removal step: x0 = E[x_0 | x_t] at the last sampling time."""
  x0, _ = model_fn(x, broadcast_t(t, x), cond)
  return clip_x0(x0, clip_range)
