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


def detection_rates(flagged, is_malicious, sampled=None) -> tuple[float, float]:
  """True- and false-positive rates of one round's flags.

  Args:
    flagged: ``bool[C]`` the detector's flags.
    is_malicious: ``bool[C]`` ground truth.
    sampled: ``bool[C]``, the clients that took part in the round
      (``agg/sampled`` with ``config.clients_per_round``); None: all of them.
      Only they count: a client that sat the round out was not judged.

  Returns:
    ``(tpr, fpr)``: TP / #malicious and FP / #honest among the clients of
    the round. A rate whose denominator is 0 is NaN: ``tpr`` is undefined
    without attackers (a clean run, or a round none was drawn for), ``fpr``
    without honest clients; ``mean_rate`` skips them.
  """
  flagged = np.asarray(flagged, bool)
  mal = np.asarray(is_malicious, bool)
  took_part = np.ones(mal.shape, bool) if sampled is None else np.asarray(sampled, bool)
  flagged, honest, mal = flagged[took_part], ~mal[took_part], mal[took_part]
  tpr = float(flagged[mal].mean()) if mal.any() else float("nan")
  fpr = float(flagged[honest].mean()) if honest.any() else float("nan")
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


def acted_flags(record: dict) -> np.ndarray:
  """The flags of one round that changed weights.

  The paper's detection acts on a round's flags only when fewer than C // 2
  clients are flagged (and after its warm-up): its ``decay`` stage logs that
  as ``agg/decay_active``. Rules without such a gate act on every flag.

  Args:
    record: a ``metrics.jsonl`` record with ``agg/flagged``.

  Returns:
    ``bool[C]``.
  """
  flagged = np.asarray(record["agg/flagged"], bool)
  active = record.get("agg/decay_active")
  return flagged if active is None else flagged & bool(active)


def after_warmup(records: Sequence[dict], is_malicious, warmup_rounds: int) -> dict[str, Any]:
  """Detection over the rounds whose flags can change weights, and the final weights.

  The paper's code acts on flags from round index ``warmup_rounds + 1`` on
  (``epoch > warmup``); ``metrics.jsonl`` numbers rounds from 1, so these are
  the records with ``round - 1 > warmup_rounds``. This is what a benign run's
  false positives are read from. Two kinds of rate, named for what they
  count: ``*_flagged`` counts the detector's flags, ``*_acted`` only the flags
  that changed weights (:func:`acted_flags`: the paper's rule ignores a
  round's flags when C // 2 or more clients are flagged).

  Args:
    records: ``metrics.jsonl`` records (``agg/flagged``, ``agg/weights``,
      ``agg/decay_active`` where the rule has it).
    is_malicious: ``bool[C]`` ground truth.
    warmup_rounds: the detector's warm-up (0 for rules without one).

  Returns:
    ``{'warmup_rounds', 'tpr_flagged', 'fpr_flagged', 'rounds_flagged',
    'tpr_acted', 'fpr_acted', 'rounds_acted', 'attacker_final_weights',
    'honest_final_weights'}``: TPR / FPR of the flags (mean over rounds;
    None when undefined), the fraction of rounds with at least one flag, the
    same for the acted-on flags, and the last round's weights. With
    clients sampled per round (``agg/sampled`` in the records) the rates are
    over each round's sampled clients, and a client not sampled in the last
    round has weight NaN.
  """
  mal = np.asarray(is_malicious, bool)
  after = [r for r in records if r["round"] - 1 > warmup_rounds]
  out: dict[str, Any] = {"warmup_rounds": int(warmup_rounds)}
  for kind, flags in (
    ("flagged", [np.asarray(r["agg/flagged"], bool) for r in after]),
    ("acted", [acted_flags(r) for r in after]),
  ):
    rates = [detection_rates(f, mal, r.get("agg/sampled")) for f, r in zip(flags, after)]
    out[f"tpr_{kind}"] = mean_rate(t for t, _ in rates)
    out[f"fpr_{kind}"] = mean_rate(f for _, f in rates)
    out[f"rounds_{kind}"] = mean_rate(float(f.any()) for f in flags)
  weights = np.asarray(records[-1]["agg/weights"], float) if records else np.zeros(mal.shape)
  out["attacker_final_weights"] = weights[mal].tolist()
  out["honest_final_weights"] = weights[~mal].tolist()
  return out
