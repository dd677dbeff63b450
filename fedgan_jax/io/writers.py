"""Metric writers: ``metrics.jsonl`` (one object per round) and progress lines."""

from __future__ import annotations

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

  On resume, ``truncate_after(round)`` drops lines written after the restored
  checkpoint so that a resumed run's file equals an uninterrupted run's.
  """

  def __init__(self, path: str, active: bool = True):
    self.path = path
    self.active = active  # False on non-primary processes of a multi-host run.

  def truncate_after(self, round_: int) -> None:
    if not self.active or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [ln for ln in f if ln.strip() and json.loads(ln)["round"] <= round_]
    with open(self.path, "w") as f:
      f.writelines(lines)

  def write(self, record: dict[str, Any]) -> None:
    if not self.active:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({k: to_json_value(v) for k, v in record.items()}, sort_keys=True) + "\n")


class Progress:
  """Round, rounds/sec and ETA, like clu's ``ReportProgress``."""

  def __init__(self, total: int, start: int):
    self.total, self.start = total, start
    self.t0 = time.perf_counter()
    self.last_t, self.last_r = self.t0, start

  def line(self, r: int) -> str:
    now = time.perf_counter()
    rate = (r - self.last_r) / max(now - self.last_t, 1e-9)
    self.last_t, self.last_r = now, r
    eta = (self.total - r) / rate if rate > 0 else float("inf")
    return f"round {r}/{self.total}  {rate:.2f} rounds/s  ETA {eta / 60:.1f} min"
