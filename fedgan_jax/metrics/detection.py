"""Detection quality against the ground-truth malicious mask (outside the aggregators).

An aggregator never sees ``is_malicious``: these functions score its
``flagged`` diagnostics after the fact, for ``eval/detect_tpr`` /
``eval/detect_fpr`` per round, the first round each attacker was flagged, and
the run-level means in ``summary.json`` and the reports. Host-side (numpy).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


def detection_rates(flagged, is_malicious) -> tuple[float, float]:
  """True- and false-positive rates of one round's flags.

  Args:
    flagged: ``bool[C]`` the detector's flags.
    is_malicious: ``bool[C]`` ground truth.

  Returns:
    ``(tpr, fpr)``: TP / #malicious and FP / #honest. A rate whose
    denominator is 0 is NaN: ``tpr`` is undefined without attackers (a clean
    run), ``fpr`` without honest clients; ``mean_rate`` skips them.
  """
  flagged = np.asarray(flagged, bool)
  mal = np.asarray(is_malicious, bool)
  tpr = float(flagged[mal].mean()) if mal.any() else float("nan")
  fpr = float(flagged[~mal].mean()) if (~mal).any() else float("nan")
  return tpr, fpr


def first_flagged_round(
  flagged_history: Sequence[np.ndarray] | np.ndarray, is_malicious, rounds: Sequence[int] | None = None
) -> dict[int, int | None]:
  """The first round in which each attacker was flagged.

  Args:
    flagged_history: ``bool[R, C]`` (or a list of ``bool[C]``), one row per
      logged round, in order.
    is_malicious: ``bool[C]`` ground truth.
    rounds: the round number of each row (default ``0..R-1``).

  Returns:
    ``{client_index: first round flagged, or None if never}`` for every
    malicious client (JSON-friendly).

  Raises:
    ValueError: shapes disagree.
  """
  mal = np.asarray(is_malicious, bool)
  hist = np.asarray(flagged_history, bool)
  if hist.size == 0:
    hist = np.zeros((0, mal.shape[0]), bool)
  if hist.ndim != 2 or hist.shape[1] != mal.shape[0]:
    raise ValueError(f"flagged_history has shape {hist.shape}; expected [R, {mal.shape[0]}].")
  rounds = np.arange(hist.shape[0]) if rounds is None else np.asarray(rounds)
  if rounds.shape != (hist.shape[0],):
    raise ValueError(f"rounds has shape {rounds.shape}, flagged_history has {hist.shape[0]} rows.")
  out: dict[int, int | None] = {}
  for c in np.flatnonzero(mal):
    hits = np.flatnonzero(hist[:, c])
    out[int(c)] = int(rounds[hits[0]]) if hits.size else None
  return out


def mean_rate(values: Iterable[Any]) -> float | None:
  """The mean of per-round rates, skipping undefined ones (None, NaN); None if none is defined."""
  xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
  return float(np.mean(xs)) if xs else None


def after_warmup(records: Sequence[dict], is_malicious, warmup_rounds: int) -> dict[str, Any]:
  """Detection over the rounds whose flags can change weights, and the final weights.

  The paper's code acts on flags from round index ``warmup_rounds + 1`` on
  (``epoch > warmup``); ``metrics.jsonl`` numbers rounds from 1, so these are
  the records with ``round - 1 > warmup_rounds``. This is what a benign run's
  false positives are read from.

  Args:
    records: ``metrics.jsonl`` records (``agg/flagged``, ``agg/weights``).
    is_malicious: ``bool[C]`` ground truth.
    warmup_rounds: the detector's warm-up (0 for rules without one).

  Returns:
    ``{'warmup_rounds', 'tpr_after_warmup', 'fpr_after_warmup',
    'rounds_with_a_flag_after_warmup', 'attacker_final_weights',
    'honest_final_weights'}`` (rates None when undefined).
  """
  mal = np.asarray(is_malicious, bool)
  after = [r for r in records if r["round"] - 1 > warmup_rounds]
  rates = [detection_rates(r["agg/flagged"], mal) for r in after]
  weights = np.asarray(records[-1]["agg/weights"], float) if records else np.zeros(mal.shape)
  return {
    "warmup_rounds": int(warmup_rounds),
    "tpr_after_warmup": mean_rate(t for t, _ in rates),
    "fpr_after_warmup": mean_rate(f for _, f in rates),
    "rounds_with_a_flag_after_warmup": mean_rate(float(any(r["agg/flagged"])) for r in after),
    "attacker_final_weights": weights[mal].tolist(),
    "honest_final_weights": weights[~mal].tolist(),
  }
