"""The training step: a pure function (state, uint8 batch) -> (state, metrics), jitted by the trainer.

The step's randomness is fold_in(rng, step), so a resumed run draws exactly what an uninterrupted one
does, however many steps run per jitted call.
"""

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental.layout import Layout, with_layout_constraint

from data import scaler
from diffusion import losses
from diffusion.parameterization import make_model_fn
from diffusion.processes import Process
from models import layers
from train import posthoc_ema
from train.latent import LatentCodec
from train.optimizer import global_norm
from train.state import TrainState

if TYPE_CHECKING:
  from train.text import TextConditioner

Batch = dict[str, jax.Array]  # {'image': uint8 [B, H, W, C] (or cached latent moments), 'label': int32 [B]}


@dataclasses.dataclass(frozen=True)
class StepSettings:
  prediction: str = 'eps'
  loss: losses.LossSettings = losses.LossSettings()
  ema_decay: float = 0.9999
  ema_profile_gammas: tuple[float, ...] = ()  # exponents of the power-function EMA profiles (post-hoc EMA)
  centered: bool = True
  dequantize: bool = False
  random_flip: bool = False
  num_classes: int = 0  # > 0: feed labels (classes or caption ids), the null label num_classes with
  label_dropout: float = 0.0  # this probability (p_uncond of classifier-free guidance)
  grad_accum: int = 1  # micro-batches per step: the gradient of the whole batch, 1/grad_accum the activations
  cached_latents: bool = False  # latent diffusion: batches hold posterior moments instead of images

  def __post_init__(self):
    check_ema_decay(self.ema_decay)
    if self.grad_accum < 1:
      raise ValueError(f'training.grad_accum={self.grad_accum} must be at least 1')
    if not 0.0 <= self.label_dropout <= 1.0:
      raise ValueError(f'training.label_dropout={self.label_dropout} must be in [0, 1]')


def check_ema_decay(decay: float) -> None:
  """EMA decays outside [0, 1] make the average diverge."""
  if not 0.0 <= decay <= 1.0:
    raise ValueError(f'training.ema_decay={decay} must be in [0, 1]')


def ema_weights(step: jax.Array, decay: float) -> tuple[jax.Array, jax.Array]:
  """(decay, weight of the new parameters) of the constant-decay EMA at optimizer step `step` >= 1, bias-corrected
  as Adam's moments: the average gives step tau's parameters (1 - d) d^(t - tau) / (1 - d^t) and the random
  initialization nothing. Plain EMA from the initialization leaves it d^t of the average: 1.8 % after 2,000
  steps at d = 0.998, 37 % after 10,000 at 0.9999 (bench/RESULTS.md). Once d^t is negligible this is the plain
  EMA; d = 1 is the running mean of all steps."""
  if decay == 0.0:
    return jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32)
  if decay == 1.0:
    return (step - 1) / step, 1 / step
  log_d = float(np.log(decay))
  total = -jnp.expm1(step * log_d)  # 1 - d^t
  return decay * -jnp.expm1((step - 1) * log_d) / total, (1 - decay) / total


def _in_param_layout(grad: jax.Array, sharding) -> jax.Array:
  """A convolution kernel's gradient materialized in the parameter's (row-major) layout before the optimizer reads
  it: cuDNN returns it in its own layout, and XLA:GPU would fuse the transpose into the kernel's Adam, EMA and
  gradient-norm updates, which it then splits in two fusions per array, copying the donated optimizer state for
  the second (bench/gpu_program.py, H200 description: 1,937 -> 1,678 kernels in the DDPM CIFAR-10 bf16 step at
  batch 128). The reshape to 1-D behind an optimization barrier cannot become a bitcast, so XLA writes the
  gradient out once in row-major order. Only for replicated kernels (flattening an FSDP-sharded one would move it
  across devices) and only on XLA:GPU (elsewhere the reshape may be a real relayout: TPU layouts are tiled)."""
  if (grad.ndim != 4 or (sharding is not None and not sharding.is_fully_replicated)
      or not layers.for_xla_gpu()):
    return grad
  return jax.lax.optimization_barrier(grad.reshape(-1)).reshape(grad.shape)


def apply_gradients(state: TrainState, loss: jax.Array, grads, tx: optax.GradientTransformation,
                    ema_decay: float, param_sharding=None,
                    profile_gammas: tuple[float, ...] = ()) -> tuple[TrainState, jax.Array]:
  """The optimizer update, the EMAs and the divergence flag shared by every step; returns (state, grad norm).

  profile_gammas: the exponents of state.ema_profiles, power-function EMAs with decay (1 - 1/t)^(gamma + 1)
  at step t (train/posthoc_ema.py).

  param_sharding (the parameters' NamedShardings; None leaves the gradients' placement to XLA) places the
  gradients like the parameters, so that under FSDP they are reduce-scattered onto the parameters' shards and
  the optimizer, the EMA and the gradient norm run on each device's shards. Left to itself, XLA's sharding
  propagation computes some replicated parameters' updates split across devices and all-gathers them.
  """
  if param_sharding is not None:
    grads = jax.lax.with_sharding_constraint(grads, param_sharding)
    grads = jax.tree.map(_in_param_layout, grads, param_sharding)
  else:
    grads = jax.tree.map(lambda g: _in_param_layout(g, None), grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  average = lambda ema, decay, weight: jax.tree.map(lambda e, p: decay * e + weight * p, ema, params)
  t = (state.step + 1).astype(jnp.float32)
  ema = average(state.ema_params, *ema_weights(t, ema_decay))
  if len(profile_gammas) != len(state.ema_profiles):
    raise ValueError(f'{len(state.ema_profiles)} EMA profiles in the state, {len(profile_gammas)} exponents given')
  profiles = tuple(average(e, *posthoc_ema.decay(t, g)) for g, e in zip(profile_gammas, state.ema_profiles))
  grad_norm = global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  bad_step = jnp.where((state.bad_step < 0) & ~finite, state.step, state.bad_step)
  new = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state, bad_step=bad_step,
                      ema_profiles=profiles)
  return new, grad_norm


def make_train_step(graphdef: nnx.GraphDef, process: Process, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, settings: StepSettings, rng: jax.Array,
                    codec: LatentCodec | None = None, text: 'TextConditioner | None' = None,
                    param_sharding=None) -> Callable[[TrainState, Batch, Any], tuple[TrainState, dict]]:
  """fn(state, batch, frozen): one optimizer step on one batch (with settings.grad_accum > 1, over that many
  micro-batches; dropout masks then differ from the full-batch step's, everything else is the same).

  `frozen` holds what the step reads but never trains: {'vae': the codec's (params, buffers) or None,
  'text': the caption table or None}. With a codec (latent diffusion) x0 is a posterior sample of the frozen
  VAE's latents of the batch; with a text conditioner the labels are caption ids, looked up in the table.
  param_sharding: the parameters' shardings on the mesh (see apply_gradients).
  """

  def draw(batch, key, frozen):
    """Everything random about the batch, drawn for the whole batch at once (so micro-batching changes
    nothing): model-space x0, labels after dropout, loss times and noise, and the dropout key."""
    k_data, k_flip, k_label, k_drop, k_loss = jax.random.split(key, 5)
    k_latent = jax.random.fold_in(key, 5)
    vae = frozen['vae'] if frozen is not None else None
    if settings.cached_latents:
      x0 = codec.sample(vae, batch['image'], k_latent)
    else:
      x0 = scaler.to_model(batch['image'], centered=settings.centered, dequantize=settings.dequantize, rng=k_data)
      if settings.random_flip:
        x0 = scaler.random_flip(x0, k_flip)
      if codec is not None:
        x0 = codec.sample(vae, codec.moments(vae, x0), k_latent)
    labels = None
    if settings.num_classes > 0:
      drop = jax.random.bernoulli(k_label, settings.label_dropout, batch['label'].shape)
      labels = jnp.where(drop, settings.num_classes, batch['label'])
    t, eps = losses.draw_noise(k_loss, x0, process, settings.loss)
    return {'x0': x0, 'labels': labels, 't': t, 'eps': eps}, k_drop

  def loss_fn(params, buffers, drawn, k_drop, frozen):
    model = nnx.merge(graphdef, params, buffers)
    cond = lambda y: text.lookup(frozen['text'], y) if text is not None else y
    net_fn = lambda x, c, y: model(x, c, cond(y), train=True, rngs=nnx.Rngs(dropout=k_drop))
    model_fn = make_model_fn(net_fn, process, settings.prediction, settings.loss.sigma_data)
    loss, _ = losses.denoising_loss_at(model_fn, process, drawn['x0'], drawn['t'], drawn['eps'], settings.loss,
                                       cond=drawn['labels'])
    return loss

  def loss_and_grads(params, buffers, batch, key, frozen):
    drawn, k_drop = draw(batch, key, frozen)
    a = settings.grad_accum
    if a == 1:
      return jax.value_and_grad(loss_fn)(params, buffers, drawn, k_drop, frozen)
    b = drawn['x0'].shape[0]
    if b % a:
      raise ValueError(f'the per-step batch {b} is not divisible by grad_accum={a}')
    micro = jax.tree.map(lambda v: v.reshape(a, b // a, *v.shape[1:]), drawn)  # [A, B/A, ...]

    def accumulate(carry, xs):
      j, mb = xs
      loss, grads = jax.value_and_grad(loss_fn)(params, buffers, mb, jax.random.fold_in(k_drop, j), frozen)
      return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(a), micro))
    return jax.tree.map(lambda v: v / a, total)  # equal micro-batches: the mean of means is the batch mean

  def step(state: TrainState, batch: Batch, frozen=None):
    key = jax.random.fold_in(rng, state.step)
    loss, grads = loss_and_grads(state.params, state.buffers, batch, key, frozen)
    new, grad_norm = apply_gradients(state, loss, grads, tx, settings.ema_decay, param_sharding,
                                     settings.ema_profile_gammas)
    return new, {'loss': loss, 'grad_norm': grad_norm, 'lr': jnp.asarray(schedule(state.step), jnp.float32)}

  return step


def _row_major(tree):
  """Every array of `tree` constrained to the row-major layout, the one a jitted call's arguments have."""
  return with_layout_constraint(tree, jax.tree.map(lambda x: Layout(tuple(range(np.ndim(x)))), tree))


def multi_step(step: Callable, steps_per_call: int) -> Callable:
  """fn(state, batches [k, B, ...], frozen): runs step over the stack; metrics come back as [k] arrays.

  k > 1 runs one lax.scan (fewer dispatches on accelerators); k = 1 calls the step directly, because
  XLA's CPU backend runs a training step inside a loop several times slower than outside one.

  On XLA:GPU the scan's carried state is pinned to the call's row-major layout. Left free, layout assignment
  carries the convolution kernels, their Adam moments and EMAs in cuDNN's filter layout (O, H, W, I) and transposes
  all of them into it before the loop and back after it, and the loop body gains copies (bench/gpu_program.py, H200
  description, bf16 batch 128, 4 steps per call: 523 kernels and 2.0 GB around the loop per call, 1,785 kernels per
  step in the body against one step's 1,592; pinned: 2 small kernels around it, 1,592 per step).
  """
  if steps_per_call == 1:
    def single(state, batches, frozen=None):
      state, metrics = step(state, jax.tree.map(lambda b: b[0], batches), frozen)
      return state, jax.tree.map(lambda m: m[None], metrics)
    return single

  def body(state, batch, frozen):
    state, metrics = step(state, batch, frozen)
    return (_row_major(state) if layers.for_xla_gpu() else state), metrics

  return lambda state, batches, frozen=None: jax.lax.scan(lambda s, b: body(s, b, frozen), state, batches)
