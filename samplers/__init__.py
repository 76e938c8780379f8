"""Sampler registry: name -> (settings dataclass, sample function)."""

import dataclasses
from typing import Any, Callable

from samplers import ancestral, ddim, dpm_solver, heun, ode, pc, unipc

SAMPLERS: dict[str, tuple[type, Callable]] = {
    'ddpm': (ancestral.AncestralSettings, ancestral.sample),
    'ddim': (ddim.DDIMSettings, ddim.sample),
    'pc': (pc.PCSettings, pc.sample),
    'ode': (ode.ODESettings, ode.sample),
    'dpm_solver': (dpm_solver.DPMSolverSettings, dpm_solver.sample),
    'heun': (heun.HeunSettings, heun.sample),
    'unipc': (unipc.UniPCSettings, unipc.sample),
}


def get_sampler(name: str, **options: Any) -> tuple[Any, Callable]:
  """(settings, sample_fn) for a sampler; `options` may hold more keys than the sampler takes.

  Only the fields of the sampler's settings dataclass are read from `options`, so one flat config section
  serves every sampler. Non-empty `timesteps` (an explicit grid) set num_steps to their number.
  """
  if name not in SAMPLERS:
    raise ValueError(f'unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}')
  cls, fn = SAMPLERS[name]
  fields = {f.name for f in dataclasses.fields(cls)}
  timesteps = options.get('timesteps')
  if timesteps is not None and len(timesteps) and 'timesteps' in fields:
    options = {**options, 'timesteps': tuple(timesteps), 'num_steps': len(timesteps)}  # checked by the grid
  elif 'timesteps' in options:
    options = {**options, 'timesteps': None}
  settings = cls(**{k: v for k, v in options.items() if k in fields})
  if getattr(settings, 'num_steps', 1) < 1:
    raise ValueError(f'sample.num_steps={settings.num_steps} must be at least 1')
  if not getattr(settings, 'time_shift', 1.0) > 0:
    raise ValueError(f'sample.time_shift={settings.time_shift} must be positive')
  return settings, fn
