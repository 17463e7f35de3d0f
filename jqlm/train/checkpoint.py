"""Orbax checkpoints of the train state and the data position.

Saves are asynchronous (training continues while the arrays are written)
and atomic: orbax writes into a temporary directory and renames it when
complete, so a run killed during a save keeps its previous checkpoint. The
newest ``keep`` checkpoints are kept. :meth:`Checkpointer.restore` tries the
newest first and falls back to older ones when a checkpoint is unreadable
(corrupted or truncated files), warning with the reason.
"""

from __future__ import annotations

import os
import warnings

import orbax.checkpoint as ocp

from jqlm.data import DataPosition
from jqlm.train.step import TrainState


class CheckpointError(RuntimeError):
  """No checkpoint in the directory could be restored."""


class Checkpointer:
  """Keep-last-N async checkpoints of ``(TrainState, DataPosition)``.

  Args:
    directory: where checkpoints live (one sub-directory per step).
    keep: how many of the newest to keep.
    async_save: write in a background thread.
  """

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._mgr = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save,
        create=True))

  def save(self, step: int, state: TrainState, position: DataPosition
           ) -> None:
    self._mgr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave({"epoch": int(position.epoch),
                              "index": int(position.index)})), force=True)

  def steps(self) -> list[int]:
    self._mgr.reload()
    return sorted(self._mgr.all_steps())

  def restore(self, abstract_state: TrainState, legacy=None
              ) -> tuple[TrainState, DataPosition, int]:
    """The newest readable checkpoint, as ``(state, position, step)``.

    Args:
      abstract_state: the restore target (shapes, dtypes, shardings).
      legacy: ``(target, convert)`` for checkpoints of an older layout
        (:func:`jqlm.train.state.legacy_target`): a checkpoint that does
        not restore into ``abstract_state`` is restored into ``target``
        and passed through ``convert``.

    Raises:
      CheckpointError: when none exists or none can be read.
    """
    steps = self.steps()
    if not steps:
      raise CheckpointError(f"No checkpoint in {self.directory!r} to resume "
                            "from. Drop --resume to start a new run.")
    errors = []
    for step in reversed(steps):
      try:
        try:
          state, pos = self._restore(step, abstract_state)
        except Exception as first:
          if legacy is None:
            raise
          try:
            state, pos = self._restore(step, legacy[0])
          except Exception:  # noqa: BLE001 - report the current layout's
            raise first from None
          state = legacy[1](state)
        return state, pos, step
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint
        errors.append(f"step {step}: {type(e).__name__}: {e}")
        warnings.warn(
          f"Checkpoint at step {step} in {self.directory!r} is unreadable "
          f"({type(e).__name__}: {str(e)[:200]}); trying an older one.",
          stacklevel=2)
    raise CheckpointError(
      f"No readable checkpoint in {self.directory!r}:\n" + "\n".join(errors))

  def _restore(self, step: int, target) -> tuple[TrainState, DataPosition]:
    out = self._mgr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target),
      data=ocp.args.JsonRestore()))
    return out["state"], DataPosition(int(out["data"]["epoch"]),
                                      int(out["data"]["index"]))

  def wait(self) -> None:
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()
