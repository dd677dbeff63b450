"""Backdoor success metrics: is the trigger present in generated images, and how strongly?

The backdoor of Jin & Li, "Backdoor Attack is a Devil in Federated GAN-based
Medical Image Synthesis" (SASHIMI 2022, arXiv 2207.00762) pastes a small trigger
pattern at a fixed location of every real image of the malicious client; the
attack succeeds when the global generator reproduces it. docs/design.md §5 defines two
numbers (host-side NumPy, float64):

* ``eval/trigger_rate`` -- fraction of images whose trigger-region patch
  correlates with the trigger above a threshold calibrated so that clean real
  images score above it at most ``max_fpr`` (1 %) of the time;
* ``eval/trigger_strength`` -- median over images of the regression
  coefficient of the mean-removed patch on the mean-removed trigger
  (1 = fully pasted, 0 = absent, ``a`` for an alpha blend ``(1-a) x + a t``).

Why both: in federated averaging the trigger typically reaches the global
generator as a faint ghost (about 1/C of the pasted contrast) which a
correlation-only rate already counts as present.

Correlation and strength, per image ``n`` with patch ``p`` and trigger ``t``
(both ``[s, s, C]``, mean removed over all their pixels and channels)::

    corr[n]     = <p, t> / (|p| |t|)        in [-1, 1]
    strength[n] = <p, t> / |t|²             (least-squares fit p ≈ strength · t)

Locations: a fixed ``(top, left)``; a per-image ``[N, 2]`` array (e.g. for
``attack.trigger_location = 'random'`` when the generator is conditioned on, or
known to use, a location); or ``'any'``: the position with the highest
correlation among all positions (a sliding normalised cross-correlation, FFT
based), for when the location is unknown. ``'any'`` takes a max over many
positions, so clean images score higher: calibrate the threshold with the same
``location`` you score with (the functions below do so when given the same
arguments).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
  "trigger_scores",
  "calibrate_threshold",
  "trigger_rate",
  "trigger_strength",
]

Location = Sequence[int] | np.ndarray | str
_EPS = 1e-12


def _check_inputs(images, trigger) -> tuple[np.ndarray, np.ndarray]:
  x = np.asarray(images, np.float64)
  t = np.asarray(trigger, np.float64)
  if x.ndim != 4:
    raise ValueError(f"images must be [N, H, W, C], got shape {x.shape}")
  if t.ndim == 2:
    t = t[..., None]
  if t.ndim != 3 or t.shape[0] < 1 or t.shape[1] < 1:
    raise ValueError(f"trigger must be [s, s, C] (or [s, s]), got shape {t.shape}")
  if t.shape[2] not in (1, x.shape[3]):
    raise ValueError(
      f"trigger has {t.shape[2]} channels but images have {x.shape[3]}; use 1 (broadcast) or {x.shape[3]}"
    )
  if t.shape[0] > x.shape[1] or t.shape[1] > x.shape[2]:
    raise ValueError(f"trigger {t.shape[:2]} larger than images {x.shape[1:3]}")
  t = np.broadcast_to(t, t.shape[:2] + (x.shape[3],))
  t0 = t - t.mean()
  if np.sum(t0 * t0) <= _EPS:
    raise ValueError("trigger is constant: its mean-removed pattern is zero, so correlation with it is undefined")
  return x, t0


def _scores_from_patches(p: np.ndarray, t0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  p0 = p - p.mean(axis=(1, 2, 3), keepdims=True)
  dot = np.einsum("nhwc,hwc->n", p0, t0)
  tt = np.sum(t0 * t0)
  pp = np.einsum("nhwc,nhwc->n", p0, p0)
  corr = dot / np.sqrt(np.maximum(pp * tt, _EPS))
  return corr, dot / tt


def _gather(x: np.ndarray, locs: np.ndarray, sh: int, sw: int) -> np.ndarray:
  rows = locs[:, 0, None] + np.arange(sh)[None, :]
  cols = locs[:, 1, None] + np.arange(sw)[None, :]
  n = np.arange(x.shape[0])[:, None, None]
  return x[n, rows[:, :, None], cols[:, None, :]]


def _sliding(x: np.ndarray, t0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Correlation and strength at every valid position: ``[N, H-s+1, W-s+1]`` each."""
  n, h, w, c = x.shape
  sh, sw = t0.shape[:2]
  k = sh * sw * c
  # <p - mean(p), t0> = <p, t0> since t0 sums to zero: a plain cross-correlation.
  fx = np.fft.rfft2(x, axes=(1, 2))
  ft = np.fft.rfft2(t0, s=(h, w), axes=(0, 1))
  num = np.fft.irfft2(fx * np.conj(ft)[None], s=(h, w), axes=(1, 2)).sum(-1)
  num = num[:, : h - sh + 1, : w - sw + 1]

  # |p - mean(p)|² = sum p² - (sum p)² / k, from box sums (integral images).
  def box(v):
    s = np.pad(v.sum(-1), ((0, 0), (1, 0), (1, 0))).cumsum(1).cumsum(2)
    return s[:, sh:, sw:] - s[:, :-sh, sw:] - s[:, sh:, :-sw] + s[:, :-sh, :-sw]

  s1, s2 = box(x), box(x * x)
  pp = np.maximum(s2 - s1 * s1 / k, 0.0)
  tt = np.sum(t0 * t0)
  corr = num / np.sqrt(np.maximum(pp * tt, _EPS))
  return corr, num / tt


def trigger_scores(images, trigger, location: Location) -> tuple[np.ndarray, np.ndarray]:
  """Per-image trigger correlation and strength.

  Args:
    images: ``[N, H, W, C]`` images in [-1, 1] (any float dtype).
    trigger: ``[s, s, C]`` (or ``[s, s, 1]`` / ``[s, s]``, broadcast over
      channels) trigger pattern in [-1, 1]; must not be constant.
    location: where the trigger's top-left corner is: ``(top, left)`` for all
      images; an int array ``[N, 2]`` of per-image ``(top, left)``; or the
      string ``'any'`` to take, per image, the position of maximum
      correlation (and the strength there).

  Returns:
    ``(corr [N], strength [N])`` float64 arrays: normalised correlation of the
    mean-removed patch with the mean-removed trigger, and the regression
    coefficient of the former on the latter (see the module docstring).

  Raises:
    ValueError: on bad shapes, a constant trigger, or a location outside the image.
  """
  x, t0 = _check_inputs(images, trigger)
  n, h, w, _ = x.shape
  sh, sw = t0.shape[:2]
  if isinstance(location, str):
    if location != "any":
      raise ValueError(f"location must be (top, left), an [N, 2] array or 'any'; got {location!r}")
    corr_map, strength_map = _sliding(x, t0)
    flat = corr_map.reshape(n, -1).argmax(axis=1)
    rows = np.arange(n)
    return (corr_map.reshape(n, -1)[rows, flat], strength_map.reshape(n, -1)[rows, flat])
  locs = np.asarray(location)
  if locs.shape == (2,):
    locs = np.broadcast_to(locs, (n, 2))
  if locs.shape != (n, 2) or not np.issubdtype(locs.dtype, np.integer):
    raise ValueError(f"location must be (top, left) ints or an int [N={n}, 2] array, got {location!r}")
  if (locs < 0).any() or (locs[:, 0] + sh > h).any() or (locs[:, 1] + sw > w).any():
    raise ValueError(f"location puts the {sh}x{sw} trigger outside the {h}x{w} image")
  return _scores_from_patches(_gather(x, locs, sh, sw), t0)


def calibrate_threshold(clean_images, trigger, location: Location, max_fpr: float = 0.01) -> float:
  """Correlation threshold such that at most ``max_fpr`` of clean images exceed it.

  The threshold is the empirical ``1 - max_fpr`` quantile of the clean
  images' correlations (``method='higher'``, i.e. an observed value), so the
  fraction of clean images *strictly above* it is <= ``max_fpr``. With fewer
  than ``1 / max_fpr`` clean images it is their maximum.

  Args:
    clean_images: ``[N, H, W, C]`` clean real images in [-1, 1].
    trigger: the trigger pattern (see :func:`trigger_scores`).
    location: as in :func:`trigger_scores`; use the same value when scoring.
    max_fpr: allowed false-positive rate on clean images, in [0, 1).

  Returns:
    The threshold on ``corr`` (a float).
  """
  if not 0.0 <= max_fpr < 1.0:
    raise ValueError(f"max_fpr must be in [0, 1), got {max_fpr}")
  corr, _ = trigger_scores(clean_images, trigger, location)
  return float(np.quantile(corr, 1.0 - max_fpr, method="higher"))


def trigger_rate(images, trigger, location: Location, threshold: float) -> float:
  """Fraction of images whose trigger correlation is strictly above ``threshold``.

  Args:
    images: ``[N, H, W, C]`` images (e.g. generated) in [-1, 1].
    trigger: the trigger pattern (see :func:`trigger_scores`).
    location: as in :func:`trigger_scores`.
    threshold: from :func:`calibrate_threshold` on clean real images.

  Returns:
    ``eval/trigger_rate`` in [0, 1].
  """
  corr, _ = trigger_scores(images, trigger, location)
  return float(np.mean(corr > threshold))


def trigger_strength(images, trigger, location: Location) -> float:
  """Median regression coefficient of the patch on the trigger (``eval/trigger_strength``).

  Args:
    images: ``[N, H, W, C]`` images in [-1, 1].
    trigger: the trigger pattern (see :func:`trigger_scores`).
    location: as in :func:`trigger_scores`.

  Returns:
    Median strength: ≈1 when fully pasted, ≈0 when absent, ≈a for an alpha
    blend of weight ``a``.
  """
  _, strength = trigger_scores(images, trigger, location)
  return float(np.median(strength))
