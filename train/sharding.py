"""The one parallel path: a device mesh, the rules that place parameters and batches on it.

Axis names are constants here. The batch is split over every data-like axis ('data' and 'fsdp': FSDP is
data parallel with sharded state). A parameter (and with it its EMA and optimizer moments, which share
its shape) is sharded along 'fsdp' on its largest dimension divisible by that axis' size when it holds at
least `fsdp_min_size` elements; everything else is replicated. The same code runs on 1 CPU, 8 GPUs or a pod.
"""

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP = 'data', 'fsdp'
AXES = (DATA, FSDP)
BATCH_AXES = (DATA, FSDP)  # the batch dimension is split over both


def make_mesh(shape: tuple[int, ...], axes: tuple[str, ...] = AXES, devices=None) -> Mesh:
  """A mesh of `shape` over `axes`; one size may be -1 (all remaining devices)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  shape, axes = tuple(int(s) for s in shape), tuple(axes)
  if len(shape) != len(axes) or not set(axes) <= set(AXES):
    raise ValueError(f'mesh shape {shape} and axes {axes} must pair up, with axes from {AXES}')
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f'mesh shape {shape}: sizes must be positive, with at most one -1')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if devices.size % known:
      raise ValueError(f'mesh shape {shape} does not divide the {devices.size} devices')
    shape = tuple(devices.size // known if s == -1 else s for s in shape)
  if math.prod(shape) != devices.size:
    raise ValueError(f'mesh shape {shape} needs {math.prod(shape)} devices, there are {devices.size}')
  return Mesh(devices.reshape(shape), axes)


def _size(mesh: Mesh, axis: str) -> int:
  return mesh.shape.get(axis, 1)


def param_spec(shape: tuple[int, ...], mesh: Mesh, fsdp_min_size: int) -> P:
  """FSDP rule: the largest dimension divisible by the 'fsdp' size, if the array is big enough."""
  n = _size(mesh, FSDP)
  if n == 1 or math.prod(shape) < fsdp_min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % n == 0:
      return P(*([None] * dim + [FSDP]))
  return P()


def state_shardings(state, mesh: Mesh, fsdp_min_size: int = 2 ** 16):
  """A NamedSharding for every array of a state pytree (params, EMA, optimizer moments, counters)."""
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(tuple(np.shape(x)), mesh, fsdp_min_size)), state)


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
  """Splits dimension `leading` (the batch) over the data-like axes; e.g. leading=1 for [k, B, ...]."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return NamedSharding(mesh, P(*([None] * leading), axes))


def batch_parallelism(mesh: Mesh) -> int:
  return math.prod(_size(mesh, a) for a in BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
