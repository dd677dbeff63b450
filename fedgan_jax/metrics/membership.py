"""Membership inference against a generator: does it remember its training images? (GAN-Leaks, full black box.)

Chen et al., "GAN-Leaks: A Taxonomy of Membership Inference Attacks against
Generative Models", CCS 2020, full black-box attack: a real image's score is
its distance to the nearest of N generated images; training images (members)
that the generator memorised sit closer to its samples than held-out images
(non-members). The attack's ROC AUC over members and non-members is the
leak: 0.5 = the generator's samples are no closer to its training images
than to unseen ones, 1 = every member is closer than every non-member.

Distances are Euclidean in whatever space the caller passes: an extractor's
features (as GAN-Leaks), or flattened pixels in [-1, 1] when no feature
network is configured.
"""

from __future__ import annotations

import numpy as np


def nearest_distance(queries: np.ndarray, generated: np.ndarray, chunk: int = 1024) -> np.ndarray:
  """``f64[Q]``: each query's Euclidean distance to its nearest generated sample.

  Args:
    queries: ``[Q, ...]`` real images or features (flattened per row).
    generated: ``[N, ...]`` generated images or features, the same trailing size.
    chunk: queries handled at once (memory is ``chunk x N`` floats).

  Raises:
    ValueError: empty inputs or different trailing sizes.
  """
  q, g = np.asarray(queries, np.float64), np.asarray(generated, np.float64)
  if not len(q) or not len(g):
    raise ValueError(f"membership: need queries and generated samples, got {len(q)} and {len(g)}.")
  q, g = q.reshape(len(q), -1), g.reshape(len(g), -1)
  if q.shape[1] != g.shape[1]:
    raise ValueError(f"membership: queries have {q.shape[1]} values each, generated samples {g.shape[1]}.")
  g2 = (g * g).sum(1)
  out = np.empty(len(q))
  for i in range(0, len(q), chunk):
    x = q[i : i + chunk]
    d2 = (x * x).sum(1)[:, None] - 2.0 * x @ g.T + g2[None, :]
    out[i : i + chunk] = np.sqrt(np.maximum(d2.min(1), 0.0))
  return out


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
  """ROC AUC of scores where higher means "positive": P(pos > neg) + P(pos = neg) / 2 (Mann-Whitney)."""
  pos, neg = np.asarray(positive, np.float64).ravel(), np.asarray(negative, np.float64).ravel()
  if not len(pos) or not len(neg):
    raise ValueError(f"membership: AUC needs both classes, got {len(pos)} and {len(neg)} scores.")
  both = np.concatenate([pos, neg])
  order = np.argsort(both, kind="mergesort")
  ranks = np.empty(len(both))
  sorted_vals = both[order]
  # Average ranks over ties (1-based).
  starts = np.r_[0, np.flatnonzero(np.diff(sorted_vals)) + 1]
  ends = np.r_[starts[1:], len(both)]
  for s, e in zip(starts, ends):
    ranks[order[s:e]] = (s + e + 1) / 2.0
  u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
  return float(u / (len(pos) * len(neg)))


def mia_auc(members: np.ndarray, nonmembers: np.ndarray, generated: np.ndarray) -> float:
  """The full black-box attack's ROC AUC: members scored by how close they are to the generated samples.

  Args:
    members: ``[M, ...]`` training images (or their features).
    nonmembers: ``[H, ...]`` held-out images never trained on (same space).
    generated: ``[N, ...]`` the generator's samples (same space).

  Returns:
    AUC in [0, 1]; 0.5 = no leak.
  """
  return auc(-nearest_distance(members, generated), -nearest_distance(nonmembers, generated))
