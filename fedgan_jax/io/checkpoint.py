"""Orbax checkpoints of the round state (resume-first, docs/design.md §4)."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves/restores the whole ``RoundState`` pytree, keyed by round number.

  Args:
    directory: ``<workdir>/checkpoints``.
    max_to_keep: how many checkpoints to keep.
  """

  def __init__(self, directory: str, max_to_keep: int = 2):
    self._mgr = ocp.CheckpointManager(
      os.path.abspath(directory), options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    )

  def latest_round(self) -> int | None:
    """The last saved round, or None."""
    return self._mgr.latest_step()

  def save(self, round_: int, state: Any) -> None:
    """Saves ``state`` as round ``round_`` (asynchronously; ``close`` waits for it)."""
    self._mgr.save(round_, args=ocp.args.StandardSave(state))

  def restore(self, round_: int, like: Any) -> Any:
    """Restores round ``round_`` into the structure (and shardings) of ``like``."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self._mgr.restore(round_, args=ocp.args.StandardRestore(abstract))

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()
