"""Orbax checkpoints of the train state: periodic, keep-N, resume from the latest.

Orbax writes into a temporary directory and renames it when complete, so a process killed mid-save
leaves the previous checkpoints intact and the half-written one is never restored.
"""

import dataclasses
import os

import jax
import orbax.checkpoint as ocp

from train.state import named_leaves


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored: corrupt, or incompatible with the current config."""


def _shapes(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{parameter path: shape} of a parameter tree or its orbax metadata."""
  return {path: tuple(leaf.shape) for path, leaf in named_leaves(tree)}


def _profile_count(meta) -> int:
  """How many post-hoc EMA profiles a checkpoint's metadata holds (0 for checkpoints from before the field)."""
  return len(meta['ema_profiles']) if 'ema_profiles' in meta else 0


class Checkpointer:

  def __init__(self, directory: str, max_to_keep: int = 3):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_handlers=ocp.StandardCheckpointHandler())
    self._meta = {}  # step -> metadata: a written checkpoint does not change, and orbax takes ~1 s to read it

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state) -> None:
    """Starts an asynchronous save; `wait` (or the next save) completes it."""
    self._meta.pop(step, None)
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore(self, state_like, step: int | None = None):
    """Restores `step` (default: the latest) into the structure, shapes and shardings of state_like."""
    step = self.latest_step() if step is None else step
    if step is None or step not in self._manager.all_steps():
      raise CheckpointError(f'no checkpoint {"" if step is None else f"at step {step} "}in {self.directory} '
                            f'(available: {self.all_steps() or "none"})')
    meta = self._metadata(step)
    self._check_params(step, state_like, meta)
    self._check_profiles(step, state_like, meta)
    target, fill = state_like, None
    older = [f.name for f in dataclasses.fields(state_like) if meta is not None and f.name not in meta]
    if older and all(not jax.tree.leaves(getattr(state_like, name)) for name in older):
      # A checkpoint from before a state field existed (e.g. ema_profiles): that field is empty in this config,
      # so restore the others and keep it.
      target = {f.name: getattr(state_like, f.name) for f in dataclasses.fields(state_like) if f.name not in older}
      fill = state_like
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      restored = self._manager.restore(step, args=ocp.args.StandardRestore(target))
      return restored if fill is None else fill.replace(**restored)
    except Exception as e:  # orbax raises many types; each means the same to the user
      reason = ' '.join(str(e).split())[:300]
      raise CheckpointError(
          f'checkpoint at step {step} in {self.directory} cannot be restored: it is corrupt or does not match '
          f'the current config ({type(e).__name__}: {reason}); it was left untouched') from None

  def _metadata(self, step: int):
    """The checkpoint's tree metadata (field -> array metadata), or None where it cannot be read (a corrupt
    checkpoint: the restore reports it)."""
    if step not in self._meta:
      try:
        self._meta[step] = self._manager.item_metadata(step)
      except Exception:  # noqa: BLE001
        return None
    return self._meta[step]

  def _check_params(self, step: int, state_like, meta) -> None:
    """Compares the checkpoint's parameter shapes (its metadata) with the config's before reading any array.

    A restore into other shapes fails inside orbax while its other reads are still in flight; their callbacks
    then print tracebacks ("Event loop is closed") over the error line. Checked first, the mismatch is reported
    without starting them, and it names the parameter. Unreadable metadata is left to the restore to report."""
    try:
      saved = _shapes(meta['params']) if meta is not None else None
    except Exception:  # noqa: BLE001 (corrupt metadata: the restore reports it)
      return
    if not saved:
      return
    wanted = _shapes(state_like.params)
    differ = sorted(p for p in saved.keys() | wanted.keys() if saved.get(p) != wanted.get(p))
    if differ:
      p = differ[0]
      raise CheckpointError(
          f'checkpoint at step {step} in {self.directory} cannot be restored: it does not match the current config '
          f'(parameter {"/".join(p)} is {saved.get(p, "absent")} there, {wanted.get(p, "absent")} in the config; '
          f'{len(differ)} parameters differ); it was left untouched')

  def num_profiles(self, step: int) -> int:
    """How many post-hoc EMA profiles the checkpoint at `step` holds (0 where its metadata cannot be read)."""
    meta = self._metadata(step)
    try:
      return _profile_count(meta) if meta is not None else 0
    except Exception:  # noqa: BLE001
      return 0

  def _check_profiles(self, step: int, state_like, meta) -> None:
    """The number of post-hoc EMA profiles is part of the state: a mismatch is a config error, named as such."""
    if meta is None or not hasattr(state_like, 'ema_profiles'):
      return
    try:
      saved = _profile_count(meta)
    except Exception:  # noqa: BLE001
      return
    if saved != len(state_like.ema_profiles):
      raise CheckpointError(
          f'checkpoint at step {step} in {self.directory} cannot be restored: it holds {saved} post-hoc EMA '
          f'profiles, the config {len(state_like.ema_profiles)} (training.ema_profiles must stay as the run was '
          'started); it was left untouched')

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
