"""Reading a run directory back: ``metrics.jsonl``, ``summary.json``, ``config.json``.

One reader for the run itself (resume), the reports and the sweeps. Tolerant
of what a killed run leaves behind: a torn last line of ``metrics.jsonl`` is
skipped, a missing or unreadable JSON file reads as ``None``.
"""

from __future__ import annotations

import json
import os
from typing import Any


def read_json(path: str) -> Any:
  """The JSON value in ``path``, or None when it is missing or unreadable."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def read_records(path: str) -> list[dict[str, Any]]:
  """The records of a ``metrics.jsonl``, sorted by round.

  Lines that do not parse as a JSON object with a ``round`` (a run killed
  mid-write) are skipped. A missing file has no records.
  """
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(rec, dict) and "round" in rec:
        records.append(rec)
  records.sort(key=lambda r: r["round"])
  return records


def read_summary(run_dir: str) -> dict[str, Any] | None:
  """``<run_dir>/summary.json``, or None if absent or unreadable."""
  summary = read_json(os.path.join(run_dir, "summary.json"))
  return summary if isinstance(summary, dict) else None


def is_run_dir(path: str) -> bool:
  """Whether ``path`` holds a run's ``metrics.jsonl``."""
  return os.path.isfile(os.path.join(path, "metrics.jsonl"))
