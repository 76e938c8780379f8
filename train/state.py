"""The train state: one pytree holding everything a checkpoint must restore."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


def named_leaves(tree) -> list[tuple[tuple[str, ...], jax.Array]]:
  """(path, leaf) of every leaf of a parameter tree (or its orbax metadata), paths as names without nnx's 'value'
  level: the one naming that checkpoint checks and EMA snapshots share."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = (str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)
    out.append((tuple(n for n in names if n != 'value'), leaf))
  return out


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 [], optimizer steps taken
  params: nnx.State  # trainable parameters (nnx.Param)
  ema_params: nnx.State  # exponential moving average of params, used for sampling
  buffers: nnx.State  # fixed non-trainable arrays of the model (e.g. Fourier frequencies)
  opt_state: optax.OptState
  bad_step: jax.Array  # int32 [], first step whose loss or gradient norm was not finite; -1: none
  ema_profiles: tuple = ()  # power-function EMAs of params for post-hoc EMA (train/posthoc_ema.py), one per sigma_rel

  @classmethod
  def create(cls, params: nnx.State, buffers: nnx.State, tx: optax.GradientTransformation,
             num_profiles: int = 0) -> 'TrainState':
    return cls(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree.map(jnp.copy, params),
               buffers=buffers, opt_state=tx.init(params), bad_step=jnp.full((), -1, jnp.int32),
               ema_profiles=tuple(jax.tree.map(jnp.copy, params) for _ in range(num_profiles)))
