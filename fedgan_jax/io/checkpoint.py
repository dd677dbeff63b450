"""Orbax checkpoints of the round state (resume-first, docs/design.md §4).

Resume checks before it trusts: ``shapes(round)`` reads a checkpoint's array
shapes without restoring it (the run compares them with its own state before
restoring), ``restore`` fails on a damaged step like any other error, and
``set_aside`` renames a damaged step out of orbax's sight (``<round>.damaged``,
kept for inspection) so the rounds after the restored one can be saved again.
A failed save (disk full, no permission) becomes an ``OSError`` naming the
checkpoint directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp

CONFIG_NAME = "config.json"  # The config the checkpoints were written under (beside the steps).
_OS_REASONS = (
  "No space left on device",
  "Disk quota exceeded",
  "File too large",
  "Permission denied",
  "Read-only file system",
  "Input/output error",
)


class DamagedStepError(ValueError):
  """A checkpoint step that cannot be what it claims (its message is the reason, for one line)."""


def short_reason(e: BaseException, limit: int = 120) -> str:
  """A short, one-line cause of a storage error (tensorstore's messages run to kilobytes)."""
  text = str(e)
  for known in _OS_REASONS:
    if known in text:
      return known
  if isinstance(e, DamagedStepError):
    return text
  first = " ".join(text.split())
  if len(first) > limit:
    first = first[: limit - 3] + "..."
  return f"{type(e).__name__}: {first}" if first else type(e).__name__


@contextlib.contextmanager
def _sigint_deferred():
  """Holds a Ctrl-C until the block ends (orbax's bookkeeping is not safe to interrupt half-way)."""
  previous = signal.getsignal(signal.SIGINT)
  if previous in (None, signal.SIG_IGN) or threading.current_thread() is not threading.main_thread():
    # Handlers can only be set from the main thread (and restored if Python set them); a run
    # started with Ctrl-C ignored (nohup, a background job of a script) keeps ignoring it.
    yield
    return
  caught = []
  signal.signal(signal.SIGINT, lambda *_: caught.append(True))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
  if caught:
    raise KeyboardInterrupt


def _dotted(path) -> str:
  """A tree path as orbax names arrays: ``clients.d_opt.0.mu.down0.kernel``."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return ".".join(parts)


def shape_table(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{dotted path: (shape, dtype)}`` of every array leaf (arrays, ShapeDtypeStructs, orbax metadata)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
      out[_dotted(path)] = (tuple(leaf.shape), str(jax.numpy.dtype(leaf.dtype)))
  return out


class Checkpointer:
  """Saves/restores the whole ``RoundState`` pytree, keyed by round number.

  Args:
    directory: ``<workdir>/checkpoints`` (created by the first save, not before).
    max_to_keep: how many checkpoints to keep (two: a damaged newest one falls back to the other).
    primary: whether this process writes files of its own (``config.json``, ``set_aside``).
  """

  def __init__(self, directory: str, max_to_keep: int = 2, primary: bool = True):
    self.directory = os.path.abspath(directory)
    self.primary = primary
    self._pending: int | None = None
    self._closed = False
    self._mgr = self._manager(max_to_keep)

  def _manager(self, max_to_keep: int) -> ocp.CheckpointManager:
    # The item handler is named so that ``item_metadata`` can read shapes without a restore.
    return ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=False),
      item_handlers=ocp.StandardCheckpointHandler(),
    )

  def rounds(self) -> list[int]:
    """The saved rounds, newest first (read from the directory: fresh after saves and ``set_aside``)."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(self._mgr.all_steps(read=True), reverse=True)

  def latest_round(self) -> int | None:
    """The last saved round, or None."""
    rounds = self.rounds()
    return rounds[0] if rounds else None

  def shapes(self, round_: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """``shape_table`` of round ``round_``'s saved state, read from its metadata (raises if unreadable)."""
    path = self.step_path(round_)
    if os.path.isdir(path) and not any(files for _, _, files in os.walk(path)):
      raise DamagedStepError("its folder is empty")
    meta = self._mgr.item_metadata(round_)
    if meta is None:
      raise DamagedStepError("it has no state metadata")
    return shape_table(meta)

  def step_path(self, round_: int) -> str:
    return os.path.join(self.directory, str(round_))

  def restore(self, round_: int, like: Any) -> Any:
    """Restores round ``round_`` into the structure (and shardings) of ``like`` (arrays or ShapeDtypeStructs)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self._mgr.restore(round_, args=ocp.args.StandardRestore(abstract))

  def set_aside(self, round_: int) -> str:
    """Renames a damaged step to ``<round>.damaged`` (orbax ignores it); returns the new name."""
    src = self.step_path(round_)
    dst = f"{src}.damaged"
    if self.primary:
      n = 1
      while os.path.exists(dst):
        n += 1
        dst = f"{src}.damaged{n}"
      os.rename(src, dst)
    if jax.process_count() > 1:  # Every process must list the same steps before the next save.
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

      multihost_utils.sync_global_devices(f"fedgan_jax set_aside {round_}")
    self._mgr.reload()
    return os.path.basename(dst)

  def read_config(self) -> dict | None:
    """The config the checkpoints were written under (``checkpoints/config.json``), or None."""
    try:
      with open(os.path.join(self.directory, CONFIG_NAME)) as f:
        value = json.load(f)
    except (OSError, ValueError):
      return None
    return value if isinstance(value, dict) else None

  def write_config(self, config_json: str) -> None:
    """Records the run's config beside the steps (atomically; primary only), before the first save."""
    if not self.primary:
      return
    try:
      os.makedirs(self.directory, exist_ok=True)
      tmp = os.path.join(self.directory, f".{CONFIG_NAME}.tmp")
      with open(tmp, "w") as f:
        f.write(config_json)
      os.replace(tmp, os.path.join(self.directory, CONFIG_NAME))
    except OSError as e:
      raise OSError(f"cannot write to {self.directory}: {e.strerror or e}") from e

  def save(self, round_: int, state: Any) -> None:
    """Saves ``state`` as round ``round_`` (asynchronously; ``close`` waits for it).

    Raises:
      OSError: this save, or the previous asynchronous one, failed (naming the directory and why).
    """
    try:
      with _sigint_deferred():
        self._mgr.save(round_, args=ocp.args.StandardSave(state))
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(self._pending or round_, e) from e
    self._pending = round_

  def wait(self) -> None:
    """Blocks until pending saves are on disk (raises like ``save``)."""
    try:
      self._mgr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(self._pending, e) from e
    self._pending = None

  def close(self) -> None:
    """Waits for pending saves, then releases orbax's threads (raises like ``save``; idempotent)."""
    if self._closed:
      return
    self._closed = True
    try:
      self.wait()
    finally:
      self._mgr.close()

  def _failed(self, round_: int | None, e: BaseException) -> OSError:
    what = f"the checkpoint of round {round_}" if round_ else "a checkpoint"
    return OSError(
      f"{what} could not be written to {self.directory}: {short_reason(e)}; "
      "free space (or fix permissions), then rerun the same command to resume"
    )
