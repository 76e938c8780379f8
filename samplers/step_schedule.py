"""Time steps tuned for one sampler, one model and one NFE budget: a learned discretization (LD3-style).

Few-step samplers lose most of their accuracy to where the steps are, not to their order (Tong et al. 2025,
"Learning to Discretize Denoising Diffusion ODEs"; Sabour et al. 2024, "Align Your Steps"). Here a K-point
grid is parametrized in log-SNR so that it is always valid: t_0 = T is fixed, the last time t_{K-1} moves
between T and t_min through a sigmoid, and the interior points sit at cumulative softmax fractions of that
span (strictly decreasing t). Adam minimizes the mean squared distance between the sampler's output and a
teacher's (a many-step sampler) from the same prior draws; the sampler is differentiated end to end, its
step loop unrolled (base.unrolled_loops: reverse mode through it is several times faster). The tuned grid is
then an ordinary `timesteps` setting of that sampler (samplers/base.settings_grid), e.g.
--config.sample.timesteps="(...)".

Deterministic samplers only (DDIM eta=0, DPM-Solver++, UniPC, fixed-step ODE, EDM Heun without churn): the
objective compares two maps of the same noise.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from diffusion.parameterization import ModelFn
from diffusion.processes import Process
from samplers import base

Array = jax.Array
SampleFn = Callable[..., tuple[Array, Any]]


@dataclasses.dataclass(frozen=True)
class TuneSettings:
  num_iters: int = 300  # Adam steps on the full batch
  lr: float = 0.05
  t_min: float | None = None  # the lowest last time allowed; None: the process's t_eps


@dataclasses.dataclass(frozen=True)
class TuneResult:
  timesteps: tuple[float, ...]  # the tuned grid [K], decreasing
  initial_loss: float  # mean squared distance to the teacher with the initial grid
  loss: float  # ... with the tuned grid
  losses: np.ndarray  # [num_iters] the objective along the optimization


def _lam_bounds(process: Process, t_min: float) -> tuple[Array, Array]:
  return process.log_snr(jnp.float32(process.T)), process.log_snr(jnp.float32(t_min))


def params_from_grid(process: Process, ts: Array, t_min: float) -> dict[str, Array]:
  """The parameters whose grid is `ts` [K] (T first, last time above t_min)."""
  lam_T, lam_max = _lam_bounds(process, t_min)
  lam = process.log_snr(jnp.asarray(ts, jnp.float32))
  frac = jnp.clip((lam[-1] - lam_T) / (lam_max - lam_T), 1e-4, 1 - 1e-4)
  return {'logits': jnp.log(jnp.maximum(jnp.diff(lam), 1e-6)), 'end': jnp.log(frac) - jnp.log1p(-frac)}


def grid_from_params(process: Process, params: dict[str, Array], t_min: float) -> Array:
  """A strictly decreasing grid [K] from T to a last time in (t_min, T)."""
  lam_T, lam_max = _lam_bounds(process, t_min)
  span = (lam_max - lam_T) * jax.nn.sigmoid(params['end'])
  lam = lam_T + span * jnp.cumsum(jax.nn.softmax(params['logits']))  # [K - 1], increasing log-SNR
  return jnp.concatenate([jnp.array([process.T], jnp.float32), process.t_from_log_snr(lam)])


def _placed_with(tree, args):
  """tree committed, replicated, to the devices of args' committed arrays, where update's outputs land: fresh
  arrays are uncommitted, and update would otherwise compile a second time for its own outputs."""
  committed = [x for x in jax.tree.leaves(args) if isinstance(x, jax.Array) and x.committed]
  if not committed:
    return tree
  s = committed[0].sharding
  return jax.device_put(tree, NamedSharding(s.mesh, PartitionSpec()) if isinstance(s, NamedSharding) else s)


def tune_timesteps(rng: Array, model_fn: ModelFn, process: Process, shape: tuple[int, ...],
                   sample_fn: SampleFn, settings: Any, teacher_fn: SampleFn, teacher_settings: Any,
                   tune: TuneSettings = TuneSettings(), cond: Any = None, model_args: Any = None,
                   on_iter: Callable[[int, float], None] | None = None) -> TuneResult:
  """Tunes `settings`' grid (its timesteps if given, else num_steps of its spacing) for sample_fn.

  shape: [batch_size, ...] of the prior draws; rng fixes them (teacher and student draw the same prior).
  With model_args, model_fn is a function model_args -> model_fn: a network's parameters then enter the
  compiled programs as arguments instead of constants; so does `cond`, the sampler's condition (a pytree).
  on_iter(i, loss) is called after each Adam step (a progress bar); the first call comes after the teacher's
  samples and the first compilation.
  """
  make = model_fn if model_args is not None else (lambda _: model_fn)
  t_min = float(process.t_eps if tune.t_min is None else tune.t_min)
  ts0 = base.settings_grid(process, settings, 'karras' if not hasattr(settings, 'spacing') else None)
  if ts0.shape[0] < 2:
    raise ValueError('a tuned grid needs at least 2 time steps')
  target, _ = jax.jit(lambda a, c: teacher_fn(rng, make(a), process, shape, teacher_settings, c))(model_args, cond)

  def loss_fn(params, args, cond):
    ts = grid_from_params(process, params, t_min)
    with base.unrolled_loops():  # at trace time
      x, _ = sample_fn(rng, make(args), process, shape, dataclasses.replace(settings, timesteps=ts), cond)
    return jnp.mean((x - target) ** 2)

  optimizer = optax.adam(tune.lr)

  @jax.jit
  def update(params, opt_state, args, cond):
    loss, grads = jax.value_and_grad(loss_fn)(params, args, cond)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params = params_from_grid(process, ts0, t_min)
  params, opt_state = _placed_with((params, optimizer.init(params)), (model_args, cond))
  best = (float('inf'), params)
  losses = []
  for i in range(tune.num_iters):
    new_params, opt_state, loss = update(params, opt_state, model_args, cond)
    loss = float(loss)  # the loss of `params`, before this update
    if not np.isfinite(loss):
      raise ValueError(f'step-schedule tuning diverged (loss {loss}); lower tune.lr')
    losses.append(loss)
    if on_iter is not None:
      on_iter(i, loss)
    if loss < best[0]:
      best = (loss, params)
    params = new_params
  final = float(update(params, opt_state, model_args, cond)[2])  # the last grid's loss, without a new compile
  if final < best[0]:
    best = (final, params)
  ts = np.asarray(grid_from_params(process, best[1], t_min), np.float64)
  return TuneResult(tuple(float(t) for t in ts), losses[0], best[0], np.asarray(losses))
