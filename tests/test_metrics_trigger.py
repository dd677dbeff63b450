"""Backdoor metrics: trigger correlation/strength, calibration, rate (docs/design.md §5)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage

from fedgan_jax import metrics
from fedgan_jax.metrics import trigger as trig

SIZE, S = 32, 6
LOC = (SIZE - S - 2, SIZE - S - 2)  # bottom-right corner with a margin


def _clean_images(n, seed, size=SIZE, channels=3):
  """Smooth random images in [-1, 1] (blurred noise)."""
  rng = np.random.default_rng(seed)
  x = scipy.ndimage.gaussian_filter(rng.standard_normal((n, size, size, channels)), sigma=(0, 2.0, 2.0, 0))
  return np.clip(x / (3 * x.std()), -1, 1)


def _trigger(channels=3):
  """A fixed non-periodic pattern (seeded ±1 blocks with a gradient)."""
  rng = np.random.default_rng(123)
  t = rng.choice([-1.0, 1.0], size=(S, S, 1)) * np.linspace(0.6, 1.0, S)[:, None, None]
  return np.repeat(t, channels, axis=-1)


def _paste(images, t, loc, alpha=1.0):
  out = images.copy()
  top, left = loc
  region = out[:, top : top + S, left : left + S]
  out[:, top : top + S, left : left + S] = (1 - alpha) * region + alpha * t
  return out


@pytest.fixture(scope="module")
def data():
  # The 99th percentile needs a few thousand clean images to be stable
  # (with 600 its held-out FPR ranged 0.3-2.7 % over seeds).
  calib = _clean_images(3000, 0)
  heldout = _clean_images(1000, 1)
  t = _trigger()
  return calib, heldout, t, metrics.calibrate_threshold(calib, t, LOC, max_fpr=0.01)


def test_calibrated_fpr_and_detection(data):
  calib, heldout, t, thr = data
  assert 0.0 < thr < 1.0
  assert metrics.trigger_rate(calib, t, LOC, thr) <= 0.01  # by construction
  assert metrics.trigger_rate(heldout, t, LOC, thr) <= 0.02  # 1 % + sampling noise (0.5-1.7 % over seeds)
  assert metrics.trigger_rate(_paste(heldout, t, LOC), t, LOC, thr) >= 0.99


def test_strength_pasted_clean_and_alpha(data):
  _, heldout, t, thr = data
  corr, strength = metrics.trigger_scores(_paste(heldout, t, LOC), t, LOC)
  np.testing.assert_allclose(corr, 1.0, atol=1e-9)
  np.testing.assert_allclose(strength, 1.0, atol=1e-9)
  assert abs(metrics.trigger_strength(heldout, t, LOC)) < 0.05
  quarter = _paste(heldout, t, LOC, alpha=0.25)
  assert abs(metrics.trigger_strength(quarter, t, LOC) - 0.25) < 0.03
  # A ghost at 1/4 contrast still correlates far above clean images.
  assert metrics.trigger_rate(quarter, t, LOC, thr) > 0.5


def test_scores_match_direct_formula():
  x = _clean_images(5, 2)
  t = _trigger()
  corr, strength = metrics.trigger_scores(x, t, LOC)
  for n in range(5):
    p = x[n, LOC[0] : LOC[0] + S, LOC[1] : LOC[1] + S].ravel()
    p, tt = p - p.mean(), t.ravel() - t.mean()
    np.testing.assert_allclose(corr[n], p @ tt / np.linalg.norm(p) / np.linalg.norm(tt))
    np.testing.assert_allclose(strength[n], p @ tt / (tt @ tt))


def test_grayscale_and_broadcast_trigger():
  x = _paste(_clean_images(20, 3, channels=1), _trigger(1), LOC)
  corr, strength = metrics.trigger_scores(x, _trigger(1)[..., 0], LOC)  # [s, s] trigger
  np.testing.assert_allclose(corr, 1.0, atol=1e-9)
  rgb = _paste(_clean_images(20, 4), _trigger(3), LOC)
  _, s3 = metrics.trigger_scores(rgb, _trigger(1), LOC)  # 1-channel trigger, RGB images
  np.testing.assert_allclose(s3, 1.0, atol=1e-9)


def test_per_image_locations():
  rng = np.random.default_rng(5)
  x = _clean_images(30, 6)
  t = _trigger()
  locs = rng.integers(0, SIZE - S + 1, size=(30, 2))
  pasted = x.copy()
  for n, (top, left) in enumerate(locs):
    pasted[n, top : top + S, left : left + S] = t
  corr, strength = metrics.trigger_scores(pasted, t, locs)
  np.testing.assert_allclose(corr, 1.0, atol=1e-9)
  np.testing.assert_allclose(strength, 1.0, atol=1e-9)


def test_any_location_matches_brute_force_and_finds_trigger():
  x = _clean_images(4, 7, size=20)
  t = _trigger()
  corr, strength = metrics.trigger_scores(x, t, "any")
  # Brute force over every position.
  best = []
  for n in range(4):
    cands = []
    for i in range(20 - S + 1):
      for j in range(20 - S + 1):
        c, s = metrics.trigger_scores(x[n : n + 1], t, (i, j))
        cands.append((c[0], s[0]))
    best.append(max(cands))
  np.testing.assert_allclose(corr, [b[0] for b in best], atol=1e-9)
  np.testing.assert_allclose(strength, [b[1] for b in best], atol=1e-9)
  pasted = _paste(x, t, (3, 9))
  corr, strength = metrics.trigger_scores(pasted, t, "any")
  np.testing.assert_allclose(corr, 1.0, atol=1e-9)
  # Calibrating with 'any' gives a higher (max over positions) threshold.
  clean = _clean_images(200, 8)
  assert metrics.calibrate_threshold(clean, t, "any") > metrics.calibrate_threshold(clean, t, LOC)


def test_errors_name_arguments():
  x = _clean_images(3, 9)
  t = _trigger()
  with pytest.raises(ValueError, match="outside"):
    metrics.trigger_scores(x, t, (SIZE - 2, 0))
  with pytest.raises(ValueError, match="location"):
    metrics.trigger_scores(x, t, "random")
  with pytest.raises(ValueError, match="constant"):
    metrics.trigger_scores(x, np.ones((S, S, 3)), LOC)
  with pytest.raises(ValueError, match="channels"):
    metrics.trigger_scores(x, np.zeros((S, S, 2)), LOC)
  with pytest.raises(ValueError, match="max_fpr"):
    metrics.calibrate_threshold(x, t, LOC, max_fpr=1.5)
  assert trig.trigger_rate(x, t, LOC, threshold=1.0) == 0.0
