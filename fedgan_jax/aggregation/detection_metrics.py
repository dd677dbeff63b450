"""Detection quality against the ground-truth malicious mask (DESIGN §5).

These live outside the aggregators on purpose: an aggregator never sees
``is_malicious``. They score the ``flagged`` diagnostics of a detector (e.g.
the Isolation Forest of Jin & Li, SASHIMI 2022) as ``eval/detect_tpr`` and
``eval/detect_fpr``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def detection_rates(flagged: jax.Array, is_malicious: jax.Array) -> dict[str, jax.Array]:
  """True- and false-positive rates of one round's flags (jittable).

  Args:
    flagged: ``bool[C]`` the detector's flags.
    is_malicious: ``bool[C]`` ground truth.

  Returns:
    ``{'tpr': TP / #malicious, 'fpr': FP / #honest}`` as float32 scalars. A rate
    whose denominator is 0 is NaN: ``tpr`` is undefined without attackers
    (a clean run), ``fpr`` without honest clients. Aggregate NaN-aware
    (``np.nanmean``) over rounds or runs.
  """
  flagged = jnp.asarray(flagged, bool)
  is_malicious = jnp.asarray(is_malicious, bool)
  pos = jnp.sum(is_malicious).astype(jnp.float32)
  neg = jnp.sum(~is_malicious).astype(jnp.float32)
  tp = jnp.sum(flagged & is_malicious).astype(jnp.float32)
  fp = jnp.sum(flagged & ~is_malicious).astype(jnp.float32)
  nan = jnp.float32(jnp.nan)
  return {
      "tpr": jnp.where(pos > 0, tp / jnp.maximum(pos, 1.0), nan),
      "fpr": jnp.where(neg > 0, fp / jnp.maximum(neg, 1.0), nan),
  }


def first_flagged_round(flagged_history: Sequence[np.ndarray] | np.ndarray,
                        is_malicious: np.ndarray,
                        rounds: Sequence[int] | None = None) -> dict[int, int | None]:
  """Host-side: the first round in which each attacker was flagged.

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
  for c in np.flatnonzero(mal):  # Host-side metrics, not the hot path.
    hits = np.flatnonzero(hist[:, c])
    out[int(c)] = int(rounds[hits[0]]) if hits.size else None
  return out
