"""The probability-flow ODE (Song et al. 2021): dx/dt = f(t) x - 1/2 g(t)^2 score(x, t), solved with diffrax.

'dopri5' is adaptive (rtol / atol, NFE reported by the solver); 'euler' and 'heun' step on the sampler's
time grid. `solve_flow` integrates in either direction, so the same code encodes data to noise.
"""

import dataclasses
from typing import Any

import diffrax
import jax
import jax.numpy as jnp

from diffusion.parameterization import ModelFn
from diffusion.processes import Process, bcast
from samplers import base

METHODS = ('dopri5', 'euler', 'heun')


@dataclasses.dataclass(frozen=True)
class ODESettings:
  ode_method: str = 'dopri5'
  num_steps: int = 100  # grid points of the fixed-step methods
  spacing: str = 'linspace'
  rho: float = 7.0
  time_shift: float = 1.0  # sigma / alpha of every grid time times this (Process.shift_time)
  rtol: float = 1e-5
  atol: float = 1e-5
  t_end: float | None = None
  timesteps: tuple[float, ...] | None = None  # an explicit decreasing grid (overrides num_steps / spacing)
  denoise: bool = True
  ode_max_steps: int = 4096


def probability_flow(model_fn: ModelFn, process: Process, cond: Any = None):
  """The ODE's vector field as a diffrax term."""

  def field(t, x, args):
    _, eps = model_fn(x, base.broadcast_t(t, x), cond)
    score = -eps / bcast(process.sigma(t), x)
    return bcast(process.f(t), x) * x - 0.5 * bcast(process.g2(t), x) * score

  return diffrax.ODETerm(field)


def solve_flow(model_fn: ModelFn, process: Process, x: jax.Array, ts: jax.Array, settings: ODESettings,
               cond: Any = None) -> tuple[jax.Array, jax.Array]:
  """Integrates from ts[0] to ts[-1] (either direction): (x at ts[-1], number of vector-field evaluations)."""
  if settings.ode_method not in METHODS:
    raise ValueError(f'unknown ODE method {settings.ode_method!r}; choose one of {METHODS}')
  term = probability_flow(model_fn, process, cond)
  t0, t1 = ts[0], ts[-1]
  if settings.ode_method == 'dopri5':
    solver, controller, dt0 = diffrax.Dopri5(), diffrax.PIDController(rtol=settings.rtol, atol=settings.atol), (t1 - t0) / 64
  else:
    solver = diffrax.Euler() if settings.ode_method == 'euler' else diffrax.Heun()
    controller, dt0 = diffrax.StepTo(ts=ts), None
  sol = diffrax.diffeqsolve(term, solver, t0, t1, dt0, x, stepsize_controller=controller,
                            saveat=diffrax.SaveAt(t1=True), max_steps=settings.ode_max_steps)
  steps = sol.stats['num_steps']
  per_step = {'dopri5': 6, 'euler': 1, 'heun': 2}[settings.ode_method]  # Dopri5 is FSAL: 6 new stages per step
  return sol.ys[0], per_step * steps + (1 if settings.ode_method == 'dopri5' else 0)


def sample(rng: jax.Array, model_fn: ModelFn, process: Process, shape: tuple[int, ...], settings: ODESettings,
           cond: Any = None) -> tuple[jax.Array, jax.Array]:
  if settings.ode_method == 'dopri5':
    if settings.timesteps:
      raise ValueError('timesteps set a fixed grid: use ode_method=euler or heun (dopri5 chooses its own steps)')
    t_end = process.sample_t_end if settings.t_end is None else settings.t_end
    ts = base.shift_grid(process, jnp.array([process.T, t_end], jnp.float32), settings.time_shift)
  else:
    ts = base.settings_grid(process, settings)
  x = process.prior_sample(jax.random.split(rng)[0], shape)  # the prior draw every sampler makes from rng
  x, nfe = solve_flow(model_fn, process, x, ts, settings, cond)
  if settings.denoise:
    x, nfe = base.denoise_step(model_fn, x, ts[-1], cond, None), nfe + 1
  return x, nfe
