"""The alpha-level leave-one-out t detector and the recovering weights (aggregation.alpha_detect):
critical values against scipy, the statistic against numpy, the false-alarm rate on simulated
benign rounds, exact weight sequences, the aggregation contract, NaN handling and kwarg errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from fedgan_jax.aggregation import compose, registry
from fedgan_jax.aggregation.alpha_detect import (
  alpha_detect,
  alpha_test,
  critical_table,
  leave_one_out_t,
  recovering_weights,
  t_critical,
)
from fedgan_jax.aggregation.base import mean

# ------------------------------------------------------------ critical values


@pytest.mark.parametrize("alpha", [0.1, 0.01, 0.001])
def test_critical_values_equal_scipy(alpha):
  dof = np.arange(1, 31)
  got = np.array([t_critical(alpha, int(d)) for d in dof])
  np.testing.assert_allclose(got, scipy.stats.t.ppf(1 - alpha / 2, dof), rtol=1e-5)
  table = critical_table(alpha, 31)  # Index = dof; never flags at 0 and C.
  np.testing.assert_allclose(table[1:31], got.astype(np.float32), rtol=1e-6)
  assert np.isinf(table[0]) and np.isinf(table[31])


# --------------------------------------------------------------- the statistic


def numpy_t(x, fit):
  """float64 reference: T of every row against the other fit rows, and its dof."""
  c, f = x.shape
  t, dof = np.zeros((c, f)), np.zeros(c, int)
  for i in range(c):
    others = fit & (np.arange(c) != i)
    k = others.sum()
    dof[i] = k - 1
    if k >= 2 and np.all(np.isfinite(x[i])):
      o = x[others].astype(np.float64)
      t[i] = (x[i] - o.mean(0)) / (o.std(0, ddof=1) * np.sqrt(1 + 1 / k))
  return t, dof


@pytest.mark.parametrize("seed", range(3))
def test_statistic_equals_numpy_reference(seed):
  rng = np.random.default_rng(seed)
  c = 9
  x = rng.normal(3.0, 0.5, size=(c, 2)).astype(np.float32)
  fit = rng.random(c) > 0.3
  fit[:3] = True
  x[~fit & (rng.random(c) > 0.5)] = np.nan  # Rows outside the fit may be garbage.
  fit &= np.all(np.isfinite(x), 1)
  t, dof = jax.jit(leave_one_out_t)(x, fit)
  want_t, want_dof = numpy_t(x, fit)
  np.testing.assert_allclose(t, want_t, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(dof, want_dof)


# -------------------------------------------------- the false-alarm rate


def stats_of(x, valid=None):
  c = x.shape[0]
  n = jnp.ones(c) if valid is None else jnp.where(valid, 1.0, 0.0)
  return {"num_examples": n, "g_loss": x[:, 0], "d_loss": x[:, -1]}


@functools.cache
def batched_test(c, features, alpha):
  stage = alpha_test(alpha=alpha, features=features, abs_features=False)
  g, cp = {"w": jnp.zeros(1)}, {"w": jnp.zeros((c, 1))}

  def one(x, valid):
    _, _, _, d = stage.update((), g, cp, stats_of(x, valid), jax.random.key(0))
    return d["flagged"]

  return jax.jit(jax.vmap(one))


@pytest.mark.parametrize("c", [4, 8])
def test_false_alarm_rate_equals_alpha_on_benign_rounds(c):
  """20,000 rounds of i.i.d. N(mu_r, sigma_r^2) features (mean and scale changing every round):
  each client is flagged in a fraction alpha of the rounds, within 4.5 binomial sd."""
  rounds, alpha = 20_000, 0.05
  rng = np.random.default_rng(c)
  loc, scale = rng.normal(0, 10, (rounds, 1, 1)), rng.uniform(0.1, 5, (rounds, 1, 1))
  x = jnp.asarray(loc + scale * rng.normal(size=(rounds, c, 1)), jnp.float32)
  flagged = np.asarray(batched_test(c, ("g_loss",), alpha)(x, jnp.ones((rounds, c), bool)))
  sd = np.sqrt(alpha * (1 - alpha) / rounds)
  np.testing.assert_array_less(np.abs(flagged.mean(0) - alpha), 4.5 * sd)  # Per client.
  assert abs(flagged.mean() - alpha) < 4.5 * sd  # Pooled (dependent flags: the per-client sd bounds it).


def test_false_alarm_rate_with_a_varying_number_of_valid_clients_and_two_features():
  """C = 8 with clients dropping out at random (n from 3 to 8, indexing the critical table in the
  graph) and two independent features (Bonferroni): the rate among the valid clients is
  1 - (1 - alpha/2)^2, just below alpha; nobody is flagged in the rounds with n < 3."""
  rounds, c, alpha = 20_000, 8, 0.05
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(rounds, c, 2)), jnp.float32)
  valid = rng.random((rounds, c)) < rng.uniform(0.2, 1.0, (rounds, 1))
  flagged = np.asarray(batched_test(c, ("g_loss", "d_loss"), alpha)(x, jnp.asarray(valid)))
  n = valid.sum(1)
  assert not flagged[n < 3].any() and (n < 3).sum() > 100
  on = valid & (n >= 3)[:, None]
  want = 1 - (1 - alpha / 2) ** 2
  rate = flagged[on].mean()
  # Pooled over dependent flags: bound the sd by a round-level binomial (flags per round <= n).
  assert abs(rate - want) < 4.5 * np.sqrt(want * (1 - want) / on.sum()) * np.sqrt(3)
  assert abs(flagged[~valid & (n >= 3)[:, None]].mean() - want) < 0.01  # Absent clients: tested vs all n (exact too).


# -------------------------------------------------------------- detection


def run_test(x, alpha=0.01, valid=None, features=("g_loss",)):
  x = jnp.asarray(np.asarray(x, np.float32).reshape(len(x), -1))
  stage = alpha_test(alpha=alpha, features=features, abs_features=False)
  c = x.shape[0]
  cp = {"w": jnp.zeros((c, 1))}
  _, stats, _, d = jax.jit(stage.update)((), {"w": jnp.zeros(1)}, cp, stats_of(x, valid), jax.random.key(0))
  return jax.tree.map(np.asarray, d), jax.tree.map(np.asarray, stats)


def test_outlier_ten_sd_away_is_flagged():
  """C = 8: an outlier 10 sd above seven N(0, 1) clients is flagged at alpha = 0.01, nobody else."""
  rng = np.random.default_rng(0)
  for seed in range(20):
    honest = rng.normal(size=7)
    x = np.append(honest, 10.0)
    d, stats = run_test(x)
    np.testing.assert_array_equal(d["flagged"], [False] * 7 + [True], err_msg=f"draw {seed}")
    np.testing.assert_array_equal(stats["flagged"], d["flagged"])
    np.testing.assert_array_equal(stats["anomaly_score"], d["scores"])
  np.testing.assert_allclose(d["critical_value"][7], scipy.stats.t.ppf(1 - 0.005, 6), rtol=1e-6)  # n - 2 dof.


def test_power_is_low_with_four_clients():
  """C = 4 (the paper's setting), dof 2: at alpha = 0.01 an outlier must be > 9.92 * sqrt(4/3) = 11.5
  sample sd of the other three from their mean; at 10 it is flagged only at alpha = 0.05."""
  x = [-1.0, 0.0, 1.0, 10.0]  # Others: mean 0, s = 1: T = 10 / sqrt(4/3) = 8.66.
  d, _ = run_test(x, alpha=0.01)
  np.testing.assert_allclose(d["scores"][3], 10 / np.sqrt(4 / 3), rtol=1e-5)
  assert not d["flagged"].any()
  d, _ = run_test(x, alpha=0.05)
  np.testing.assert_array_equal(d["flagged"], [False, False, False, True])


def test_fewer_than_three_valid_clients_flag_nobody():
  d, _ = run_test([0.0, 100.0, 1.0, 2.0], valid=jnp.array([True, True, False, False]))
  assert not d["flagged"].any() and np.all(d["scores"] == 0) and np.all(np.isinf(d["critical_value"]))


def test_nonfinite_feature_is_flagged_and_left_out_like_detect():
  x = np.array([1.0, 1.1, 0.9, np.nan, 1.05, 0.95], np.float32)
  d, _ = run_test(x)
  assert d["flagged"][3] and np.isinf(d["scores"][3])
  want, _ = run_test(np.delete(x, 3))  # The others' statistics ignore the NaN row.
  np.testing.assert_allclose(np.delete(d["scores"], 3), want["scores"], rtol=1e-6)
  assert not np.delete(d["flagged"], 3).any()


# ------------------------------------------------------------- the weights


@functools.cache
def weight_rule(warmup_rounds=1, recovery=1, max_level=None, c=4):
  agg = compose.chain(
    recovering_weights(decay=0.5, recovery=recovery, warmup_rounds=warmup_rounds, max_level=max_level, num_clients=c),
    mean(),
  )
  return agg, jax.jit(agg.aggregate)


def run_weights(rule, flags, num_examples=None, upload=None):
  agg, fn = rule
  c = flags.shape[1]
  g = {"w": jnp.zeros(2)}
  cp = {"w": jnp.arange(c * 2, dtype=jnp.float32).reshape(c, 2)} if upload is None else upload
  n = jnp.ones(c) if num_examples is None else num_examples
  state, out = agg.init(g), []
  for r, f in enumerate(flags):
    new, state, d = fn(state, g, cp, {"num_examples": n, "flagged": jnp.asarray(f)}, jax.random.key(r))
    out.append(jax.tree.map(np.asarray, d))
  return out


def test_weight_recovers_after_the_flags_stop():
  """warmup 1 (acted on from round index 2), decay 0.5, recovery 1: client 3 flagged in rounds 0-6
  (5 acted on), then never: factor 1, 1, 1/2 ... 1/32, then 1/16, ..., 1 after exactly 5 clean rounds."""
  flags = np.zeros((15, 4), bool)
  flags[:7, 3] = True
  diags = run_weights(weight_rule(), flags)
  factor = [1, 1, 1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 1, 1, 1]
  level = [0, 0, 1, 2, 3, 4, 5, 4, 3, 2, 1, 0, 0, 0, 0]
  for r, (d, fac, lv) in enumerate(zip(diags, factor, level)):
    w = np.array([1, 1, 1, fac])
    np.testing.assert_allclose(d["weights"], w / w.sum(), rtol=1e-6, err_msg=f"round {r}")
    np.testing.assert_array_equal(d["flag_level"], [0, 0, 0, lv])
    assert bool(d["reweight_active"]) == (r >= 2)
  np.testing.assert_allclose(diags[11]["weights"], 0.25)  # 1/C again, 5 rounds after the last flag.


def test_recovery_and_cap_shorten_the_memory():
  flags = np.zeros((12, 4), bool)
  flags[:7, 3] = True
  levels = [d["flag_level"][3] for d in run_weights(weight_rule(recovery=2), flags)]
  assert levels == [0, 0, 1, 2, 3, 4, 5, 3, 1, 0, 0, 0]  # ceil(5 / 2) = 3 clean rounds.
  levels = [d["flag_level"][3] for d in run_weights(weight_rule(max_level=2), flags)]
  assert levels == [0, 0, 1, 2, 2, 2, 2, 1, 0, 0, 0, 0]


def test_weights_use_example_counts_skip_absent_clients_and_never_underflow():
  c = 4
  flags = np.zeros((300, c), bool)
  flags[:, 0] = True  # Client 0 flagged every round: its exponent reaches ~300 (0.5 ** 300 = 0 in float32).
  n = jnp.array([10.0, 20.0, 0.0, 40.0])  # Client 2 absent: its level stays 0.
  d = run_weights(weight_rule(warmup_rounds=0), flags[:3], num_examples=n)[2]
  w = np.array([10 * 0.25, 20, 0, 40])
  np.testing.assert_allclose(d["weights"], w / w.sum(), rtol=1e-6)
  np.testing.assert_array_equal(d["flag_level"], [2, 0, 0, 0])
  flags[:, 1:] = True  # Everyone flagged every round: relative factors stay 1, weights stay finite.
  agg, _ = weight_rule(warmup_rounds=0)
  g, cp = {"w": jnp.zeros(2)}, {"w": jnp.ones((c, 2))}

  def step(state, f):
    _, state, d = agg.aggregate(state, g, cp, {"num_examples": jnp.ones(c), "flagged": f}, jax.random.key(0))
    return state, d["weights"]

  state, weights = jax.jit(lambda s: jax.lax.scan(step, s, jnp.asarray(flags)))(agg.init(g))
  np.testing.assert_allclose(np.asarray(weights)[-1], 0.25)
  assert int(state[0].level[0]) == 299  # warmup 0: acted on from round index 1.


# ---------------------------------------------------------- the full rule


C = 4


def make_round(rng, c=C):
  g = {"params": {"w": rng.normal(size=(3, 4)).astype(np.float32)}, "b": rng.normal(size=(5,)).astype(np.float32)}
  cp = jax.tree.map(lambda x: (x[None] + 0.1 * rng.normal(size=(c,) + x.shape)).astype(np.float32), g)
  stats = {
    "num_examples": rng.integers(5, 20, size=c).astype(np.float32),
    "g_loss": rng.normal(1.0, 0.1, size=c).astype(np.float32),
  }
  return g, cp, stats


@functools.cache
def full_rule(inner="mean"):
  agg = alpha_detect(alpha=0.05, warmup_rounds=0, inner=inner, num_clients=C)
  return agg, jax.jit(agg.aggregate)


@pytest.mark.parametrize("inner", ["mean", "median"])
def test_contract(inner):
  rng = np.random.default_rng(0)
  g, cp, stats = make_round(rng)
  agg, fn = full_rule(inner)
  state = agg.init(g)
  out, new_state, diag = fn(state, g, cp, stats, jax.random.key(0))
  assert jax.tree.structure(out) == jax.tree.structure(g)
  for o, x in zip(jax.tree.leaves(out), jax.tree.leaves(g)):
    assert o.shape == x.shape and o.dtype == x.dtype and np.all(np.isfinite(o))
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
    assert a.shape == b.shape and a.dtype == b.dtype
  w, flagged = np.asarray(diag["weights"]), np.asarray(diag["flagged"])
  assert w.shape == (C,) and w.dtype == np.float32 and np.all(w >= 0) and abs(w.sum() - 1) < 1e-5
  assert flagged.shape == (C,) and flagged.dtype == np.bool_
  for k in ("scores", "critical_value", "flag_level", "weight_factor", "reweight_active", "nonfinite"):
    assert k in diag


def test_outlier_loses_weight_and_regains_it_end_to_end():
  """mean inner, alpha 0.05, warmup 0: a client with an outlying |G loss| in rounds 1-3 drops to
  factor 1/8, then recovers by x2 per round; the global model is the weighted mean."""
  rng = np.random.default_rng(0)
  g, cp, stats = make_round(rng)
  stats["num_examples"] = np.ones(C, np.float32)
  agg, fn = full_rule()
  state = agg.init(g)
  losses = np.array([1.0, 1.1, 0.9, 1.05], np.float32)
  factors = []
  for r in range(8):
    gl = losses.copy()
    if 1 <= r <= 3:
      gl[3] = 9.0  # T = (9 - 1) / (0.1 * sqrt(4/3)) = 69 > t_{0.975, 2} = 4.30.
    out, state, d = fn(state, g, cp, {**stats, "g_loss": gl}, jax.random.key(r))
    assert bool(d["flagged"][3]) == (1 <= r <= 3) and not d["flagged"][:3].any()
    factors.append(float(d["weight_factor"][3]))
    want = jax.tree.map(lambda x: np.tensordot(np.asarray(d["weights"]), x, 1), cp)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert factors == [1, 0.5, 0.25, 0.125, 0.25, 0.5, 1, 1]


def test_nonfinite_upload_is_excluded_and_keeps_its_level():
  rng = np.random.default_rng(1)
  g, cp, stats = make_round(rng)
  cp = jax.tree.map(np.array, cp)
  cp["b"][1, 0] = np.nan
  stats["g_loss"] = np.array([1.0, 50.0, 0.9, 1.1], np.float32)  # The NaN client also looks like an outlier.
  agg, fn = full_rule()
  out, state, d = fn(agg.init(g), g, cp, stats, jax.random.key(0))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out))
  assert bool(d["nonfinite"][1]) and float(d["weights"][1]) == 0.0 and abs(float(d["weights"].sum()) - 1) < 1e-6
  assert int(d["flag_level"][1]) == 0  # Absent from the round: not decayed (it has weight 0 anyway).
  assert not np.asarray(d["flagged"])[[0, 2, 3]].any()  # Left out of the others' statistics.


def test_module_factory_by_name_and_chain_of_names():
  """Reachable from configs today as 'fedgan_jax.aggregation.alpha_detect:alpha_detect'; built stages chain."""
  agg = registry.get("fedgan_jax.aggregation.alpha_detect:alpha_detect", num_clients=C, alpha=0.05)
  assert len(agg.init({"w": jnp.zeros(1)})) == 3
  agg = registry.chain(alpha_test(), recovering_weights(num_clients=C), "median", num_clients=C)
  assert len(agg.init({"w": jnp.zeros(1)})) == 3


# ----------------------------------------------------------------- errors


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"alpha": 1.5}, r"aggregation.kwargs.alpha=1.5: must be a number in \(0, 1\)"),
    ({"alpha": 0}, r"aggregation.kwargs.alpha=0: must be"),
    ({"features": ()}, r"aggregation.kwargs.features=\(\): must be a non-empty"),
    ({"abs_features": "yes"}, r"aggregation.kwargs.abs_features='yes': must be a bool"),
    ({"decay": 0.0}, r"aggregation.kwargs.decay=0.0: must be a number in \(0, 1\]"),
    ({"warmup_rounds": -1}, r"aggregation.kwargs.warmup_rounds=-1: must be an integer >= 0"),
    ({"recovery": 0}, r"aggregation.kwargs.recovery=0: must be an integer >= 1"),
    ({"max_level": 0}, r"aggregation.kwargs.max_level=0: must be None or an integer >= 1"),
    ({"num_clients": None}, r"aggregation.kwargs.num_clients: required"),
  ],
)
def test_bad_kwargs_name_the_field(kwargs, match):
  with pytest.raises(ValueError, match=match):
    alpha_detect(**{"num_clients": C, **kwargs})


def test_trace_time_errors_name_the_field():
  g, cp = {"w": jnp.zeros(2)}, {"w": jnp.zeros((4, 2))}
  stats = {"num_examples": jnp.ones(4), "g_loss": jnp.ones(4)}
  agg = alpha_detect(features=("nope",), num_clients=4)
  with pytest.raises(ValueError, match=r"\['nope'\] not in client_stats.*g_loss"):
    jax.eval_shape(agg.aggregate, agg.init(g), g, cp, stats, jax.random.key(0))
  agg = alpha_detect(num_clients=3)
  with pytest.raises(ValueError, match="num_clients=3 does not match"):
    jax.eval_shape(agg.aggregate, agg.init(g), g, cp, stats, jax.random.key(0))
  agg = compose.chain(recovering_weights(num_clients=4), mean())
  with pytest.raises(ValueError, match="needs a detector stage"):
    jax.eval_shape(agg.aggregate, agg.init(g), g, cp, stats, jax.random.key(0))
