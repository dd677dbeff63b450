"""metrics.membership: nearest distances and the attack's AUC against numpy and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fedgan_jax.metrics import membership


def test_nearest_distance_against_brute_force():
  rng = np.random.default_rng(0)
  q, g = rng.normal(size=(37, 3, 4, 2)), rng.normal(size=(50, 3, 4, 2))
  brute = np.linalg.norm(q.reshape(37, 1, -1) - g.reshape(1, 50, -1), axis=-1).min(1)
  np.testing.assert_allclose(membership.nearest_distance(q, g, chunk=8), brute, rtol=1e-9, atol=1e-9)
  assert membership.nearest_distance(g[:3], g).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_scikit_learn_with_ties(seed):
  rng = np.random.default_rng(seed)
  pos = rng.integers(0, 6, size=rng.integers(1, 40)).astype(float)  # Small integers: many ties.
  neg = rng.integers(0, 6, size=rng.integers(1, 40)).astype(float)
  labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
  if len(set(labels)) == 2:
    assert membership.auc(pos, neg) == pytest.approx(roc_auc_score(labels, np.r_[pos, neg]), abs=1e-12)


def test_memorised_members_leak_and_unseen_samples_do_not():
  rng = np.random.default_rng(1)
  members, nonmembers = rng.normal(size=(64, 8)), rng.normal(size=(64, 8))
  assert membership.mia_auc(members, nonmembers, members + 1e-3) == 1.0  # A generator that copies its data.
  fresh = rng.normal(size=(2000, 8))  # Samples of the distribution, no copy of anyone.
  assert 0.35 < membership.mia_auc(members, nonmembers, fresh) < 0.65
  assert membership.auc([1.0], [1.0]) == 0.5 and membership.auc([2.0, 3.0], [1.0]) == 1.0


def test_bad_inputs_are_clear_errors():
  with pytest.raises(ValueError, match="queries have 4 values each, generated samples 3"):
    membership.nearest_distance(np.zeros((2, 4)), np.zeros((2, 3)))
  with pytest.raises(ValueError, match="need queries and generated samples, got 0 and 2"):
    membership.nearest_distance(np.zeros((0, 3)), np.zeros((2, 3)))
  with pytest.raises(ValueError, match="AUC needs both classes"):
    membership.auc([], [1.0])
