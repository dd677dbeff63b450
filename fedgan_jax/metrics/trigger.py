"""Backdoor success: how much of the trigger generated images carry, against clean images.

The backdoor of Jin & Li, "Backdoor Attack is a Devil in Federated GAN-based
Medical Image Synthesis" (SASHIMI 2022, arXiv 2207.00762) pastes a small trigger
pattern at a fixed location of every real image of the malicious client; the
attack succeeds when the global generator reproduces it. In federated
averaging it usually arrives as a faint ghost, so the measure is an
*amount*, comparable across trigger sizes, patterns and resolutions.

:func:`implant_amplitude` (host NumPy, float64 inside) estimates, per image, the
``a`` of an alpha blend ``(1 - a) x + a t`` of the trigger ``t`` into the
image's own content ``x`` under the trigger region (0 = none, 1 = pasted):

1. the background ``x`` is predicted from the one-pixel ring of pixels around
   the region (a Coons patch: bilinear blending of the four sides, minus the
   corners' bilinear part), which the trigger does not cover;
2. with ``r = patch - background`` and ``d = trigger - background``,
   ``a = <r', d'> / |d'|²``, where ``'`` removes from each channel its mean
   and, for regions of at least 4×4 px, its row and column ramps (what the
   ring's interpolation leaves of smooth shading).

A pasted trigger gives exactly 1; a blend into content that the ring predicts
up to a plane gives exactly ``a``. What the ring cannot predict (texture,
a lesion's edge) is the measure's noise, which is why every run measures the
same estimate on clean held-out real images (its *baseline*; per template)
and reports generated minus clean (:func:`implant_summary`). The fraction of
images above the clean images' 99th percentile (:func:`exceedance_threshold`,
calibrated on one half of the clean images, its false-positive rate measured
on the other) is kept as a secondary number: it is a steep, size-dependent
function of the amplitude, not a fraction of images carrying the trigger.

:func:`trigger_scores` (normalised correlation and the plain regression
coefficient of the mean-removed patch on the trigger) locates the trigger
when its position is unknown (``location='any'``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
  "Exceedance",
  "exceedance_threshold",
  "implant_amplitude",
  "implant_summary",
  "trigger_scores",
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
    coefficient of the former on the latter (the same for a pasted trigger as
    :func:`implant_amplitude`, but biased by the content under it).

  Raises:
    ValueError: on bad shapes, a constant trigger, or a location outside the image.
  """
  x, t0 = _check_inputs(images, trigger)
  sh, sw = t0.shape[:2]
  return _scores_from_patches(_gather(x, _locate(x, t0, location), sh, sw), t0)


def _locate(x: np.ndarray, t0: np.ndarray, location: Location) -> np.ndarray:
  """Per-image ``(top, left)`` as int ``[N, 2]``; ``'any'`` = the position of maximal correlation."""
  n, h, w, _ = x.shape
  sh, sw = t0.shape[:2]
  if isinstance(location, str):
    if location != "any":
      raise ValueError(f"location must be (top, left), an [N, 2] array or 'any'; got {location!r}")
    corr_map, _ = _sliding(x, t0)
    flat = corr_map.reshape(n, -1).argmax(axis=1)
    return np.stack([flat // corr_map.shape[2], flat % corr_map.shape[2]], axis=1)
  locs = np.asarray(location)
  if locs.shape == (2,):
    locs = np.broadcast_to(locs, (n, 2))
  if locs.shape != (n, 2) or not np.issubdtype(locs.dtype, np.integer):
    raise ValueError(f"location must be (top, left) ints or an int [N={n}, 2] array, got {location!r}")
  if (locs < 0).any() or (locs[:, 0] + sh > h).any() or (locs[:, 1] + sw > w).any():
    raise ValueError(f"location puts the {sh}x{sw} trigger outside the {h}x{w} image")
  return locs.astype(np.int64)


def _background(x: np.ndarray, locs: np.ndarray, sh: int, sw: int) -> np.ndarray:
  """Coons-patch prediction of the region's content from the one-pixel ring around it: ``[N, sh, sw, C]``.

  A side that lies outside the image (a region touching the border) is
  replaced by the opposite side.
  """
  n, h, w, _ = x.shape
  top, left = locs[:, 0], locs[:, 1]
  r_top = np.where(top >= 1, top - 1, top + sh)
  r_bot = np.where(top + sh < h, top + sh, top - 1)
  c_lft = np.where(left >= 1, left - 1, left + sw)
  c_rgt = np.where(left + sw < w, left + sw, left - 1)
  idx = np.arange(n)[:, None]
  rows = top[:, None] + np.arange(sh)[None]
  cols = left[:, None] + np.arange(sw)[None]
  t_side, b_side = x[idx, r_top[:, None], cols], x[idx, r_bot[:, None], cols]  # [N, sw, C]
  l_side, r_side = x[idx, rows, c_lft[:, None]], x[idx, rows, c_rgt[:, None]]  # [N, sh, C]
  corner = lambda r, c: x[np.arange(n), r, c][:, None, None]  # [N, 1, 1, C]
  v = ((np.arange(sh) + 1.0) / (sh + 1))[None, :, None, None]  # Down the rows, ring to ring.
  u = ((np.arange(sw) + 1.0) / (sw + 1))[None, None, :, None]  # Across the columns.
  across = (1 - u) * l_side[:, :, None] + u * r_side[:, :, None]
  down = (1 - v) * t_side[:, None] + v * b_side[:, None]
  corners = (
    (1 - v) * (1 - u) * corner(r_top, c_lft)
    + (1 - v) * u * corner(r_top, c_rgt)
    + v * (1 - u) * corner(r_bot, c_lft)
    + v * u * corner(r_bot, c_rgt)
  )
  return across + down - corners


def _nuisance_projector(sh: int, sw: int) -> np.ndarray:
  """``[sh*sw, sh*sw]`` projector removing a constant (and, from 4×4 px, row and column ramps)."""
  yy, xx = np.meshgrid(np.arange(sh) - (sh - 1) / 2, np.arange(sw) - (sw - 1) / 2, indexing="ij")
  basis = [np.ones(sh * sw)]
  if min(sh, sw) >= 4:
    basis += [yy.ravel(), xx.ravel()]
  b = np.stack(basis, axis=1)
  return np.eye(sh * sw) - b @ np.linalg.pinv(b)


def implant_amplitude(images, trigger, location: Location) -> np.ndarray:
  """Per-image amount of the trigger blended into its region (0 = none, 1 = pasted).

  For ``(1 - a) x + a t`` the estimate is ``a`` up to what the surrounding
  ring cannot predict of ``x`` (see the module docstring); a pasted trigger
  gives exactly 1. Subtract the same estimate on clean images
  (:func:`implant_summary`) before reading it as an implant.

  Args:
    images: ``[N, H, W, ch]`` uint8 images, or floats in any range (e.g.
      [-1, 1]).
    trigger: ``[s, s, ch]`` (or ``[s, s, 1]`` / ``[s, s]``, broadcast over
      channels) in the same value range as ``images``; must not be flat.
    location: the trigger's top-left ``(row, col)`` for all images; an int
      ``[N, 2]`` array of per-image positions; or ``'any'`` for the position
      of maximal correlation in each image (biased upwards on clean images:
      compare with a baseline measured the same way).

  Returns:
    float32 ``[N]``.

  Raises:
    ValueError: bad shapes, a flat trigger, a location outside the image, or
      a trigger that leaves no pixel around it.
  """
  x, t0 = _check_inputs(images, trigger)
  n, h, w, ch = x.shape
  sh, sw = t0.shape[:2]
  if sh >= h and sw >= w:
    raise ValueError(f"trigger {t0.shape[:2]} fills the {h}x{w} images: no pixel around it to predict the background")
  t = np.broadcast_to(np.asarray(trigger, np.float64).reshape(sh, sw, -1), (sh, sw, ch))
  locs = _locate(x, t0, location)
  bg = _background(x, locs, sh, sw)
  proj = _nuisance_projector(sh, sw)
  r = proj @ (_gather(x, locs, sh, sw) - bg).reshape(n, sh * sw, ch)  # Batched matmuls, [N, s*s, ch].
  d = proj @ (t[None] - bg).reshape(n, sh * sw, ch)
  t_energy = np.sum((proj @ t.reshape(sh * sw, ch)) ** 2)
  if t_energy <= _EPS:
    raise ValueError("trigger is flat: nothing of it is left once a constant and ramps are removed")
  # A background that already looks like the trigger cannot tell how much was blended: floor the denominator.
  dd = np.maximum(np.einsum("nic,nic->n", d, d), 1e-2 * t_energy)
  return (np.einsum("nic,nic->n", r, d) / dd).astype(np.float32)


def _bootstrap_medians(values: np.ndarray, num: int, rng: np.random.Generator) -> np.ndarray:
  idx = rng.integers(0, len(values), (num, len(values)))
  return np.median(values[idx], axis=1)


def implant_summary(amplitudes, clean_amplitudes, num_bootstrap: int = 1000, level: float = 0.95, seed: int = 0):
  """The headline implant: generated images' median amplitude against clean real images', with a CI.

  ``(median(amplitudes) - b) / (1 - b)`` with ``b = median(clean_amplitudes)``:
  for a blend ``(1 - a) x + a t`` the per-image estimate is about
  ``a + (1 - a) b``, so this reads ``a`` (0 for clean-looking images, 1 for a
  pasted trigger) whatever the template's baseline ``b``.

  Args:
    amplitudes: ``[N]`` :func:`implant_amplitude` of generated images.
    clean_amplitudes: ``[M]`` the same on clean held-out real images (the
      baseline of this template).
    num_bootstrap: bootstrap resamples (both sets resampled independently).
    level: CI coverage.
    seed: the resampling seed (fixed: the same images give the same CI).

  Returns:
    ``{'amplitude', 'lo', 'hi', 'raw', 'baseline'}``: the baseline-corrected
    median, its percentile bootstrap CI, the generated images' median and the
    clean images' median.
  """
  a = np.asarray(amplitudes, np.float64)
  b = np.asarray(clean_amplitudes, np.float64)
  if a.ndim != 1 or b.ndim != 1 or not len(a) or not len(b):
    raise ValueError(f"amplitudes must be non-empty 1-D arrays, got shapes {a.shape} and {b.shape}")
  if not 0.0 < level < 1.0:
    raise ValueError(f"level must be in (0, 1), got {level}")
  rng = np.random.default_rng(seed)
  boot_b = _bootstrap_medians(b, num_bootstrap, rng)
  boots = _corrected(_bootstrap_medians(a, num_bootstrap, rng), boot_b)
  tail = 100.0 * (1.0 - level) / 2.0
  lo, hi = np.percentile(boots, [tail, 100.0 - tail])
  raw, base = float(np.median(a)), float(np.median(b))
  return {"amplitude": float(_corrected(raw, base)), "lo": float(lo), "hi": float(hi), "raw": raw, "baseline": base}


def _corrected(raw, base):
  # Clean baselines sit near 0 (docs/design.md); the floor only keeps a degenerate template finite.
  return (raw - base) / np.maximum(1.0 - base, 0.5)


class Exceedance(NamedTuple):
  """A threshold on the amplitude calibrated on clean images, with its out-of-sample false-positive rate."""

  threshold: float  # The (1 - max_fpr) quantile of the calibration half.
  fpr: float  # Fraction of the other half strictly above it.
  num_calibration: int
  num_test: int


def exceedance_threshold(clean_amplitudes, max_fpr: float = 0.01, seed: int = 0) -> Exceedance:
  """Calibrates ``amplitude > threshold`` on one half of the clean images and measures its FPR on the other.

  The halves are a fixed random split (``seed``). The threshold is the
  ``1 - max_fpr`` empirical quantile of the calibration half
  (``method='higher'``: an observed value), so at most ``max_fpr`` of that
  half lies above it; the other half says what the rate is out of sample.

  Args:
    clean_amplitudes: ``[M]`` amplitudes of clean held-out real images (M >= 2).
    max_fpr: the target false-positive rate, in [0, 1).
    seed: the split's seed.

  Returns:
    An :class:`Exceedance`.
  """
  b = np.asarray(clean_amplitudes, np.float64)
  if b.ndim != 1 or len(b) < 2:
    raise ValueError(f"clean_amplitudes must be a 1-D array of at least 2 values, got shape {b.shape}")
  if not 0.0 <= max_fpr < 1.0:
    raise ValueError(f"max_fpr must be in [0, 1), got {max_fpr}")
  perm = np.random.default_rng(seed).permutation(len(b))
  cal, test = b[perm[: len(b) // 2]], b[perm[len(b) // 2 :]]
  thr = float(np.quantile(cal, 1.0 - max_fpr, method="higher"))
  return Exceedance(thr, float(np.mean(test > thr)), len(cal), len(test))
