"""Orbax checkpoints of the train state: periodic, keep-N, resume from the latest.

Orbax writes into a temporary directory and renames it when complete, so a process killed mid-save
leaves the previous checkpoints intact and the half-written one is never restored.
"""

import os

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored: corrupt, or incompatible with the current config."""


class Checkpointer:

  def __init__(self, directory: str, max_to_keep: int = 3):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state) -> None:
    """Starts an asynchronous save; `wait` (or the next save) completes it."""
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore(self, state_like, step: int | None = None):
    """Restores `step` (default: the latest) into the structure, shapes and shardings of state_like."""
    step = self.latest_step() if step is None else step
    if step is None or step not in self._manager.all_steps():
      raise CheckpointError(f'no checkpoint {"" if step is None else f"at step {step} "}in {self.directory} '
                            f'(available: {self.all_steps() or "none"})')
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as e:  # orbax raises many types; each means the same to the user
      reason = ' '.join(str(e).split())[:300]
      raise CheckpointError(
          f'checkpoint at step {step} in {self.directory} cannot be restored: it is corrupt or does not match '
          f'the current config ({type(e).__name__}: {reason}); it was left untouched') from None

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
