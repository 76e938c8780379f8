"""The training step: a pure function (state, uint8 batch) -> (state, metrics), jitted by the trainer.

The step's randomness is fold_in(rng, step), so a resumed run draws exactly what an uninterrupted one
does, however many steps run per jitted call.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from data import scaler
from diffusion import losses
from diffusion.parameterization import make_model_fn
from diffusion.processes import Process
from train.state import TrainState

Batch = dict[str, jax.Array]  # {'image': uint8 [B, H, W, C], 'label': int32 [B]}


@dataclasses.dataclass(frozen=True)
class StepSettings:
  prediction: str = 'eps'
  loss: losses.LossSettings = losses.LossSettings()
  ema_decay: float = 0.9999
  centered: bool = True
  dequantize: bool = False
  random_flip: bool = False
  num_classes: int = 0  # > 0: feed labels, replaced by the null label with probability label_dropout
  label_dropout: float = 0.0


def make_train_step(graphdef: nnx.GraphDef, process: Process, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, settings: StepSettings,
                    rng: jax.Array) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """One optimizer step on one batch."""

  def loss_fn(params, buffers, batch, key):
    k_data, k_flip, k_label, k_drop, k_loss = jax.random.split(key, 5)
    x0 = scaler.to_model(batch['image'], centered=settings.centered, dequantize=settings.dequantize, rng=k_data)
    if settings.random_flip:
      x0 = scaler.random_flip(x0, k_flip)
    labels = None
    if settings.num_classes > 0:
      drop = jax.random.bernoulli(k_label, settings.label_dropout, batch['label'].shape)
      labels = jnp.where(drop, settings.num_classes, batch['label'])
    model = nnx.merge(graphdef, params, buffers)
    net_fn = lambda x, c, y: model(x, c, y, train=True, rngs=nnx.Rngs(dropout=k_drop))
    model_fn = make_model_fn(net_fn, process, settings.prediction, settings.loss.sigma_data)
    loss, _ = losses.denoising_loss(model_fn, process, x0, k_loss, settings.loss, cond=labels)
    return loss

  def step(state: TrainState, batch: Batch):
    key = jax.random.fold_in(rng, state.step)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, state.buffers, batch, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    d = settings.ema_decay
    ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state.ema_params, params)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    bad_step = jnp.where((state.bad_step < 0) & ~finite, state.step, state.bad_step)
    new = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
                        bad_step=bad_step)
    return new, {'loss': loss, 'grad_norm': grad_norm, 'lr': jnp.asarray(schedule(state.step), jnp.float32)}

  return step


def multi_step(step: Callable, steps_per_call: int) -> Callable:
  """Runs step over a stack of batches [k, B, ...]; metrics come back as [k] arrays.

  k > 1 runs one lax.scan (fewer dispatches on accelerators); k = 1 calls the step directly, because
  XLA's CPU backend runs a training step inside a loop several times slower than outside one.
  """
  if steps_per_call == 1:
    def single(state, batches):
      state, metrics = step(state, jax.tree.map(lambda b: b[0], batches))
      return state, jax.tree.map(lambda m: m[None], metrics)
    return single
  return lambda state, batches: jax.lax.scan(step, state, batches)
