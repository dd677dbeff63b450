"""metrics.detection: per-round rates, first flagged round, and run means, on hand-checkable inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedgan_jax.metrics.detection import after_warmup, detection_rates, first_flagged_round, mean_rate


def test_detection_rates():
  tpr, fpr = detection_rates(np.array([True, True, False, False]), np.array([True, False, False, False]))
  assert tpr == 1.0 and fpr == pytest.approx(1 / 3)
  tpr, fpr = detection_rates([False, True], [False, False])
  assert math.isnan(tpr) and fpr == 0.5  # No attacker: TPR undefined.
  tpr, fpr = detection_rates([True], [True])
  assert tpr == 1.0 and math.isnan(fpr)  # No honest client: FPR undefined.


def test_first_flagged_round():
  hist = np.array([[False, False, False], [False, True, False], [True, True, False]])
  mal = np.array([True, True, True])
  assert first_flagged_round(hist, mal) == {0: 2, 1: 1, 2: None}
  assert first_flagged_round(hist, np.array([True, False, False]), rounds=[10, 20, 30]) == {0: 30}
  assert first_flagged_round([], mal) == {0: None, 1: None, 2: None}
  with pytest.raises(ValueError, match="expected"):
    first_flagged_round(np.zeros((2, 4), bool), mal)


def test_mean_rate_skips_undefined_rounds():
  assert mean_rate([1.0, None, float("nan"), 0.0]) == 0.5
  assert mean_rate([None, float("nan")]) is None
  assert mean_rate([]) is None


def test_after_warmup_counts_only_rounds_that_can_be_acted_on():
  """warmup 1: rounds 1 and 2 (indices 0, 1) are warm-up; rounds 3 and 4 count."""
  flags = [[True, True], [True, False], [False, True], [False, False]]
  records = [{"round": r + 1, "agg/flagged": f, "agg/weights": [0.2, 0.8]} for r, f in enumerate(flags)]
  out = after_warmup(records, [False, True], 1)
  assert out["warmup_rounds"] == 1
  assert out["tpr_flagged"] == 0.5 and out["fpr_flagged"] == 0.0
  assert out["rounds_flagged"] == 0.5
  assert (out["tpr_acted"], out["fpr_acted"], out["rounds_acted"]) == (0.5, 0.0, 0.5)  # No gate logged: all act.
  assert out["attacker_final_weights"] == [0.8] and out["honest_final_weights"] == [0.2]
  benign = after_warmup(records, [False, False], 1)  # A clean run: the false positives, TPR undefined.
  assert benign["tpr_flagged"] is None and benign["fpr_flagged"] == 0.25


def test_acted_flags_are_the_flags_of_rounds_the_gate_let_act():
  """The paper's rule ignores a round's flags when C // 2 or more are flagged (agg/decay_active False)."""
  rows = [
    ([True, True, True, True], False),  # Round 1, index 0: the warm-up, not counted.
    ([True, False, False, False], True),  # One flag, acted on.
    ([True, True, False, False], False),  # Two of four: the rule does nothing.
    ([False, True, False, False], True),
    ([False, False, False, False], True),
  ]
  records = [
    {"round": r + 1, "agg/flagged": f, "agg/decay_active": a, "agg/weights": [0.25] * 4}
    for r, (f, a) in enumerate(rows)
  ]
  out = after_warmup(records, [True, False, False, False], 0)
  assert out["tpr_flagged"] == 0.5 and out["tpr_acted"] == 0.25
  np.testing.assert_allclose(out["fpr_flagged"], (0 + 1 / 3 + 1 / 3 + 0) / 4)
  np.testing.assert_allclose(out["fpr_acted"], (0 + 0 + 1 / 3 + 0) / 4)
  assert out["rounds_flagged"] == 0.75 and out["rounds_acted"] == 0.5
