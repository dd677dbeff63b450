"""Metric writers: ``metrics.jsonl`` (one object per round) and progress lines."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any

import numpy as np


def to_json_value(v: Any) -> Any:
  """Arrays -> lists, numpy scalars -> Python, NaN/Inf -> None (valid JSON)."""
  a = np.asarray(v)
  if a.dtype == bool:
    return a.tolist()
  if np.issubdtype(a.dtype, np.integer):
    return a.tolist()
  if a.ndim == 0:
    f = float(a)
    return f if math.isfinite(f) else None
  return [to_json_value(x) for x in a]


class JsonlWriter:
  """Appends one JSON object per round to ``metrics.jsonl``.

  On resume, ``truncate_after(round)`` cuts the file back to the restored
  checkpoint, so that a resumed run's file equals an uninterrupted run's.
  """

  def __init__(self, path: str, active: bool = True):
    self.path = path
    self.active = active  # False on non-primary processes of a multi-host run.

  def truncate_after(self, round_: int) -> dict[str, int]:
    """Keeps the records of rounds ``1..round_`` (each once, in order) and drops the rest.

    A line that does not parse (a run killed mid-write) is dropped, not fatal.
    The file is replaced atomically, so a kill during the cut loses nothing.

    Returns:
      ``{"kept": n, "dropped": n, "torn": n}`` (all zero when there is no file).
    """
    counts = {"kept": 0, "dropped": 0, "torn": 0}
    if not self.active or not os.path.exists(self.path):
      return counts
    by_round: dict[int, str] = {}
    with open(self.path) as f:
      for line in f:
        if not line.strip():
          continue
        try:
          r = json.loads(line)["round"]
        except (ValueError, TypeError, KeyError):
          counts["torn"] += 1
          continue
        if isinstance(r, int) and 0 < r <= round_:
          by_round[r] = line if line.endswith("\n") else line + "\n"  # A repeated round: the later line.
        else:
          counts["dropped"] += 1
    counts["kept"] = len(by_round)
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(by_round[r] for r in sorted(by_round))
    os.replace(tmp, self.path)
    return counts

  def write(self, record: dict[str, Any]) -> None:
    if not self.active:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({k: to_json_value(v) for k, v in record.items()}, sort_keys=True) + "\n")


def format_duration(seconds: float) -> str:
  """``"42 s"``, ``"11 min"``, ``"2.5 h"``: as long as a person needs to plan around it."""
  if not math.isfinite(seconds):
    return "?"
  if seconds < 90:
    return f"{seconds:.0f} s"
  if seconds < 90 * 60:
    return f"{seconds / 60:.0f} min"
  return f"{seconds / 3600:.1f} h"


class Progress:
  """Round, rounds/s and ETA, like clu's ``ReportProgress``, with compilation kept out.

  The first round of a process includes compiling (or loading) the round
  program, tens of seconds on a CPU: it is timed on its own (``first``), and
  the rate and ETA come from the rounds after it only.
  """

  def __init__(self, total: int, start: int):
    self.total, self.start = total, start
    self.current = start  # The round being trained (said when interrupted).
    self.t0 = time.perf_counter()
    self.first: float | None = None  # Seconds to the end of the first round, compilation included.
    self._t1: float | None = None
    self._phases: dict[str, float] = {}

  @contextlib.contextmanager
  def timed(self, phase: str):
    """Adds the block's seconds to ``phase`` (evaluation, checkpoints: what is not training)."""
    t = time.perf_counter()
    try:
      yield
    finally:
      self._phases[phase] = self._phases.get(phase, 0.0) + time.perf_counter() - t

  def seconds(self, setup: float) -> dict[str, float]:
    """Where the run's time went: setup, first round (compiling), training, and the timed phases.

    ``training`` is the round loop's time less its first round and the timed phases (so it
    includes writing metrics); the parts add up to the run's wall time so far.
    """
    loop = time.perf_counter() - self.t0
    first = self.first or 0.0
    out = {"setup": setup, "first_round": first, "training": loop - first - sum(self._phases.values())}
    out.update(self._phases)
    return {k: round(v, 2) for k, v in out.items()}

  def first_round_done(self) -> float:
    """Marks the end of this process's first round; returns its duration."""
    if self.first is None:
      self._t1 = time.perf_counter()
      self.first = self._t1 - self.t0
    return self.first

  def line(self, r: int) -> str:
    """``round 40/200  3.1 rounds/s  ETA 52 s`` (or the first round's time, compilation included)."""
    self.first_round_done()
    done = r - (self.start + 1)  # Rounds timed after the first one.
    if done <= 0:
      return f"round {r}/{self.total}  first round {self.first:.1f} s (includes compiling)"
    rate = done / max(time.perf_counter() - self._t1, 1e-9)
    return f"round {r}/{self.total}  {rate:.2f} rounds/s  ETA {format_duration((self.total - r) / rate)}"
