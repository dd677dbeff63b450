"""Backdoor defenses (``aggregation.backdoor``): RLR, FLAME and FoolsGold against plain numpy references on
random inputs, hand-checkable cases, FLAME's clustering against sklearn's HDBSCAN, NaN/Inf exclusion, the
all-invalid case, the contract's shapes and permutation invariance, and kwargs errors."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trees import flat, flat_clients, from_flat

from fedgan_jax.aggregation import backdoor

FACTORIES = {"rlr": backdoor.rlr, "flame": backdoor.flame, "foolsgold": backdoor.foolsgold}
RULES = sorted(FACTORIES)


@functools.cache
def _built(name, c, items):
  kwargs = dict(items)
  if name == "foolsgold":
    kwargs["num_clients"] = c
  agg = FACTORIES[name](**kwargs)
  return agg, jax.jit(agg.aggregate)


def run(name, g, cp, stats, state=None, key=0, **kwargs):
  """``(new_global, new_state, diagnostics), state``; one compiled program per (rule, C, kwargs)."""
  c = jax.tree.leaves(cp)[0].shape[0]
  agg, fn = _built(name, c, tuple(sorted(kwargs.items())))
  state = agg.init(g) if state is None else state
  return fn(state, g, cp, stats, jax.random.key(key)), state


def make_global(rng):
  return {
    "params": {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)},
    "batch_stats": {"mean": rng.normal(size=(2,)).astype(np.float32), "var": rng.uniform(0.5, 1, 2).astype(np.float32)},
  }


def clients_from_updates(g, u):
  return from_flat(flat(g)[None] + u, g)


def structured_updates(rng, c, d, kind):
  """Updates with varied geometry: independent, a shared direction, or a shared direction with flipped clients."""
  if kind == 0:
    return rng.normal(size=(c, d))
  u = 0.5 * rng.normal(size=(c, d)) + rng.uniform(0.5, 2.0, size=(c, 1)) * rng.normal(size=d)
  if kind == 2:
    u[: c // 3] = -u[: c // 3] + 0.3 * rng.normal(size=(c // 3, d))
  return u


def counts(rng, c):
  return {"num_examples": rng.integers(5, 20, size=c).astype(np.float32)}


def valid_of(cp, stats):
  return np.all(np.isfinite(flat_clients(cp)), axis=1) & (np.asarray(stats["num_examples"]) > 0)


# ---------------------------------------------------------------- numpy references


def ref_rlr(g, cp, stats, threshold, server_lr):
  x, gf = flat_clients(cp), flat(g)
  valid = valid_of(cp, stats)
  u = x[valid] - gf
  theta = math.ceil(valid.sum() / 2) if threshold is None else threshold
  lr = np.where(np.abs(np.sign(u).sum(0)) >= theta, server_lr, -server_lr)
  a = np.asarray(stats["num_examples"], np.float64)[valid]
  return gf + lr * (a[:, None] * u).sum(0) / a.sum(), lr


def cosine_similarity(x):
  """sklearn's ``cosine_similarity``: rows normalized, zero rows stay zero."""
  n = np.linalg.norm(x, axis=1, keepdims=True)
  y = x / np.where(n > 0, n, 1.0)
  return y @ y.T


def components(adj):
  lab = -np.ones(len(adj), int)
  k = 0
  for s in range(len(adj)):
    if lab[s] >= 0:
      continue
    lab[s], stack = k, [s]
    while stack:
      i = stack.pop()
      for j in np.nonzero(adj[i])[0]:
        if lab[j] < 0:
          lab[j] = k
          stack.append(j)
    k += 1
  return lab


def ref_flame_cluster(u, frac=0.5):
  """Admitted rows of ``u``: the first single-linkage component (edges ``d <= t``, t increasing) with m members."""
  n = len(u)
  d = 1.0 - cosine_similarity(u)
  np.fill_diagonal(d, 0.0)
  m = min(int(frac * n) + 1, n)
  for t in np.unique(np.concatenate([[0.0], d[np.triu_indices(n, 1)]])):
    lab = components(d <= t)
    sizes = np.bincount(lab)
    if sizes.max() >= m:
      return lab == np.argmax(sizes), d
  raise AssertionError("unreachable")


def ref_flame(g, cp, stats, frac=0.5):
  x, gf = flat_clients(cp), flat(g)
  valid = valid_of(cp, stats)
  u = x[valid] - gf
  admitted_v, _ = ref_flame_cluster(u, frac)
  norms = np.linalg.norm(u, axis=1)
  bound = np.median(norms)
  clipped = u * np.minimum(1.0, bound / norms)[:, None]
  admitted = np.zeros(len(x), bool)
  admitted[np.nonzero(valid)[0][admitted_v]] = True
  return gf + clipped[admitted_v].mean(0), admitted, bound


def authors_foolsgold(grads, kappa=1.0):
  """``deep-fg/fg/foolsgold.py`` of the authors, with the paper's kappa (1 in the code)."""
  n = grads.shape[0]
  cs = cosine_similarity(grads) - np.eye(n)
  maxcs = np.max(cs, axis=1)
  for i in range(n):
    for j in range(n):
      if i == j:
        continue
      if maxcs[i] < maxcs[j]:
        cs[i][j] = cs[i][j] * maxcs[i] / maxcs[j]
  wv = 1 - (np.max(cs, axis=1))
  wv[wv > 1] = 1
  wv[wv < 0] = 0
  wv = wv / np.max(wv)
  wv[(wv == 1)] = 0.99
  with np.errstate(divide="ignore"):
    wv = kappa * (np.log(wv / (1 - wv)) + 0.5)
  wv[(np.isinf(wv) + wv > 1)] = 1
  wv[(wv < 0)] = 0
  return wv


# ---------------------------------------------------------------- RLR


@pytest.mark.parametrize("c", [4, 7])
@pytest.mark.parametrize("threshold,server_lr", [(None, 1.0), (2, 0.5)])
def test_rlr_matches_numpy(c, threshold, server_lr):
  for seed in range(3):
    rng = np.random.default_rng(seed)
    g = make_global(rng)
    cp = clients_from_updates(g, 0.1 * structured_updates(rng, c, flat(g).size, seed))
    cp["params"]["b"][0] = g["params"]["b"]  # A zero update: sign 0, no vote.
    stats = counts(rng, c)
    if seed == 2:
      stats["num_examples"][1] = 0.0
    (out, _, diag), _ = run("rlr", g, cp, stats, threshold=threshold, server_lr=server_lr)
    expect, lr = ref_rlr(g, cp, stats, threshold, server_lr)
    np.testing.assert_allclose(flat(out), expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(diag["rlr_flipped"]), np.mean(lr < 0), atol=1e-6)
    valid = valid_of(cp, stats)
    a = np.where(valid, stats["num_examples"], 0.0)
    np.testing.assert_allclose(diag["weights"], a / a.sum(), rtol=1e-6)
    assert not np.any(diag["flagged"])


def test_rlr_hand_case_flips_the_contested_coordinate():
  g = {"w": np.zeros(2, np.float32)}
  cp = {"w": np.array([[1.0, 1.0], [2.0, 1.0], [-1.0, 1.0]], np.float32)}
  stats = {"num_examples": np.ones(3, np.float32)}
  # Coordinate 0: signs +, +, - sum to 1 < ceil(3 / 2) = 2, so the lr is -1 on the mean 2/3.
  # Coordinate 1: signs sum to 3 >= 2, lr +1.
  (out, _, diag), _ = run("rlr", g, cp, stats)
  np.testing.assert_allclose(out["w"], [-2.0 / 3.0, 1.0], rtol=1e-6)
  assert float(diag["rlr_threshold"]) == 2.0 and float(diag["rlr_flipped"]) == 0.5
  (out, _, _), _ = run("rlr", g, cp, stats, threshold=1)  # Now coordinate 0 passes.
  np.testing.assert_allclose(out["w"], [2.0 / 3.0, 1.0], rtol=1e-6)
  (out, _, _), _ = run("rlr", g, cp, stats, threshold=0, server_lr=0.5)  # Disabled: FedAvg times 0.5.
  np.testing.assert_allclose(out["w"], [1.0 / 3.0, 0.5], rtol=1e-6)


# ---------------------------------------------------------------- FLAME


@pytest.mark.parametrize("c", [4, 7])
def test_flame_matches_numpy(c):
  for seed in range(3):
    rng = np.random.default_rng(10 + seed)
    g = make_global(rng)
    cp = clients_from_updates(g, 0.1 * structured_updates(rng, c, flat(g).size, seed))
    stats = counts(rng, c)
    if seed == 1:
      stats["num_examples"][c - 1] = 0.0
    (out, _, diag), _ = run("flame", g, cp, stats, noise_lambda=0.0)
    expect, admitted, bound = ref_flame(g, cp, stats)
    np.testing.assert_array_equal(np.asarray(diag["weights"]) > 0, admitted)
    np.testing.assert_allclose(diag["weights"], admitted / admitted.sum(), rtol=1e-6)
    np.testing.assert_array_equal(diag["flagged"], valid_of(cp, stats) & ~admitted)
    np.testing.assert_allclose(float(diag["clip_bound"]), bound, rtol=1e-5)
    np.testing.assert_allclose(flat(out), expect, rtol=1e-5, atol=1e-6)


def test_flame_clustering_equals_sklearn_hdbscan():
  """The in-graph rule labels what HDBSCAN(min_cluster_size=n//2+1, min_samples=1, allow_single_cluster) labels."""
  cluster = pytest.importorskip("sklearn.cluster")
  for c in (4, 7):
    for seed in range(4):
      rng = np.random.default_rng(20 + seed)
      g = make_global(rng)
      cp = clients_from_updates(g, 0.1 * structured_updates(rng, c, flat(g).size, seed % 3))
      (_, _, diag), _ = run("flame", g, cp, counts(rng, c), noise_lambda=0.0)
      _, d = ref_flame_cluster(flat_clients(cp) - flat(g))
      hdb = cluster.HDBSCAN(
        min_cluster_size=c // 2 + 1, min_samples=1, allow_single_cluster=True, metric="precomputed", copy=True
      )
      labels = hdb.fit(np.maximum(d, 0.0)).labels_
      np.testing.assert_array_equal(np.asarray(diag["weights"]) > 0, labels >= 0)


def test_flame_hand_case_drops_the_opposite_update_and_clips_the_scaled_one():
  e = np.eye(6)
  honest = e[0] + 0.1 * e[1:5]  # Four updates at equal pairwise cosine distance.
  g = {"w": np.zeros(6, np.float32)}
  stats = {"num_examples": np.ones(5, np.float32)}
  # The fifth client pushes the opposite way: cosine distance ~2 to every honest client, not admitted.
  cp = {"w": np.vstack([honest, -2.0 * e[0]]).astype(np.float32)}
  (out, _, diag), _ = run("flame", g, cp, stats, noise_lambda=0.0)
  np.testing.assert_array_equal(diag["flagged"], [False] * 4 + [True])
  np.testing.assert_allclose(diag["weights"], [0.25] * 4 + [0.0])
  np.testing.assert_allclose(out["w"], honest.mean(0), rtol=1e-6)
  np.testing.assert_allclose(float(diag["clip_bound"]), math.sqrt(1.01), rtol=1e-6)
  assert bool(diag["clipped"][4]) and not np.any(diag["clipped"][:4])
  # A scaled update in the honest direction is admitted but clipped to the median norm sqrt(1.01).
  cp = {"w": np.vstack([honest, 4.0 * (e[0] + 0.1 * e[5])]).astype(np.float32)}
  (out, _, diag), _ = run("flame", g, cp, stats, noise_lambda=0.0)
  assert not np.any(diag["flagged"])
  np.testing.assert_array_equal(diag["clipped"], [False] * 4 + [True])
  np.testing.assert_allclose(out["w"], e[0] + 0.02 * e[1:].sum(0), rtol=1e-6, atol=1e-7)


def test_flame_noise_has_std_lambda_times_median_norm_and_keeps_variances_non_negative():
  rng = np.random.default_rng(3)
  g = {
    "params": {"w": rng.normal(size=(4000,)).astype(np.float32)},
    "batch_stats": {"var": np.full(4000, 1e-3, np.float32)},
  }
  cp = clients_from_updates(g, 0.01 * rng.normal(size=(4, 8000)))
  cp["batch_stats"]["var"] = np.abs(cp["batch_stats"]["var"])
  stats = {"num_examples": np.ones(4, np.float32)}
  (clean, _, _), _ = run("flame", g, cp, stats, noise_lambda=0.0)
  (noisy, _, diag), _ = run("flame", g, cp, stats, key=1, noise_lambda=1.0)
  (same, _, _), _ = run("flame", g, cp, stats, key=1, noise_lambda=1.0)
  (other, _, _), _ = run("flame", g, cp, stats, key=2, noise_lambda=1.0)
  noise = np.asarray(noisy["params"]["w"], np.float64) - np.asarray(clean["params"]["w"], np.float64)
  std = float(diag["noise_std"])
  np.testing.assert_allclose(std, float(diag["clip_bound"]), rtol=1e-6)
  assert abs(noise.std() / std - 1) < 0.05 and abs(noise.mean()) < 4 * std / math.sqrt(noise.size)
  np.testing.assert_array_equal(flat(noisy), flat(same))
  assert not np.array_equal(flat(noisy), flat(other))
  var = np.asarray(noisy["batch_stats"]["var"])
  assert np.all(var >= 0) and np.any(var == 0)


# ---------------------------------------------------------------- FoolsGold


@pytest.mark.parametrize("c", [4, 7])
def test_foolsgold_matches_the_authors_code_over_rounds(c):
  rng = np.random.default_rng(30 + c)
  g = make_global(rng)
  d = flat(g).size
  state, history = None, np.zeros((c, d))
  for r in range(4):
    u = 0.1 * structured_updates(rng, c, d, r % 3)
    if c == 7:
      u[5] = u[6] + 1e-3 * rng.normal(size=d)  # A near-sybil pair.
    cp = clients_from_updates(g, u)
    stats = counts(rng, c)
    if r == 2:
      stats["num_examples"][0] = 0.0  # Sits out a round: no vote, history unchanged.
    (out, state, diag), _ = run("foolsgold", g, cp, stats, state=state)
    valid = valid_of(cp, stats)
    x = flat_clients(cp)
    history[valid] += (x - flat(g))[valid]
    wv = np.zeros(c)
    wv[valid] = authors_foolsgold(history[valid])
    np.testing.assert_allclose(diag["fg_weight"], wv, atol=2e-4)
    np.testing.assert_allclose(diag["weights"], wv / wv.sum(), atol=2e-4)
    np.testing.assert_array_equal(diag["flagged"], valid & (wv == 0))
    np.testing.assert_allclose(flat(out), (wv / wv.sum()) @ x, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(flat_clients(state.history), history, rtol=1e-5, atol=1e-6)
    g = out


def test_foolsgold_gives_identical_sybils_zero_weight_over_rounds():
  rng = np.random.default_rng(5)
  g = make_global(rng)
  d = flat(g).size
  state, total = None, np.zeros((5, d))
  for _ in range(3):
    u = 0.1 * rng.normal(size=(5, d))
    u[4] = u[3]  # Clients 3 and 4 are sybils: the same update every round.
    cp = clients_from_updates(g, u)
    (out, state, diag), _ = run("foolsgold", g, cp, {"num_examples": np.ones(5, np.float32)}, state=state)
    w = np.asarray(diag["weights"])
    assert np.all(w[3:] == 0) and np.all(w[:3] > 0) and abs(w.sum() - 1) < 1e-6
    np.testing.assert_array_equal(diag["flagged"], [False, False, False, True, True])
    np.testing.assert_allclose(flat(out), w[:3] @ flat_clients(cp)[:3], rtol=1e-5, atol=1e-6)
    total += flat_clients(cp) - flat(g)
    np.testing.assert_allclose(flat_clients(state.history), total, rtol=1e-5, atol=1e-6)
    g = out
  # Exact tiny case: two identical clients and an orthogonal one. cs = 1 for the pair, so 1 - max = 0 and
  # the logit sends them to 0; the third keeps 1 - 0 = 1 -> 0.99 -> ln(99) + 0.5 > 1 -> 1.
  g = {"w": np.zeros(2, np.float32)}
  cp = {"w": np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)}
  (out, _, diag), _ = run("foolsgold", g, cp, {"num_examples": np.ones(3, np.float32)})
  np.testing.assert_array_equal(diag["fg_weight"], [0.0, 0.0, 1.0])
  np.testing.assert_array_equal(out["w"], [0.0, 1.0])


# ---------------------------------------------------------------- contract and exclusion

KWARGS = {"rlr": {}, "flame": {}, "foolsgold": {}}


@pytest.mark.parametrize("name", RULES)
def test_contract_shapes_and_permutation_invariance(name):
  c = 7
  rng = np.random.default_rng(40)
  g = make_global(rng)
  cp = clients_from_updates(g, 0.1 * structured_updates(rng, c, flat(g).size, 2))
  stats = counts(rng, c)
  (out, new_state, diag), state = run(name, g, cp, stats, key=3, **KWARGS[name])
  assert jax.tree.structure(out) == jax.tree.structure(g)
  for o, x in zip(jax.tree.leaves(out), jax.tree.leaves(g)):
    assert o.shape == x.shape and o.dtype == x.dtype and np.all(np.isfinite(o))
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
    assert a.shape == b.shape and a.dtype == b.dtype
  w, flagged = np.asarray(diag["weights"]), np.asarray(diag["flagged"])
  assert w.shape == (c,) and w.dtype == np.float32 and flagged.shape == (c,) and flagged.dtype == np.bool_
  assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-5 and not np.any(diag["nonfinite"])
  perm = rng.permutation(c)
  cp_p = jax.tree.map(lambda x: x[perm], cp)
  (out_p, _, diag_p), _ = run(name, g, cp_p, {k: v[perm] for k, v in stats.items()}, key=3, **KWARGS[name])
  np.testing.assert_allclose(flat(out_p), flat(out), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(diag_p["weights"]), w[perm], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(diag_p["flagged"]), flagged[perm])


@pytest.mark.parametrize("name", RULES)
def test_nan_and_inf_uploads_are_excluded_and_never_reach_the_output(name):
  c = 7
  rng = np.random.default_rng(50)
  g = make_global(rng)
  cp = clients_from_updates(g, 0.1 * structured_updates(rng, c, flat(g).size, 1))
  stats = counts(rng, c)
  bad = jax.tree.map(np.copy, cp)
  bad["params"]["w"][1, 0, 0] = np.nan
  bad["params"]["b"][4, 2] = np.inf
  (out, new_state, diag), state = run(name, g, bad, stats, key=7, **KWARGS[name])
  # The same round with those two clients replaced by other finite values and no examples.
  other = jax.tree.map(np.copy, cp)
  for i in (1, 4):
    for x in jax.tree.leaves(other):
      x[i] = 1e3
  stats0 = {"num_examples": np.where(np.isin(np.arange(c), [1, 4]), 0.0, stats["num_examples"]).astype(np.float32)}
  (out0, new_state0, diag0), _ = run(name, g, other, stats0, key=7, **KWARGS[name])
  assert np.all(np.isfinite(flat(out)))
  np.testing.assert_allclose(flat(out), flat(out0), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(diag["nonfinite"], np.isin(np.arange(c), [1, 4]))
  np.testing.assert_allclose(diag["weights"], diag0["weights"], atol=1e-7)
  assert np.all(np.asarray(diag["weights"])[[1, 4]] == 0) and not np.any(np.asarray(diag["flagged"])[[1, 4]])
  for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(new_state0)):
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", RULES)
def test_all_clients_invalid_keeps_global(name):
  c = 7
  rng = np.random.default_rng(60)
  g = make_global(rng)
  cp = jax.tree.map(lambda x: np.full((c,) + x.shape, np.nan, np.float32), g)
  (out, new_state, diag), state = run(name, g, cp, counts(rng, c), **KWARGS[name])
  np.testing.assert_array_equal(flat(out), flat(g))
  assert float(jnp.sum(diag["weights"])) == 0 and not np.any(diag["flagged"]) and np.all(diag["nonfinite"])
  for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  # No examples anywhere (finite uploads) is no valid client too.
  cp = clients_from_updates(g, rng.normal(size=(c, flat(g).size)))
  (out, _, diag), _ = run(name, g, cp, {"num_examples": np.zeros(c, np.float32)}, **KWARGS[name])
  np.testing.assert_array_equal(flat(out), flat(g))
  assert float(jnp.sum(diag["weights"])) == 0


def test_foolsgold_checks_the_client_axis():
  agg = backdoor.foolsgold(num_clients=3)
  g = {"w": np.zeros(2, np.float32)}
  with pytest.raises(ValueError, match=r"aggregation.kwargs.num_clients=3 does not match the client axis of size 4"):
    agg.aggregate(agg.init(g), g, {"w": np.ones((4, 2), np.float32)}, {"num_examples": np.ones(4)}, jax.random.key(0))


@pytest.mark.parametrize(
  "factory,kwargs,match",
  [
    (backdoor.rlr, {"threshold": -1}, r"aggregation.kwargs.threshold=-1: must be"),
    (backdoor.rlr, {"threshold": float("nan")}, r"aggregation.kwargs.threshold=nan"),
    (backdoor.rlr, {"server_lr": 0.0}, r"aggregation.kwargs.server_lr=0.0: must be"),
    (backdoor.rlr, {"server_lr": "1"}, r"aggregation.kwargs.server_lr='1'"),
    (backdoor.flame, {"noise_lambda": -0.1}, r"aggregation.kwargs.noise_lambda=-0.1: must be"),
    (backdoor.flame, {"min_cluster_frac": 0.4}, r"aggregation.kwargs.min_cluster_frac=0.4: must be in \[0.5, 1\)"),
    (backdoor.flame, {"min_cluster_frac": 1.0}, r"aggregation.kwargs.min_cluster_frac=1.0"),
    (backdoor.foolsgold, {"kappa": 0.0, "num_clients": 4}, r"aggregation.kwargs.kappa=0.0: must be"),
    (backdoor.foolsgold, {"use_history": 1, "num_clients": 4}, r"aggregation.kwargs.use_history=1"),
    (backdoor.foolsgold, {}, r"aggregation.kwargs.num_clients: required by 'foolsgold'"),
    (backdoor.foolsgold, {"num_clients": 0}, r"aggregation.kwargs.num_clients=0"),
  ],
)
def test_bad_kwargs_name_the_field(factory, kwargs, match):
  with pytest.raises(ValueError, match=match):
    factory(**kwargs)
