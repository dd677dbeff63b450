"""Loading a run directory for the reports, and finding the runs of a sweep directory.

A *run directory* holds ``metrics.jsonl`` (and normally ``config.json``,
``summary.json``, ``samples/``). A *sweep directory* holds run directories
(each with ``summary.json`` and ``config.json``) as children or grandchildren.
"""

from __future__ import annotations

import glob
import math
import os
import re
from typing import Any

import numpy as np

from fedgan_jax.io.rundir import is_run_dir, read_json, read_records
from fedgan_jax.metrics.detection import first_flagged_round

REPORT_DIR = "report"  # Where the reports go, inside the run or sweep directory.


class NotARunError(ValueError):
  """The directory is neither a run directory nor a sweep directory."""


def is_sweep_member(path: str) -> bool:
  """Whether ``path`` is a finished-enough run to compare: it has ``summary.json`` and ``config.json``."""
  return os.path.isfile(os.path.join(path, "summary.json")) and os.path.isfile(os.path.join(path, "config.json"))


def find_runs(sweep_dir: str) -> list[str]:
  """Run directories of a sweep: children, or grandchildren, with summary.json + config.json.

  Args:
    sweep_dir: The sweep's root directory.

  Returns:
    Sorted absolute paths.
  """
  runs = []
  for child in sorted(os.listdir(sweep_dir)):
    p = os.path.join(sweep_dir, child)
    if not os.path.isdir(p) or child == REPORT_DIR:
      continue
    if is_sweep_member(p):
      runs.append(p)
      continue
    for grandchild in sorted(os.listdir(p)):  # Replica groups: <group>/seed_<s>/.
      q = os.path.join(p, grandchild)
      if os.path.isdir(q) and is_sweep_member(q):
        runs.append(q)
  return runs


class Run:
  """One run directory, loaded: its records, config, summary and trigger calibration.

  Attributes:
    workdir: The run directory.
    records: ``metrics.jsonl`` records, by round.
    config: ``config.json`` (``{}`` when absent).
    summary: ``summary.json`` (``{}`` while the run is in progress or after it was interrupted).
    calibration: ``trigger_calibration.json`` (``{}`` when absent).
    rounds: ``float[R]`` round numbers of the records.
    num_clients: Length of the per-client lists (else ``config.num_clients``).
    malicious: Sorted attacker indices (from the summary, else the config).
  """

  def __init__(self, workdir: str):
    if not is_run_dir(workdir):
      raise NotARunError(
        f"{workdir!r} is not a run directory: it has no metrics.jsonl "
        "(expected the --workdir of `python -m fedgan_jax.main`)."
      )
    self.workdir = workdir
    self.records = read_records(os.path.join(workdir, "metrics.jsonl"))
    self.config = read_json(os.path.join(workdir, "config.json")) or {}
    self.summary = read_json(os.path.join(workdir, "summary.json")) or {}
    self.calibration = read_json(os.path.join(workdir, "trigger_calibration.json")) or {}
    self.rounds = np.array([r["round"] for r in self.records], dtype=float)
    lens = [
      len(v) for r in self.records for k, v in r.items() if k.startswith(("train/", "agg/")) and isinstance(v, list)
    ]
    self.num_clients = max(lens) if lens else int(self.config.get("num_clients", 0) or 0)
    mal = self.summary.get("malicious", None)
    if mal is None:
      mal = (self.config.get("attack") or {}).get("malicious", [])
    self.malicious = sorted({int(c) for c in (mal or []) if 0 <= int(c) < max(self.num_clients, 1)})

  def keys(self) -> list[str]:
    """Every key of any record, in first-seen order."""
    out: dict[str, None] = {}
    for r in self.records:
      out.update(dict.fromkeys(r))
    return list(out)

  def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Rounds and float values where ``key`` is a finite scalar."""
    xs, ys = [], []
    for r in self.records:
      v = r.get(key)
      if isinstance(v, bool):
        v = float(v)
      if isinstance(v, (int, float)) and math.isfinite(v):
        xs.append(r["round"])
        ys.append(float(v))
    return np.array(xs, dtype=float), np.array(ys, dtype=float)

  def matrix(self, key: str) -> np.ndarray | None:
    """``[C, R]`` floats of a per-client list metric (NaN where missing/null); None if absent."""
    if not any(isinstance(r.get(key), list) for r in self.records):
      return None
    m = np.full((self.num_clients, len(self.records)), np.nan)
    for j, r in enumerate(self.records):
      v = r.get(key)
      if not isinstance(v, list):
        continue
      for c, x in enumerate(v[: self.num_clients]):
        if isinstance(x, bool):
          x = float(x)
        if isinstance(x, (int, float)) and math.isfinite(x):
          m[c, j] = float(x)
    return m

  @property
  def final(self) -> dict[str, Any]:
    """The summary's final metrics, else the last non-null value of every key so far."""
    if isinstance(self.summary.get("final"), dict):
      return self.summary["final"]
    final: dict[str, Any] = {}
    for rec in self.records:
      final.update({k: v for k, v in rec.items() if not k.startswith("z/") and v is not None})
    return final

  def first_flag_rounds(self) -> dict[int, int | None]:
    """First round each attacker was flagged (from summary.json, else from the records)."""
    ff = self.summary.get("first_flag_round")
    if isinstance(ff, dict):
      return {int(k): v for k, v in ff.items()}
    flagged = self.matrix("agg/flagged")
    hist = np.zeros((len(self.records), self.num_clients), bool) if flagged is None else (flagged > 0.5).T
    is_mal = np.zeros(self.num_clients, bool)
    is_mal[self.malicious] = True
    return first_flagged_round(hist, is_mal, rounds=self.rounds.astype(int))

  def samples(self) -> list[tuple[int, str]]:
    """``(round, path)`` of the sample grids, by round."""
    out = []
    for p in glob.glob(os.path.join(self.workdir, "samples", "round_*.png")):
      m = re.search(r"round_(\d+)\.png$", p)
      if m:
        out.append((int(m.group(1)), p))
    return sorted(out)
