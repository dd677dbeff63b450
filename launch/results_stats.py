"""Statistics over seeds for the results pages: bootstrap CIs of means, rank tests, counts above a floor.

Each setting of ``configs/results.py`` runs ``NUM_SEEDS`` seeds; a verdict
compares two settings' per-seed values. Two settings are called
*distinguishable* only when both tests agree: their 95 % bootstrap CIs of the
mean do not overlap and a two-sided Mann-Whitney U test (scipy; exact without
ties) gives p < 0.05. Anything less is "not distinguishable", said as such.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import scipy.stats

ALPHA = 0.05


class MeanCI(NamedTuple):
  mean: float
  lo: float
  hi: float
  n: int


def clean_values(values: Sequence[float | None]) -> list[float]:
  """The finite numbers of ``values`` (None and NaN dropped)."""
  return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(float(v))]


def mean_ci(values: Sequence[float | None], level: float = 0.95, num: int = 10000, seed: int = 0) -> MeanCI | None:
  """The mean and its percentile bootstrap CI over seeds (None without values; a single value is its own CI).

  Args:
    values: one value per seed.
    level: CI coverage.
    num: bootstrap resamples.
    seed: resampling seed (fixed: the page is reproducible).
  """
  xs = np.asarray(clean_values(values))
  if not len(xs):
    return None
  if len(xs) == 1:
    return MeanCI(float(xs[0]), float(xs[0]), float(xs[0]), 1)
  means = xs[np.random.default_rng(seed).integers(0, len(xs), (num, len(xs)))].mean(axis=1)
  tail = 100.0 * (1.0 - level) / 2.0
  lo, hi = np.percentile(means, [tail, 100.0 - tail])
  return MeanCI(float(xs.mean()), float(lo), float(hi), len(xs))


class Comparison(NamedTuple):
  a: MeanCI
  b: MeanCI
  p: float  # Two-sided Mann-Whitney U.
  overlap: bool  # The two CIs overlap.
  distinguishable: bool  # No overlap and p < ALPHA.


def compare(a: Sequence[float | None], b: Sequence[float | None]) -> Comparison | None:
  """Two settings' per-seed values side by side (None when either has fewer than 2 values)."""
  xa, xb = clean_values(a), clean_values(b)
  if len(xa) < 2 or len(xb) < 2:
    return None
  ties = len(set(xa) | set(xb)) < len(xa) + len(xb)
  p = float(scipy.stats.mannwhitneyu(xa, xb, alternative="two-sided", method="asymptotic" if ties else "exact").pvalue)
  ca, cb = mean_ci(xa), mean_ci(xb)
  overlap = not (ca.hi < cb.lo or cb.hi < ca.lo)
  return Comparison(ca, cb, p, overlap, (not overlap) and p < ALPHA)


def above(values: Sequence[float | None], floor: float | None) -> tuple[int, int]:
  """``(k, n)``: how many of the ``n`` values are strictly above ``floor`` (k = 0 when there is no floor)."""
  xs = clean_values(values)
  return (sum(x > floor for x in xs) if floor is not None else 0), len(xs)
