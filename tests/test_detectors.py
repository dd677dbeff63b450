"""Detectors (JAX Isolation Forest vs sklearn, robust z-score), the
detect-and-decay defense of Jin & Li (SASHIMI 2022) with golden weight
sequences."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.ensemble import IsolationForest
from sklearn.ensemble._iforest import _average_path_length

from fedgan_jax import aggregation
from fedgan_jax.aggregation import isolation_forest, robust_zscore
from fedgan_jax.aggregation.detectors import average_path_length

iforest = jax.jit(isolation_forest, static_argnames=("num_trees", "max_samples", "max_depth"))
zscore = jax.jit(robust_zscore, static_argnames=())


def all_fit(x):
  return jnp.ones(x.shape[0], bool)


def two_far_outliers(seed):
  """20 inliers from N(0, 1) and 2 points at 50."""
  r = np.random.default_rng(seed)
  return np.concatenate([r.normal(size=20), [50.0, 50.0]])[:, None].astype(np.float32)


# ------------------------------------------------------------ isolation forest


def test_average_path_length_matches_sklearn():
  n = np.arange(0, 300)
  np.testing.assert_allclose(average_path_length(n), _average_path_length(n), rtol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_isolation_forest_agrees_with_sklearn(seed):
  """Same scores up to Monte-Carlo noise, same flags wherever the call is clear.

  Note: with contamination='auto' (s > 0.5) sklearn itself flags the extreme
  N(0,1) inliers of 22 points too (2-6 of them, depending on the draw); the
  two points at 50 are flagged by both, and both agree on every point whose
  score is not within 0.03 of the 0.5 threshold.
  """
  x = two_far_outliers(seed)
  scores, flagged = iforest(x, all_fit(x), jax.random.key(seed), num_trees=500)
  sk = IsolationForest(n_estimators=1000, contamination="auto", random_state=seed).fit(x)
  sk_scores = -sk.score_samples(x)
  np.testing.assert_allclose(scores, sk_scores, atol=0.03)
  sk_flagged = sk.predict(x) == -1
  assert flagged[20] and flagged[21] and sk_flagged[20] and sk_flagged[21]
  clear = np.abs(sk_scores - 0.5) > 0.03
  np.testing.assert_array_equal(np.asarray(flagged)[clear], sk_flagged[clear])


def test_isolation_forest_two_features_matches_sklearn():
  r = np.random.default_rng(0)
  x = np.concatenate([r.normal(size=(30, 2)), r.normal(size=(3, 2)) * 0.3 + [4.0, -4.0]])
  x = x.astype(np.float32)
  scores, _ = iforest(x, all_fit(x), jax.random.key(1), num_trees=500)
  sk_scores = -IsolationForest(n_estimators=1000, random_state=0).fit(x).score_samples(x)
  np.testing.assert_allclose(scores, sk_scores, atol=0.03)


def test_isolation_forest_clear_case_small_c():
  """The paper's setting: 4 clients, one with a far-off |G loss|."""
  x = np.array([[1.0], [1.2], [0.9], [5.0]], np.float32)
  scores, flagged = iforest(x, all_fit(x), jax.random.key(0))
  np.testing.assert_array_equal(flagged, [False, False, False, True])
  sk = IsolationForest(random_state=0).fit(x)
  np.testing.assert_array_equal(sk.predict(x) == -1, [False, False, False, True])


def test_isolation_forest_is_permutation_equivariant_and_keyed():
  x = two_far_outliers(0)
  perm = np.random.default_rng(0).permutation(len(x))
  s, f = iforest(x, all_fit(x), jax.random.key(5))
  s_p, f_p = iforest(x[perm], all_fit(x), jax.random.key(5))
  np.testing.assert_array_equal(s_p, np.asarray(s)[perm])
  np.testing.assert_array_equal(f_p, np.asarray(f)[perm])
  s_again, _ = iforest(x, all_fit(x), jax.random.key(5))
  np.testing.assert_array_equal(s_again, s)
  s_other, _ = iforest(x, all_fit(x), jax.random.key(6))
  assert not np.array_equal(s_other, s)


def test_isolation_forest_masks_rows_out_of_the_fit():
  """A row outside ``fit`` changes no tree; a non-finite row is flagged."""
  x = two_far_outliers(1)
  s, _ = iforest(x, all_fit(x), jax.random.key(2))
  x_more = np.concatenate([x, [[1e4], [np.nan]]]).astype(np.float32)
  fit = np.concatenate([np.ones(22, bool), [False, True]])
  s_more, f_more = iforest(x_more, jnp.asarray(fit), jax.random.key(2))
  np.testing.assert_allclose(np.asarray(s_more)[:22], s, rtol=1e-6)
  assert bool(f_more[22]) and bool(f_more[23]) and float(s_more[23]) == 1.0
  assert np.all(np.isfinite(s_more))


def test_isolation_forest_constant_features_score_half():
  x = np.ones((6, 2), np.float32)
  s, f = iforest(x, all_fit(x), jax.random.key(0))
  np.testing.assert_allclose(s, 0.5, rtol=1e-6)
  assert not np.any(f)
  one = np.array([[3.0], [1.0]], np.float32)  # Only one row in the fit: sklearn's 0.5.
  s, f = iforest(one, jnp.array([True, False]), jax.random.key(0))
  np.testing.assert_allclose(s, 0.5)


def test_isolation_forest_subsamples_when_c_exceeds_max_samples():
  r = np.random.default_rng(3)
  x = np.concatenate([r.normal(size=38), [40.0, -40.0]])[:, None].astype(np.float32)
  s, f = iforest(x, all_fit(x), jax.random.key(0), max_samples=16)
  assert f[38] and f[39]
  assert float(s[38]) > np.sort(np.asarray(s))[-3] - 1e-6


# ------------------------------------------------------------- robust z-score


def test_robust_zscore_golden():
  x = np.array([[1.0], [1.2], [0.9], [5.0]], np.float32)
  s, f = zscore(x, all_fit(x), None)
  # median 1.1, |dev| = [.1, .1, .2, 3.9], MAD = .15.
  np.testing.assert_allclose(s, np.array([0.1, 0.1, 0.2, 3.9]) / (1.4826 * 0.15), rtol=1e-5)
  np.testing.assert_array_equal(f, [False, False, False, True])


def test_robust_zscore_mad_zero_and_all_equal():
  x = np.array([[1.0], [1.0], [1.0], [10.0]], np.float32)  # MAD = 0: mean |dev| fallback.
  s, f = zscore(x, all_fit(x), None)
  np.testing.assert_allclose(s, np.array([0, 0, 0, 9.0]) / (1.2533 * 9.0 / 4), rtol=1e-5)
  np.testing.assert_array_equal(f, [False, False, False, True])
  s, f = zscore(np.ones((4, 2), np.float32), all_fit(x), None)
  np.testing.assert_array_equal(s, 0.0)
  assert not np.any(f)


def test_robust_zscore_any_feature_and_nonfinite():
  x = np.array([[1.0, 5.0], [1.1, 5.1], [0.9, 50.0], [1.0, 4.9], [np.inf, 5.0]], np.float32)
  s, f = zscore(x, all_fit(x), None, threshold=3.0)
  np.testing.assert_array_equal(f, [False, False, True, False, True])
  assert np.isinf(s[4])


# ------------------------------------------------------------- detect and decay

C = 4
G_LOSS_OUTLIER = np.array([1.0, 1.2, 0.9, 5.0], np.float32)


@functools.cache
def decay_rule(detector="robust_zscore", warmup_rounds=1, decay=0.5, block_after=None, threshold=None, mode=None):
  kw = {} if threshold is None else {"threshold": threshold}
  if mode is not None:
    kw["mode"] = mode
  agg = aggregation.get(
    "detect", detector=detector, warmup_rounds=warmup_rounds, decay=decay, block_after=block_after, num_clients=C, **kw
  )
  return agg, jax.jit(agg.aggregate)


def run_rounds(rule, g_losses, num_examples=None):
  """Runs the rule for one round per row of ``g_losses``; returns per-round diagnostics."""
  agg, fn = rule
  g = {"w": jnp.zeros(3)}
  cp = {"w": jnp.arange(C * 3, dtype=jnp.float32).reshape(C, 3)}
  n = np.full(C, 10.0, np.float32) if num_examples is None else num_examples
  state, out = agg.init(g), []
  for r, loss in enumerate(g_losses):
    stats = {"num_examples": n, "g_loss": np.asarray(loss, np.float32)}
    new, state, diag = fn(state, g, cp, stats, jax.random.key(r))
    np.testing.assert_allclose(new["w"], np.asarray(diag["weights"]) @ np.asarray(cp["w"]), rtol=1e-5)
    out.append(jax.tree.map(np.asarray, diag))
  return out


@pytest.mark.parametrize("detector", ["robust_zscore", "isolation_forest"])
def test_detect_and_decay_golden_sequence(detector):
  """warmup 1 (acted on from round index 2), decay 0.5, persistent: the outlier's factor is
  1, 1, .5, .5 * .25, .125 * .125 (renormalized): each acted-on flag multiplies the weight
  it already has by decay ** times_flagged."""
  diags = run_rounds(decay_rule(detector), [G_LOSS_OUTLIER] * 5)
  expect_factor = [1.0, 1.0, 0.5, 0.125, 0.015625]
  for r, (d, fac) in enumerate(zip(diags, expect_factor)):
    np.testing.assert_array_equal(d["flagged"], [False, False, False, True])  # Every round.
    w = np.array([1.0, 1.0, 1.0, fac])
    np.testing.assert_allclose(d["weights"], w / w.sum(), rtol=1e-6)
    np.testing.assert_array_equal(d["times_flagged"], [0, 0, 0, max(0, r - 1)])
    assert bool(d["decay_active"]) == (r >= 2)
  assert diags[0]["scores"].shape == (C,)


def test_per_round_decay_mode():
  """mode='per_round': only this round's flag decays, by decay ** times_flagged."""
  diags = run_rounds(decay_rule(mode="per_round"), [G_LOSS_OUTLIER] * 5)
  for d, fac in zip(diags, [1.0, 1.0, 0.5, 0.25, 0.125]):
    w = np.array([1.0, 1.0, 1.0, fac])
    np.testing.assert_allclose(d["weights"], w / w.sum(), rtol=1e-6)


def test_detect_and_decay_uses_example_counts():
  n = np.array([10.0, 20.0, 30.0, 40.0], np.float32)
  d = run_rounds(decay_rule(), [G_LOSS_OUTLIER] * 3, num_examples=n)[2]
  w = n * np.array([1, 1, 1, 0.5])
  np.testing.assert_allclose(d["weights"], w / w.sum(), rtol=1e-6)


def test_no_decay_before_warmup():
  """warmup_rounds=3: rounds 0..3 are not acted on (the paper's ``epoch > warmup``)."""
  diags = run_rounds(decay_rule(warmup_rounds=3), [G_LOSS_OUTLIER] * 5)
  for d in diags[:4]:
    np.testing.assert_allclose(d["weights"], 0.25)
    np.testing.assert_array_equal(d["times_flagged"], 0)
    assert bool(d["flagged"][3]) and not bool(d["decay_active"])
  np.testing.assert_array_equal(diags[4]["times_flagged"], [0, 0, 0, 1])


def test_no_decay_when_half_or_more_flagged():
  # threshold 0.5 flags clients 2 and 3 (z = 0.9 and 17.5): half of C = 4.
  diags = run_rounds(decay_rule(threshold=0.5), [G_LOSS_OUTLIER] * 3)
  for d in diags:
    np.testing.assert_array_equal(d["flagged"], [False, False, True, True])
    np.testing.assert_allclose(d["weights"], 0.25)
    np.testing.assert_array_equal(d["times_flagged"], 0)
    assert not bool(d["decay_active"])


def test_block_after_blocks_for_good():
  honest = np.array([1.0, 1.2, 0.9, 1.1], np.float32)
  diags = run_rounds(decay_rule(block_after=2), [G_LOSS_OUTLIER] * 4 + [honest])
  np.testing.assert_allclose(diags[2]["weights"], np.array([1, 1, 1, 0.5]) / 3.5, rtol=1e-6)
  for d in diags[3:]:  # Flagged twice by round 3; still blocked when it looks honest.
    np.testing.assert_allclose(d["weights"], [1 / 3, 1 / 3, 1 / 3, 0], rtol=1e-6)
    assert bool(d["blocked"][3])
  assert not bool(diags[4]["flagged"][3])
  np.testing.assert_array_equal(diags[4]["times_flagged"], [0, 0, 0, 2])


def _paper_code_weights(flags: np.ndarray, warmup: int, decay: float) -> np.ndarray:
  """The paper's code's rule (scripts/vanilla.py), replayed in plain numpy on given flags [R, C]."""
  num_clients = flags.shape[1]
  weights = [1 / num_clients] * num_clients
  outliers_count: dict[int, int] = {}
  out = []
  for epoch, row in enumerate(flags):
    if epoch > warmup:
      neg_idx = [i for i in range(num_clients) if row[i]]
      if len(neg_idx) < num_clients // 2:
        for i in neg_idx:
          outliers_count[i] = outliers_count.get(i, 0) + 1
        for i in neg_idx:
          weights[i] = weights[i] * decay ** outliers_count[i]
        total = sum(weights)
        weights = [w / total for w in weights]
    out.append(list(weights))
  return np.asarray(out)


@pytest.mark.parametrize("num_clients", [4, 5])
def test_decay_weights_equal_a_replay_of_the_paper_code(num_clients):
  """40 rounds of random flags through the decay stage (uniform start, then ``mean``):
  the weights equal the paper code's rule on the same flags: warm-up ``epoch > 10``,
  acting only when fewer than C // 2 are flagged, persistent decay ** times_flagged."""
  rng = np.random.default_rng(num_clients)
  flags = rng.random((40, num_clients)) < np.array([0.7] + [0.15] * (num_clients - 1))
  want = _paper_code_weights(flags, warmup=10, decay=0.9)
  agg = aggregation.chain(
    aggregation.decay_flagged(decay=0.9, warmup_rounds=10, num_clients=num_clients), aggregation.mean()
  )
  fn = jax.jit(agg.aggregate)
  g, cp = {"w": jnp.zeros(2)}, {"w": jnp.ones((num_clients, 2))}
  state = agg.init(g)
  for r in range(40):
    stats = {"num_examples": jnp.ones(num_clients), "flagged": jnp.asarray(flags[r])}
    _, state, diag = fn(state, g, cp, stats, jax.random.key(r))
    np.testing.assert_allclose(diag["weights"], want[r], rtol=1e-5, err_msg=f"round {r}")
  assert want[-1, 0] < 0.05 and len(set(np.round(want[:, 0], 6))) > 5  # The replay exercised the rule.


def test_decay_never_underflows_over_2000_rounds():
  """One random client flagged in every round (as on a benign run) for 2,000 rounds: a raw float32
  product of decays is 0 for every client by round ~200; the renormalised factors keep the weights
  equal to the paper code's float64 replay, summing to 1, and the global model keeps moving."""
  rounds, c = 2000, 4
  rng = np.random.default_rng(0)
  flags = np.zeros((rounds, c), bool)
  flags[np.arange(rounds), rng.integers(0, c, rounds)] = True
  want = _paper_code_weights(flags, warmup=10, decay=0.9)
  agg = aggregation.chain(aggregation.decay_flagged(decay=0.9, warmup_rounds=10, num_clients=c), aggregation.mean())
  g = {"w": jnp.zeros(3)}
  uploads = jnp.asarray(rng.normal(size=(rounds, c, 3)), jnp.float32)

  def step(state, xs):
    flagged, cp = xs
    stats = {"num_examples": jnp.ones(c), "flagged": flagged}
    new, state, diag = agg.aggregate(state, g, {"w": cp}, stats, jax.random.key(0))
    return state, (diag["weights"], new["w"])

  _, (weights, new_global) = jax.jit(lambda s: jax.lax.scan(step, s, (jnp.asarray(flags), uploads)))(agg.init(g))
  weights, new_global = np.asarray(weights), np.asarray(new_global)
  assert np.isfinite(weights).all()
  np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(weights, want, rtol=1e-4, atol=1e-6)
  moves = np.linalg.norm(np.diff(new_global, axis=0), axis=1)
  assert moves[-100:].min() > 1e-3  # Every one of the last 100 rounds still changes the global model.
  assert (want.max(1) > 0.99).mean() > 0.5  # The replay exercised the rule: one client ends with the weight.


def test_detect_errors_name_the_field():
  with pytest.raises(ValueError, match="num_clients: required"):
    aggregation.get("detect")
  with pytest.raises(ValueError, match="detector='forest' is not known.*isolation_forest"):
    aggregation.get("detect", detector="forest", num_clients=4)
  with pytest.raises(ValueError, match="aggregation.kwargs.decay=1.5"):
    aggregation.get("detect", decay=1.5, num_clients=4)
  with pytest.raises(ValueError, match="aggregation.kwargs.num_tree: not a parameter"):
    aggregation.get("detect", num_tree=5, num_clients=4)
  agg = aggregation.get("detect", features=("nope",), num_clients=4)
  g, cp = {"w": jnp.zeros(2)}, {"w": jnp.zeros((4, 2))}
  with pytest.raises(ValueError, match=r"\['nope'\] not in client_stats.*g_loss"):
    jax.eval_shape(
      agg.aggregate, agg.init(g), g, cp, {"num_examples": jnp.ones(4), "g_loss": jnp.ones(4)}, jax.random.key(0)
    )
  agg = aggregation.get("detect", num_clients=3)
  with pytest.raises(ValueError, match="num_clients=3 does not match"):
    jax.eval_shape(
      agg.aggregate, agg.init(g), g, cp, {"num_examples": jnp.ones(4), "g_loss": jnp.ones(4)}, jax.random.key(0)
    )
