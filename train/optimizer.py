"""The optimizer: global-norm clipping, then Adam / AdamW on a linear warm-up schedule (score_sde)."""

import optax

OPTIMIZERS = ('adam', 'adamw')


def make_optimizer(name: str = 'adam', *, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 0.0, warmup_steps: int = 0,
                   grad_clip: float = 0.0) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(transformation, learning-rate schedule); lr rises linearly from 0 over warmup_steps, then stays."""
  if name not in OPTIMIZERS:
    raise ValueError(f'unknown optimizer {name!r}; choose one of {OPTIMIZERS}')
  if warmup_steps > 0:
    schedule = optax.warmup_constant_schedule(0.0, lr, warmup_steps)
  else:
    schedule = optax.constant_schedule(lr)
  if name == 'adam':
    opt = optax.adam(schedule, b1=beta1, b2=beta2, eps=eps)
  else:
    opt = optax.adamw(schedule, b1=beta1, b2=beta2, eps=eps, weight_decay=weight_decay)
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
  return optax.chain(*parts, opt), schedule
