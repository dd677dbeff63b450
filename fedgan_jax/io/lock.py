"""One run per workdir: an advisory lock held for the run's whole life.

Two runs writing one workdir interleave their ``metrics.jsonl`` lines and
TensorBoard files, and the one that ends last "wins" with garbage. The lock is
``fcntl.flock`` on ``<workdir>/.lock``: the kernel drops it when its holder
exits, however it exits (``kill -9`` included), so a crashed run never leaves a
stale lock behind. The file holds who has it (pid, host, start time), for the
message a second run prints.

Only the process that writes outputs (the primary of a multi-host run) takes
the lock; the others write nothing.
"""

from __future__ import annotations

import errno
import os
import socket
import time

from absl import logging

try:
  import fcntl
except ImportError:  # Not POSIX: runs are not locked (logged once per run).
  fcntl = None

LOCK_NAME = ".lock"


class WorkdirBusyError(OSError):
  """Another live run holds the workdir's lock."""


def _holder_line() -> str:
  return f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"


class WorkdirLock:
  """Context manager: creates ``workdir`` and holds its lock until exit.

  Args:
    workdir: the run directory (created if missing).
    active: False makes a no-op (non-primary processes of a multi-host run).

  Raises (on enter):
    WorkdirBusyError: another run holds the lock; nothing in ``workdir`` was
      changed (the lock file is opened, never truncated, unless acquired).
    OSError: ``workdir`` cannot be created or written, with a message naming it.
  """

  def __init__(self, workdir: str, active: bool = True):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self.active = active
    self._fd: int | None = None
    self._created = False

  def __enter__(self) -> WorkdirLock:
    if not self.active:
      return self
    try:
      self._created = not os.path.isdir(self.workdir)
      os.makedirs(self.workdir, exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise OSError(f"cannot write to --workdir {self.workdir}: {e.strerror or e}") from e
    if fcntl is None:
      logging.warning("no file locking on this platform: nothing stops two runs on %s", self.workdir)
      self._fd = fd
      return self
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 512).decode(errors="replace").strip() or "holder unknown"
      os.close(fd)
      raise WorkdirBusyError(
        f"--workdir {self.workdir} is in use by another run ({holder}); wait for it to end, or use another --workdir"
      ) from None
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        os.close(fd)
        raise OSError(f"cannot lock --workdir {self.workdir}: {e.strerror or e}") from e
      # A filesystem without locks (some network mounts): run unlocked rather than not at all.
      logging.warning("%s does not support file locks: nothing stops two runs on it", self.workdir)
    os.ftruncate(fd, 0)
    os.write(fd, (_holder_line() + "\n").encode())
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def release(self) -> None:
    """Empties the holder line and drops the lock (idempotent).

    A workdir this lock created and nothing else wrote into (the run failed
    before it started) is removed again: a typo in --workdir leaves no trace.
    """
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      os.ftruncate(fd, 0)  # While still held: a later reader never sees a stale holder.
      if self._created and os.listdir(self.workdir) == [LOCK_NAME]:
        os.remove(self.path)
        os.rmdir(self.workdir)
    except OSError:
      pass
    os.close(fd)  # Closing the descriptor releases the flock.
