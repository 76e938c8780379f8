"""Model registry: name -> (typed config dataclass, nnx module)."""

import dataclasses
from typing import Any

from flax import nnx

from models.unet import UNet, UNetConfig

MODELS: dict[str, tuple[type, type]] = {
    'ddpmpp': (UNetConfig, UNet),
}


def build_model(name: str, options: dict[str, Any], *, rngs: nnx.Rngs) -> nnx.Module:
  """Builds model `name` from options; every option must be a field of the model's config dataclass."""
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; choose one of {sorted(MODELS)}')
  cfg_cls, cls = MODELS[name]
  fields = {f.name for f in dataclasses.fields(cfg_cls)}
  unknown = sorted(set(options) - fields)
  if unknown:
    raise ValueError(f'model {name!r} does not take {unknown}')
  return cls(cfg_cls(**options), rngs=rngs)
