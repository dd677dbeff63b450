"""Aggregation rules: the contract over every registered rule, golden numbers
against numpy/scipy, robustness to huge and non-finite uploads, composition,
the registry, and server-side stats."""

from __future__ import annotations

import functools
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.stats
from trees import flat, flat_clients

from fedgan_jax import aggregation
from fedgan_jax.aggregation import AGGREGATORS, server_stats

C = 7  # Krum with f=1 needs C > 4; odd and even C are both covered below.

# Sensible kwargs for EVERY registered rule; test_every_rule_has_contract_kwargs
# fails when a rule is registered without being added here.
RULE_KWARGS = {
  "mean": {},
  "median": {},
  "trimmed_mean": {"beta": 0.2},
  "krum": {"f": 1},
  "multi_krum": {"f": 1},
  "geometric_median": {},
  "norm_clip": {"max_norm": 1.0},  # Honest updates here have norm ~0.4.
  "chain": {
    "stages": (
      ("clip", {"max_norm": 1.0}),
      ("detect", {"detector": "robust_zscore"}),
      ("decay", {"warmup_rounds": 0, "decay": 0.5}),
      ("trimmed_mean", {"beta": 0.2}),
    )
  },
  "detect": {"warmup_rounds": 0, "num_trees": 50, "inner": "median"},
  "dp_mean": {"clip_norm": 1.0, "noise_multiplier": 0.0},  # Noise-free: the contract's range check holds.
  "rlr": {},
  "flame": {"noise_lambda": 0.0},  # Noise-free, as dp_mean.
  "foolsgold": {},
  "centered_clip": {"tau": 1.0},
  "dnc": {"num_byzantine": 1},
  "bulyan": {"num_byzantine": 1},
  "alpha_detect": {"alpha": 0.05, "warmup_rounds": 0, "inner": "median"},
  "fltrust": {},  # run() hands it a server model: the coordinate-wise median of the finite uploads.
}
ROBUST = [
  "median",
  "trimmed_mean",
  "krum",
  "multi_krum",
  "geometric_median",
  "norm_clip",
  "chain",
  "detect",
  "flame",
  "centered_clip",
  "dnc",
  "bulyan",
  "alpha_detect",
  "fltrust",
]
# Rules whose aggregate may leave the clients' per-coordinate range by design:
# RLR negates the server's learning rate where the signs disagree; FLTrust rescales every update to the server's norm.
OUTSIDE_RANGE = {"rlr", "fltrust"}


def make_global(rng, dtype=np.float32):
  return {
    "params": {"w": rng.normal(size=(3, 4)).astype(dtype), "b": rng.normal(size=(5,)).astype(dtype)},
    "batch_stats": {"mean": rng.normal(size=(2,)).astype(dtype)},
  }


def make_clients(rng, g, c=C, scale=0.1):
  return jax.tree.map(lambda x: (x[None] + scale * rng.normal(size=(c,) + x.shape)).astype(x.dtype), g)


def make_stats(rng, c=C):
  return {
    "num_examples": rng.integers(5, 20, size=c).astype(np.float32),
    "g_loss": rng.normal(1.0, 0.1, size=c).astype(np.float32),
    "d_loss": rng.normal(0.7, 0.1, size=c).astype(np.float32),
  }


def with_client(tree, i, fn):
  """A copy of the stacked numpy ``tree`` with client ``i``'s leaves mapped by ``fn``."""

  def one(x):
    x = np.array(x)
    x[i] = fn(x[i])
    return x

  return jax.tree.map(one, tree)


@functools.cache
def compiled(name):
  """(Aggregator, jitted aggregate) per rule; jit caches by shape, so reuse is free."""
  agg = aggregation.get(name, num_clients=C, **RULE_KWARGS[name])
  return agg, jax.jit(agg.aggregate)


def run(name, g, cp, stats, key=0):
  agg, fn = compiled(name)
  state = agg.init(g)
  if name == "fltrust":  # The server's own model: here the coordinate-wise median of the finite uploads.
    ok = np.all(np.isfinite(flat_clients(cp)), axis=1)
    stats = {**stats, aggregation.SERVER_MODEL: jax.tree.map(lambda x: np.median(np.asarray(x)[ok], axis=0), cp)}
  return fn(state, g, cp, stats, jax.random.key(key)), state


def test_every_rule_has_contract_kwargs():
  assert set(AGGREGATORS) == set(RULE_KWARGS), "add new rules to RULE_KWARGS"


@pytest.mark.parametrize("name", sorted(RULE_KWARGS))
def test_contract(name):
  rng = np.random.default_rng(0)
  g = make_global(rng)
  cp, stats = make_clients(rng, g), make_stats(rng)
  (out, new_state, diag), state = run(name, g, cp, stats)
  # Shapes, dtypes, finiteness.
  assert jax.tree.structure(out) == jax.tree.structure(g)
  for o, x in zip(jax.tree.leaves(out), jax.tree.leaves(g)):
    assert o.shape == x.shape and o.dtype == x.dtype
    assert np.all(np.isfinite(o))
  # State keeps its structure and shapes (so rounds can be lax.scan-ned).
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
    assert a.shape == b.shape and a.dtype == b.dtype
  # Diagnostics.
  w, flagged = np.asarray(diag["weights"]), np.asarray(diag["flagged"])
  assert w.shape == (C,) and w.dtype == np.float32
  assert flagged.shape == (C,) and flagged.dtype == np.bool_
  assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-5
  assert not np.any(np.asarray(diag["nonfinite"]))
  # The aggregate lies within the clients' per-coordinate range (every rule
  # here is a convex combination per coordinate or of whole clients).
  if name in OUTSIDE_RANGE:
    return
  lo, hi = flat_clients(cp).min(0), flat_clients(cp).max(0)
  assert np.all(flat(out) >= lo - 1e-5) and np.all(flat(out) <= hi + 1e-5)


@pytest.mark.parametrize("name", sorted(RULE_KWARGS))
def test_permutation_invariance(name):
  rng = np.random.default_rng(1)
  g = make_global(rng)
  cp, stats = make_clients(rng, g), make_stats(rng)
  perm = rng.permutation(C)
  (out, _, diag), _ = run(name, g, cp, stats, key=3)
  cp_p = jax.tree.map(lambda x: x[perm], cp)
  stats_p = {k: v[perm] for k, v in stats.items()}
  (out_p, _, diag_p), _ = run(name, g, cp_p, stats_p, key=3)  # Same key.
  np.testing.assert_allclose(flat(out_p), flat(out), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(diag_p["weights"]), np.asarray(diag["weights"])[perm], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(diag_p["flagged"]), np.asarray(diag["flagged"])[perm])


@pytest.mark.parametrize("name", sorted(RULE_KWARGS))
def test_identical_clients_give_that_client(name):
  rng = np.random.default_rng(2)
  g = make_global(rng)
  x = make_clients(rng, g, c=1)
  cp = jax.tree.map(lambda v: jnp.repeat(v, C, axis=0), x)
  (out, _, diag), _ = run(name, g, cp, make_stats(rng))
  np.testing.assert_allclose(flat(out), flat(x), rtol=1e-5, atol=1e-6)
  assert abs(float(jnp.sum(diag["weights"])) - 1) < 1e-5


# The federation when the C uploads are the clients sampled for a round (config.clients_per_round): no
# parameter of make_global has a dimension of N_FULL, so a state leaf with N_FULL rows is per-client state.
N_FULL = 10
SAMPLED = np.array([0, 2, 3, 5, 6, 8, 9])  # C = 7 of the N_FULL clients.


def _leaf_flags(axes, state):
  """Per leaf of ``state``: is it declared per-client by the prefix ``axes``?"""
  return jax.tree.leaves(jax.tree.map(lambda f, sub: jax.tree.map(lambda _: bool(f), sub), axes, state))


@pytest.mark.parametrize("name", sorted(RULE_KWARGS))
def test_contract_with_sampled_clients(name):
  """One aggregate call over C sampled clients of N_FULL: the per-client state (``Aggregator.client_axes``)
  is gathered for them and scattered back; the other clients' rows are unchanged."""
  rng = np.random.default_rng(5)
  g = make_global(rng)
  cp, stats = make_clients(rng, g), make_stats(rng)
  # The rule as a run builds it (num_clients = the federation), fed the C sampled clients' uploads.
  agg = aggregation.get(name, num_clients=N_FULL, **RULE_KWARGS[name])
  fn = jax.jit(agg.aggregate)
  state = agg.init(g)
  aggregation.base.check_client_axes(state, agg.client_axes, N_FULL, name)
  flags = _leaf_flags(agg.client_axes, state)
  # Every leaf with a row per client is declared (an undeclared one would meet the uploads of other clients).
  for flag, x in zip(flags, jax.tree.leaves(state)):
    assert flag == (np.ndim(x) > 0 and np.shape(x)[0] == N_FULL), (name, np.shape(x))
  # Each client's rows get values of their own, so a row that moves or is overwritten is seen.
  own = lambda x: (
    x + (rng.integers(0, 3, x.shape) if jnp.issubdtype(x.dtype, jnp.integer) else rng.normal(size=x.shape))
  )
  state = jax.tree.map(
    lambda f, sub: jax.tree.map(lambda x: own(np.asarray(x)).astype(x.dtype), sub) if f else sub, agg.client_axes, state
  )
  clients = jnp.asarray(SAMPLED, jnp.int32)
  sub = aggregation.base.gather_state(state, agg.client_axes, clients)
  if name == "fltrust":
    stats = {**stats, aggregation.SERVER_MODEL: jax.tree.map(lambda x: np.median(np.asarray(x), axis=0), cp)}
  out, new_sub, diag = fn(sub, g, cp, stats, jax.random.key(0))
  new = aggregation.base.scatter_state(state, agg.client_axes, clients, new_sub)
  assert jax.tree.structure(new) == jax.tree.structure(state)
  others = np.setdiff1d(np.arange(N_FULL), SAMPLED)
  for flag, before, after, returned in zip(
    flags, jax.tree.leaves(state), jax.tree.leaves(new), jax.tree.leaves(new_sub)
  ):
    assert after.shape == before.shape and after.dtype == before.dtype
    if flag:
      np.testing.assert_array_equal(np.asarray(after)[others], np.asarray(before)[others])
      np.testing.assert_array_equal(np.asarray(after)[SAMPLED], np.asarray(returned))
    else:
      np.testing.assert_array_equal(np.asarray(after), np.asarray(returned))
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(out))
  # Diagnostics are scalars or per-client arrays of the round's C clients (sampling scatters the latter by id).
  for k, v in diag.items():
    assert np.ndim(v) == 0 or np.shape(v)[0] == C, (k, np.shape(v))
  assert abs(float(np.sum(diag["weights"])) - 1) < 1e-5


def test_gather_scatter_state_by_hand():
  """decay's state: times_flagged and factor are per client, round is not; chain declares the tuple."""
  agg = aggregation.get("detect", num_clients=4, warmup_rounds=0)
  state = agg.init({"w": jnp.zeros(2)})
  assert agg.client_axes == (False, aggregation.DecayState(round=False, times_flagged=True, factor=True), False)
  decay = state[1]._replace(times_flagged=jnp.array([1, 2, 3, 4], jnp.int32), round=jnp.int32(7))
  state = (state[0], decay, state[2])
  clients = jnp.array([1, 3])
  sub = aggregation.base.gather_state(state, agg.client_axes, clients)
  np.testing.assert_array_equal(sub[1].times_flagged, [2, 4])
  assert int(sub[1].round) == 7 and sub[1].factor.shape == (2,)
  new_sub = (sub[0], sub[1]._replace(times_flagged=jnp.array([20, 40]), round=jnp.int32(8)), sub[2])
  new = aggregation.base.scatter_state(state, agg.client_axes, clients, new_sub)
  np.testing.assert_array_equal(new[1].times_flagged, [1, 20, 3, 40])
  assert int(new[1].round) == 8
  with pytest.raises(ValueError, match=r"came back as \(3,\), expected \[2, ...\]"):
    bad = (sub[0], sub[1]._replace(times_flagged=jnp.zeros(3, jnp.int32)), sub[2])
    aggregation.base.scatter_state(state, agg.client_axes, clients, bad)
  with pytest.raises(ValueError, match=r"expected \[num_clients=5, ...\]"):
    aggregation.base.check_client_axes(state, agg.client_axes, 5)
  with pytest.raises(ValueError, match="not a prefix"):
    aggregation.base.check_client_axes(state, (True, False), 4)


# ---------------------------------------------------------------- golden numbers


def test_mean_matches_numpy_average():
  rng = np.random.default_rng(3)
  g = make_global(rng)
  cp, stats = make_clients(rng, g), make_stats(rng)
  (out, _, diag), _ = run("mean", g, cp, stats)
  expect = np.average(flat_clients(cp), axis=0, weights=stats["num_examples"])
  np.testing.assert_allclose(flat(out), expect, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(diag["weights"], stats["num_examples"] / stats["num_examples"].sum(), rtol=1e-6)


@pytest.mark.parametrize("c", [6, 7])
def test_median_matches_numpy(c):
  rng = np.random.default_rng(c)
  g = make_global(rng)
  cp, stats = make_clients(rng, g, c=c), make_stats(rng, c=c)
  agg = aggregation.median()
  out, _, diag = jax.jit(agg.aggregate)(agg.init(g), g, cp, stats, jax.random.key(0))
  x = flat_clients(cp)
  np.testing.assert_allclose(flat(out), np.median(x, axis=0), rtol=1e-6, atol=1e-6)
  # weights: share of coordinates where a client's value is at the median.
  s = np.sort(x, axis=0)
  lo, hi = s[(c - 1) // 2], s[c // 2]
  at_median = ((x >= lo) & (x <= hi)).sum(1)
  np.testing.assert_allclose(diag["weights"], at_median / at_median.sum(), rtol=1e-6)


@pytest.mark.parametrize("c,beta", [(5, 0.1), (6, 0.2), (8, 0.25), (10, 0.3), (7, 0.45), (4, 0.0)])
def test_trimmed_mean_matches_scipy(c, beta):
  rng = np.random.default_rng(10 + c)
  g = make_global(rng)
  cp, stats = make_clients(rng, g, c=c), make_stats(rng, c=c)
  agg = aggregation.trimmed_mean(beta)
  out, _, diag = jax.jit(agg.aggregate)(agg.init(g), g, cp, stats, jax.random.key(0))
  expect = scipy.stats.trim_mean(flat_clients(cp), proportiontocut=beta, axis=0)
  np.testing.assert_allclose(flat(out), expect, rtol=1e-5, atol=1e-6)
  # weights: share of coordinates where a client's value is inside the kept range.
  x = flat_clients(cp)
  s, k = np.sort(x, axis=0), int(beta * c)
  kept = ((x >= s[k]) & (x <= s[c - k - 1])).sum(1)
  np.testing.assert_allclose(diag["weights"], kept / kept.sum(), rtol=1e-6)


def test_median_and_trimmed_mean_skip_nonfinite_clients():
  rng = np.random.default_rng(4)
  g = make_global(rng)
  cp, stats = make_clients(rng, g), make_stats(rng)
  cp["params"]["w"][2, 0, 0] = np.nan
  cp["params"]["b"][5, 1] = -np.inf
  ok = np.array([i not in (2, 5) for i in range(C)])
  x = flat_clients(cp)[ok]
  (out, _, diag), _ = run("median", g, cp, stats)
  np.testing.assert_allclose(flat(out), np.median(x, axis=0), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(diag["nonfinite"], ~ok)
  assert np.all(np.asarray(diag["weights"])[~ok] == 0)
  (out, _, diag), _ = run("trimmed_mean", g, cp, stats)
  np.testing.assert_allclose(flat(out), scipy.stats.trim_mean(x, 0.2, axis=0), rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(diag["weights"])[~ok] == 0)


def numpy_krum_scores(x, f):
  n = x.shape[0]
  d = ((x[:, None] - x[None]) ** 2).sum(-1)
  k = n - f - 2
  return np.array([np.sort(np.delete(d[i], i))[:k].sum() for i in range(n)])


def test_krum_matches_brute_force():
  rng = np.random.default_rng(5)
  g = make_global(rng)
  cp, stats = make_clients(rng, g, scale=0.3), make_stats(rng)
  (out, _, diag), _ = run("krum", g, cp, stats)
  x = flat_clients(cp)
  scores = numpy_krum_scores(x, f=1)
  best = int(np.argmin(scores))
  assert np.sort(scores)[1] - scores[best] > 1e-3 * scores[best]  # Not a near-tie.
  np.testing.assert_array_equal(flat(out), x[best].astype(np.float32))
  np.testing.assert_allclose(diag["scores"], scores, rtol=1e-4)
  np.testing.assert_array_equal(diag["weights"], np.eye(C)[best])
  np.testing.assert_array_equal(diag["flagged"], np.arange(C) == np.argmax(scores))
  # Multi-Krum: example-weighted mean of the n - f best.
  (out, _, diag), _ = run("multi_krum", g, cp, stats)
  keep = np.argsort(scores)[: C - 1]
  expect = np.average(x[keep], axis=0, weights=stats["num_examples"][keep])
  np.testing.assert_allclose(flat(out), expect, rtol=1e-5, atol=1e-6)


def test_geometric_median_minimizes_sum_of_distances():
  rng = np.random.default_rng(6)
  g = make_global(rng)
  cp, stats = make_clients(rng, g, scale=1.0), make_stats(rng)
  (out, _, diag), _ = run("geometric_median", g, cp, stats)
  x = flat_clients(cp)
  a = stats["num_examples"] / stats["num_examples"].sum()
  objective = lambda v: float(np.sum(a * np.linalg.norm(x - v, axis=1)))
  ref = scipy.optimize.minimize(objective, x.mean(0), method="BFGS", options={"gtol": 1e-10})
  assert abs(objective(flat(out)) - ref.fun) <= 1e-4 * ref.fun
  assert int(diag["gm_iters"]) >= 1


# ------------------------------------------------------------- robustness


def attacked(rng, how):
  g = make_global(rng)
  cp, stats = make_clients(rng, g), make_stats(rng)
  honest = flat_clients(cp)[1:].mean(0)
  if how == "scale":
    cp = with_client(cp, 0, lambda x: x * 1e6)
  else:
    cp = with_client(cp, 0, lambda x: x * np.nan)
  stats["g_loss"][0] = 50.0  # The attacker's loss is off too (as for a detector).
  return g, cp, stats, honest


@pytest.mark.parametrize("name", ROBUST)
@pytest.mark.parametrize("how", ["scale", "nan"])
def test_robust_rules_bounded_under_attack(name, how):
  g, cp, stats, honest = attacked(np.random.default_rng(7), how)
  (out, _, diag), _ = run(name, g, cp, stats)
  assert np.all(np.isfinite(flat(out)))
  # Honest clients are within ~0.1 * 3 of each other; the attacker at 1e6.
  assert np.max(np.abs(flat(out) - honest)) < 0.5, name
  if how == "nan":
    assert bool(diag["nonfinite"][0]) and float(diag["weights"][0]) == 0.0


def test_mean_breaks_under_scaling_but_excludes_nan():
  """The contrast the robust rules are for: one x1e6 upload drags FedAvg away."""
  g, cp, stats, honest = attacked(np.random.default_rng(7), "scale")
  (out, _, _), _ = run("mean", g, cp, stats)
  assert np.max(np.abs(flat(out) - honest)) > 1e3
  g, cp, stats, _ = attacked(np.random.default_rng(7), "nan")
  (out, _, diag), _ = run("mean", g, cp, stats)
  expect = np.average(flat_clients(cp)[1:], axis=0, weights=stats["num_examples"][1:])
  np.testing.assert_allclose(flat(out), expect, rtol=1e-5, atol=1e-6)
  assert bool(diag["nonfinite"][0]) and float(diag["weights"][0]) == 0


@pytest.mark.parametrize("name", ["mean", "median", "krum", "geometric_median"])
def test_all_clients_invalid_keeps_global(name):
  rng = np.random.default_rng(8)
  g = make_global(rng)
  cp = jax.tree.map(lambda x: jnp.full_like(x, np.nan), make_clients(rng, g))
  (out, _, diag), _ = run(name, g, cp, make_stats(rng))
  np.testing.assert_array_equal(flat(out), flat(g))
  assert float(jnp.sum(diag["weights"])) == 0


def test_zero_examples_excluded_by_unweighted_rules():
  rng = np.random.default_rng(9)
  g = make_global(rng)
  cp, stats = make_clients(rng, g), make_stats(rng)
  stats["num_examples"][[1, 4]] = 0
  keep = np.array([i not in (1, 4) for i in range(C)])
  (out, _, diag), _ = run("median", g, cp, stats)
  np.testing.assert_allclose(flat(out), np.median(flat_clients(cp)[keep], axis=0), rtol=1e-6)
  assert np.all(np.asarray(diag["weights"])[~keep] == 0)


# ------------------------------------------------------------- composition


def test_norm_clip_bounds_updates():
  rng = np.random.default_rng(10)
  g = make_global(rng)
  cp, stats = make_clients(rng, g, scale=1.0), make_stats(rng)
  agg = aggregation.get("norm_clip", max_norm=0.5)
  out, _, diag = jax.jit(agg.aggregate)(agg.init(g), g, cp, stats, jax.random.key(0))
  u = flat_clients(cp) - flat(g)
  norms = np.linalg.norm(u, axis=1)
  np.testing.assert_allclose(diag["update_norm"], norms, rtol=1e-5)
  np.testing.assert_array_equal(diag["clipped"], norms > 0.5)
  clipped = u * np.minimum(1.0, 0.5 / norms)[:, None]
  expect = flat(g) + np.average(clipped, axis=0, weights=stats["num_examples"])
  np.testing.assert_allclose(flat(out), expect, rtol=1e-5, atol=1e-5)
  assert np.linalg.norm(flat(out) - flat(g)) <= 0.5 + 1e-5


def test_chain_equals_hand_composition():
  rng = np.random.default_rng(11)
  g = make_global(rng)
  cp, stats = make_clients(rng, g, scale=1.0), make_stats(rng)
  a = aggregation.chain(aggregation.clip_updates(0.5), aggregation.median())
  b = aggregation.get("norm_clip", max_norm=0.5, inner="median")
  c = aggregation.get("chain", stages=(("clip", {"max_norm": 0.5}), "median"))
  outs = [jax.jit(x.aggregate)(x.init(g), g, cp, stats, jax.random.key(0))[0] for x in (a, b, c)]
  np.testing.assert_array_equal(flat(outs[0]), flat(outs[1]))
  np.testing.assert_array_equal(flat(outs[0]), flat(outs[2]))


def test_chain_rejects_bad_elements():
  with pytest.raises(ValueError, match="not a known stage.*clip"):
    aggregation.chain("nope", "mean")
  with pytest.raises(ValueError, match="only the last element"):
    aggregation.chain(aggregation.mean(), aggregation.mean())
  with pytest.raises(ValueError, match="must be an Aggregator"):
    aggregation.chain(aggregation.clip_updates(1.0))
  with pytest.raises(ValueError, match="at least"):
    aggregation.chain()


# ------------------------------------------------------------- registry


def test_get_unknown_name_lists_valid_rules():
  with pytest.raises(ValueError) as e:
    aggregation.get("krumm")
  for name in AGGREGATORS:
    assert name in str(e.value)


@pytest.mark.parametrize(
  "name,kwargs,match",
  [
    ("trimmed_mean", {"beta": 0.6}, r"aggregation.kwargs.beta=0.6: must be in \[0, 0.5\)"),
    ("krum", {"f": 2, "num_clients": 6}, r"aggregation.kwargs.f=2: Krum needs num_clients > 2f \+ 2"),
    ("multi_krum", {"m": 0}, r"aggregation.kwargs.m=0"),
    ("geometric_median", {"eps": 0.0}, r"aggregation.kwargs.eps=0.0"),
    ("norm_clip", {"max_norm": -1.0}, r"aggregation.kwargs.max_norm=-1.0"),
    ("median", {"bogus": 1}, r"bad aggregation.kwargs"),
    ("detect", {}, r"aggregation.kwargs.num_clients: required"),
  ],
)
def test_get_bad_kwargs_name_the_field(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    aggregation.get(name, **kwargs)


def test_get_drops_num_clients_for_factories_without_it():
  assert isinstance(aggregation.get("median", num_clients=5), aggregation.Aggregator)


def test_module_factory_lookup(tmp_path, monkeypatch):
  (tmp_path / "my_rules_for_test.py").write_text(
    textwrap.dedent("""
      from fedgan_jax import aggregation

      def halfway(alpha=0.5):
        inner = aggregation.mean()
        def aggregate(state, g, cp, stats, key):
          new, state, diag = inner.aggregate(state, g, cp, stats, key)
          new = {k: (1 - alpha) * g[k] + alpha * new[k] for k in new}
          return new, state, diag
        return aggregation.Aggregator(inner.init, aggregate)
      """)
  )
  monkeypatch.syspath_prepend(str(tmp_path))
  agg = aggregation.get("my_rules_for_test:halfway", alpha=0.25, num_clients=3)
  g = {"w": jnp.zeros(2)}
  cp = {"w": jnp.ones((3, 2))}
  out, _, _ = agg.aggregate(agg.init(g), g, cp, {"num_examples": jnp.ones(3)}, jax.random.key(0))
  np.testing.assert_allclose(out["w"], 0.25)
  with pytest.raises(ValueError, match="has no callable 'nope'"):
    aggregation.get("my_rules_for_test:nope")
  with pytest.raises(ValueError, match="cannot import module"):
    aggregation.get("no_such_module_xyz:f")
  sys.modules.pop("my_rules_for_test", None)


# ------------------------------------------------------------- server stats


def test_server_stats_match_numpy():
  rng = np.random.default_rng(12)
  g = make_global(rng)
  cp = make_clients(rng, g)
  cp = with_client(cp, 3, lambda x: x * np.nan)
  s = jax.jit(server_stats)(g, cp)
  ok = np.arange(C) != 3
  x = flat_clients(cp)
  u = x - flat(g)
  mean_u = u[ok].mean(0)
  norm = np.linalg.norm(u, axis=1)
  cos = u @ mean_u / (norm * np.linalg.norm(mean_u))
  dist = np.linalg.norm(x - np.median(x[ok], axis=0), axis=1)
  np.testing.assert_allclose(np.asarray(s["update_norm"])[ok], norm[ok], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(s["cosine_to_mean"])[ok], cos[ok], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(s["dist_to_median"])[ok], dist[ok], rtol=1e-4)
  for v in s.values():
    assert v.shape == (C,) and np.isnan(v[3])


@pytest.mark.parametrize("C", [1, 2, 3, 4, 5, 7, 8, 16, 31, 33])
def test_sort_clients_equals_numpy_sort(C):
  from fedgan_jax.aggregation.base import sort_clients

  x = np.random.default_rng(C).normal(size=(C, 5, 3)).astype(np.float32)
  x[0, 0, 0] = np.inf  # Invalid clients are +inf before sorting.
  np.testing.assert_array_equal(np.asarray(jax.jit(sort_clients)(jnp.asarray(x))), np.sort(x, axis=0))
