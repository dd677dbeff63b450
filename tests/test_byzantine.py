"""Centered Clipping, DnC and Bulyan (aggregation.byzantine): numpy references
on random inputs, hand-checkable cases, non-finite and empty rounds, kwargs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trees import flat, flat_clients, from_flat

from fedgan_jax.aggregation import base
from fedgan_jax.aggregation import byzantine as byz

FACTORIES = {"centered_clip": byz.centered_clip, "dnc": byz.dnc, "bulyan": byz.bulyan}
DEFAULT_KWARGS = {
  "centered_clip": {"tau": 0.3, "iters": 3},
  "dnc": {"num_byzantine": 1},
  "bulyan": {"num_byzantine": 1},
}


def make_global(rng):
  return {
    "params": {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)},
    "batch_stats": {"mean": rng.normal(size=(2,)).astype(np.float32)},
  }


def make_clients(rng, g, c, scale=0.1):
  """Clients around ``g`` with heterogeneous spreads (no near-ties in Krum scores)."""
  spread = scale * rng.uniform(0.5, 2.0, size=c)
  return jax.tree.map(
    lambda x: (x[None] + spread.reshape((-1,) + (1,) * x.ndim) * rng.normal(size=(c,) + x.shape)).astype(x.dtype), g
  )


def make_stats(rng, c):
  return {"num_examples": rng.integers(5, 20, size=c).astype(np.float32)}


@functools.cache
def _compiled(name, items):
  agg = FACTORIES[name](**dict(items))
  return agg, jax.jit(agg.aggregate)


def run(name, g, cp, stats, key=0, state=None, **kwargs):
  """One jitted round; one compilation per (rule, kwargs, shapes), shared across tests."""
  agg, fn = _compiled(name, tuple(sorted((kwargs or DEFAULT_KWARGS[name]).items())))
  state = agg.init(g) if state is None else state
  return fn(state, g, cp, stats, jax.random.key(key))


def check_contract(diag, c, valid=None):
  w, flagged = np.asarray(diag["weights"]), np.asarray(diag["flagged"])
  assert w.shape == (c,) and w.dtype == np.float32
  assert flagged.shape == (c,) and flagged.dtype == np.bool_
  assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-5
  if valid is not None:
    assert np.all(w[~valid] == 0) and not np.any(flagged[~valid])


# ------------------------------------------------------------ numpy references


def np_centered_clip(u, valid, tau, iters, v0=None):
  """Returns (v, w, t): the aggregate update, its coefficients on the updates, the last clip factors."""
  c = u.shape[0]
  n = valid.sum()
  v = np.zeros(u.shape[1]) if v0 is None else np.asarray(v0, np.float64)
  w, t = np.zeros(c), np.zeros(c)
  for _ in range(iters):
    diff = u - v
    r = np.linalg.norm(diff, axis=1)
    t = np.where(valid, np.minimum(1.0, tau / np.maximum(r, 1e-30)), 0.0)
    v = v + (t[:, None] * np.where(valid[:, None], diff, 0.0)).sum(0) / n
    w = w * (1 - t.sum() / n) + t / n
  return v, w, t


def np_dnc(u, valid, counts, num_removed, idx_rows):
  """Returns (kept mask, mean score) of Algorithm 2 of Shejwalkar & Houmansadr on the valid clients."""
  ids = np.flatnonzero(valid)
  k = min(num_removed, len(ids) - 1)
  good = set(ids.tolist())
  scores = np.zeros(len(valid))
  for cols in idx_rows:
    x = u[ids][:, cols]
    xc = x - x.mean(0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    s = (xc @ vt[0]) ** 2
    scores[ids] += s / len(idx_rows)
    good &= set(ids[np.argsort(s)[: len(ids) - k]].tolist())
  kept = np.zeros(len(valid), bool)
  kept[sorted(good)] = True
  return kept, scores


def np_bulyan(x, f):
  """Bulyan on the rows of ``x`` (all valid): (aggregate, selected indices, per-client coordinate counts)."""
  n = len(x)
  theta, beta = n - 2 * f, n - 4 * f
  d = ((x[:, None] - x[None]) ** 2).sum(-1)
  remaining, selected = list(range(n)), []
  while len(selected) < theta:
    m = len(remaining)
    k = min(max(n - f - 2, 1), m - 1)  # The round's Krum neighbour count, capped by what remains.
    scores = [np.sort([d[i, j] for j in remaining if j != i])[:k].sum() for i in remaining]
    best = remaining[int(np.argmin(scores))]
    selected.append(best)
    remaining.remove(best)
  s = x[selected]
  med = np.median(s, axis=0)
  closest = np.argsort(np.abs(s - med), axis=0, kind="stable")[:beta]
  out = np.take_along_axis(s, closest, axis=0).mean(0)
  counts = np.zeros(n)
  np.add.at(counts, np.asarray(selected)[closest].reshape(-1), 1)
  return out, sorted(selected), counts


# ------------------------------------------------------------ Centered Clipping


@pytest.mark.parametrize("c", [5, 7, 11])
def test_centered_clip_matches_numpy(c):
  for seed in range(3):
    rng = np.random.default_rng(100 * c + seed)
    g = make_global(rng)
    cp, stats = make_clients(rng, g, c), make_stats(rng, c)
    out, _, diag = run("centered_clip", g, cp, stats)
    u = flat_clients(cp) - flat(g)
    v, w, t = np_centered_clip(u, np.ones(c, bool), tau=0.3, iters=3)
    assert 0 < t.min() < 1  # Both clipped and unclipped clients here.
    np.testing.assert_allclose(flat(out), flat(g) + v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(diag["weights"], w / w.sum(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(diag["clip_factor"], t, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(diag["anchor_weight"]), 1 - w.sum(), atol=1e-5)
    np.testing.assert_array_equal(diag["clipped"], t < 1)
    check_contract(diag, c)
    assert not np.any(np.asarray(diag["flagged"]))


def test_centered_clip_warm_start_carries_the_center():
  c, rng = 7, np.random.default_rng(1)
  g = make_global(rng)
  kw = {"tau": 0.3, "iters": 2, "warm_start": True}
  agg = byz.centered_clip(**kw)
  state = agg.init(g)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(state))
  v_prev = None
  for r in range(2):
    cp, stats = make_clients(rng, g, c), make_stats(rng, c)
    out, state, diag = run("centered_clip", g, cp, stats, state=state, **kw)
    v, w, _ = np_centered_clip(flat_clients(cp) - flat(g), np.ones(c, bool), 0.3, 2, v0=v_prev)
    np.testing.assert_allclose(flat(out), flat(g) + v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flat(state.center), v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(diag["weights"], w / w.sum(), rtol=1e-5, atol=1e-7)
    v_prev = v
    assert r == 0 or not np.allclose(v, 0)


def test_centered_clip_far_outlier_moves_at_most_tau_over_c_per_iteration():
  c, tau, rng = 7, 0.5, np.random.default_rng(2)
  g = make_global(rng)
  cp = jax.tree.map(lambda x: np.repeat(x[None], c, axis=0), g)  # Honest updates are exactly 0.
  direction = np.zeros(flat(g).size)
  direction[3] = 1.0
  cp = from_flat(flat_clients(cp) + 1e4 * (np.arange(c) == 0)[:, None] * direction, g)
  stats = make_stats(rng, c)
  prev = 0.0
  for iters in (1, 2, 4):
    out, _, diag = run("centered_clip", g, cp, stats, tau=tau, iters=iters)
    moved = flat(out) - flat(g)
    along = moved @ direction
    np.testing.assert_allclose(np.delete(moved, 3), 0.0, atol=1e-6)  # Only toward the outlier.
    assert along <= iters * tau / c + 1e-6
    assert along >= prev  # v_{l+1} = v_l / C + tau / C: increasing, bounded by tau / (C - 1).
    prev = along
    if iters == 1:
      np.testing.assert_allclose(along, tau / c, rtol=1e-5)
  assert prev <= tau / (c - 1) + 1e-6


# ------------------------------------------------------------------------ DnC


@pytest.mark.parametrize("c", [5, 7, 11])
def test_dnc_matches_numpy(c):
  kw = {"num_byzantine": 2, "subsample_dim": 8, "iters": 2, "filter_frac": 1.0}
  for seed in range(3):
    rng = np.random.default_rng(200 * c + seed)
    g = make_global(rng)
    cp, stats = make_clients(rng, g, c), make_stats(rng, c)
    out, _, diag = run("dnc", g, cp, stats, key=seed, **kw)
    x = flat_clients(cp)
    idx = np.asarray(byz.subsample_coordinates(jax.random.key(seed), x.shape[1], 8, 2))
    assert idx.shape == (2, 8) and all(len(set(row)) == 8 for row in idx)
    kept, scores = np_dnc(x - flat(g), np.ones(c, bool), stats["num_examples"], 2, idx)
    np.testing.assert_array_equal(diag["flagged"], ~kept)
    np.testing.assert_allclose(diag["scores"], scores, rtol=1e-3, atol=1e-7)
    expect = np.average(x[kept], axis=0, weights=stats["num_examples"][kept])
    np.testing.assert_allclose(flat(out), expect, rtol=1e-5, atol=1e-6)
    w = np.where(kept, stats["num_examples"], 0)
    np.testing.assert_allclose(diag["weights"], w / w.sum(), rtol=1e-6)
    check_contract(diag, c)


def test_dnc_uses_all_coordinates_when_few_and_keys_change_subsets():
  np.testing.assert_array_equal(
    byz.subsample_coordinates(jax.random.key(0), 19, 10000, 3), np.tile(np.arange(19), (3, 1))
  )
  a = np.asarray(byz.subsample_coordinates(jax.random.key(0), 1000, 10, 2))
  b = np.asarray(byz.subsample_coordinates(jax.random.key(1), 1000, 10, 2))
  assert not np.array_equal(a, b) and not np.array_equal(a[0], a[1])
  assert a.min() >= 0 and a.max() < 1000


def test_dnc_removes_outlier_along_one_direction():
  c, rng = 7, np.random.default_rng(3)
  g = make_global(rng)
  cp, stats = make_clients(rng, g, c), make_stats(rng, c)
  x = flat_clients(cp)
  direction = rng.normal(size=x.shape[1])
  x[4] = x[np.arange(c) != 4].mean(0) + 5.0 * direction / np.linalg.norm(direction)
  out, _, diag = run("dnc", g, from_flat(x, g), stats)  # Default: all 19 coordinates, one removed.
  np.testing.assert_array_equal(diag["flagged"], np.arange(c) == 4)
  assert int(np.argmax(diag["scores"])) == 4
  keep = np.arange(c) != 4
  np.testing.assert_allclose(flat(out), np.average(x[keep], axis=0, weights=stats["num_examples"][keep]), rtol=1e-5)


def test_dnc_without_byzantine_is_fedavg():
  c, rng = 7, np.random.default_rng(4)
  g = make_global(rng)
  cp, stats = make_clients(rng, g, c), make_stats(rng, c)
  out, _, diag = run("dnc", g, cp, stats, num_byzantine=0)
  ref, _, ref_diag = jax.jit(base.mean().aggregate)(base.EmptyState(), g, cp, stats, jax.random.key(0))
  np.testing.assert_allclose(flat(out), flat(ref), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(diag["weights"], ref_diag["weights"], rtol=1e-6)
  assert not np.any(np.asarray(diag["flagged"]))


# --------------------------------------------------------------------- Bulyan


@pytest.mark.parametrize("c,f", [(5, 0), (7, 1), (11, 1), (11, 2)])
def test_bulyan_matches_numpy(c, f):
  for seed in range(3):
    rng = np.random.default_rng(300 * c + 10 * f + seed)
    g = make_global(rng)
    cp, stats = make_clients(rng, g, c, scale=0.3), make_stats(rng, c)
    out, _, diag = run("bulyan", g, cp, stats, num_byzantine=f)
    x = flat_clients(cp)
    expect, selected, counts = np_bulyan(x, f)
    np.testing.assert_array_equal(np.flatnonzero(diag["selected"]), selected)
    np.testing.assert_array_equal(diag["flagged"], ~np.asarray(diag["selected"]))
    np.testing.assert_allclose(flat(out), expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(diag["weights"], counts / counts.sum(), rtol=1e-5)
    check_contract(diag, c)


def test_bulyan_rejects_far_outlier():
  c, rng = 7, np.random.default_rng(5)
  g = make_global(rng)
  cp, stats = make_clients(rng, g, c), make_stats(rng, c)
  x = flat_clients(cp)
  x[2] += 1e3
  out, _, diag = run("bulyan", g, from_flat(x, g), stats)
  assert bool(diag["flagged"][2]) and float(diag["weights"][2]) == 0
  np.testing.assert_allclose(flat(out), np_bulyan(x, 1)[0], rtol=1e-5, atol=1e-6)
  assert np.max(np.abs(flat(out) - x[np.arange(c) != 2].mean(0))) < 0.5


# ------------------------------------------------- invalid clients, all rules


def with_invalid(rng, c=11):
  """Client 2 uploads NaN, client 4 Inf, client 6 has num_examples 0."""
  g = make_global(rng)
  cp, stats = make_clients(rng, g, c, scale=0.3), make_stats(rng, c)
  x = flat_clients(cp)
  x[2, 0], x[4, 7] = np.nan, -np.inf
  stats["num_examples"][6] = 0
  valid = ~np.isin(np.arange(c), [2, 4, 6])
  return g, from_flat(x, g), stats, x, valid


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_invalid_clients_excluded(name):
  rng = np.random.default_rng(6)
  g, cp, stats, x, valid = with_invalid(rng)
  out, _, diag = run(name, g, cp, stats)
  np.testing.assert_array_equal(diag["nonfinite"], np.isin(np.arange(11), [2, 4]))
  check_contract(diag, 11, valid)
  ids = np.flatnonzero(valid)
  if name == "centered_clip":
    v, w, _ = np_centered_clip(np.where(valid[:, None], x - flat(g), 0.0), valid, 0.3, 3)
    expect = flat(g) + v
    np.testing.assert_allclose(diag["weights"], w / w.sum(), rtol=1e-5, atol=1e-7)
  elif name == "dnc":
    kept, _ = np_dnc(np.where(valid[:, None], x - flat(g), 0.0), valid, stats["num_examples"], 1, [np.arange(19)])
    assert kept.sum() == valid.sum() - 1
    np.testing.assert_array_equal(diag["flagged"], valid & ~kept)
    expect = np.average(x[kept], axis=0, weights=stats["num_examples"][kept])
  else:
    expect, selected, _ = np_bulyan(x[ids], 1)
    np.testing.assert_array_equal(np.flatnonzero(diag["selected"]), ids[selected])
  np.testing.assert_allclose(flat(out), expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_all_clients_invalid_keeps_global(name):
  rng = np.random.default_rng(7)
  g = make_global(rng)
  cp, stats = make_clients(rng, g, 7), make_stats(rng, 7)
  cp = jax.tree.map(lambda x: np.full_like(x, np.nan), cp)
  cp["params"]["b"][3] = 1.0  # Finite but no examples: still invalid.
  stats["num_examples"][:] = 0
  out, _, diag = run(name, g, cp, stats)
  np.testing.assert_array_equal(flat(out), flat(g))
  assert float(jnp.sum(diag["weights"])) == 0 and not np.any(np.asarray(diag["flagged"]))


def test_rules_are_finite_under_huge_upload():
  rng = np.random.default_rng(8)
  g = make_global(rng)
  cp, stats = make_clients(rng, g, 7), make_stats(rng, 7)
  x = flat_clients(cp)
  honest = x[1:].mean(0)
  x[0] *= 1e6
  for name, kw in [("centered_clip", {"tau": 0.3, "iters": 3}), ("dnc", {}), ("bulyan", {})]:
    out, _, _ = run(name, g, from_flat(x, g), stats, **kw)
    assert np.all(np.isfinite(flat(out))) and np.max(np.abs(flat(out) - honest)) < 0.5, name


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_permutation_invariance(name):
  for seed in range(3):
    rng = np.random.default_rng(10 + seed)
    g = make_global(rng)
    cp, stats = make_clients(rng, g, 7), make_stats(rng, 7)
    perm = rng.permutation(7)
    out, _, diag = run(name, g, cp, stats, key=seed)
    stats_p = {k: v[perm] for k, v in stats.items()}
    out_p, _, diag_p = run(name, g, jax.tree.map(lambda x: x[perm], cp), stats_p, key=seed)
    np.testing.assert_allclose(flat(out_p), flat(out), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(diag_p["weights"], np.asarray(diag["weights"])[perm], atol=1e-6)
    np.testing.assert_array_equal(diag_p["flagged"], np.asarray(diag["flagged"])[perm])


# -------------------------------------------------------------------- kwargs


@pytest.mark.parametrize(
  "factory,kwargs,match",
  [
    (byz.centered_clip, {"tau": 0.0}, r"aggregation.kwargs.tau=0.0: must be"),
    (byz.centered_clip, {"tau": float("inf")}, r"aggregation.kwargs.tau=inf: must be"),
    (byz.centered_clip, {"iters": 0}, r"aggregation.kwargs.iters=0: must be an integer >= 1"),
    (byz.centered_clip, {"iters": 1.5}, r"aggregation.kwargs.iters=1.5"),
    (byz.centered_clip, {"warm_start": "yes"}, r"aggregation.kwargs.warm_start='yes'"),
    (byz.dnc, {"num_byzantine": -1}, r"aggregation.kwargs.num_byzantine=-1: must be an integer >= 0"),
    (byz.dnc, {"subsample_dim": 0}, r"aggregation.kwargs.subsample_dim=0"),
    (byz.dnc, {"iters": 0}, r"aggregation.kwargs.iters=0"),
    (byz.dnc, {"filter_frac": -0.5}, r"aggregation.kwargs.filter_frac=-0.5: must be"),
    (byz.bulyan, {"num_byzantine": True}, r"aggregation.kwargs.num_byzantine=True"),
    (byz.bulyan, {"num_byzantine": 1, "num_clients": 6}, r"num_byzantine=1: Bulyan needs num_clients >= 4f \+ 3 = 7"),
    (byz.bulyan, {"num_byzantine": 2, "num_clients": 10}, r"num_byzantine=2: .*= 11 .*got num_clients=10"),
  ],
)
def test_bad_kwargs_name_the_field(factory, kwargs, match):
  with pytest.raises(ValueError, match=match):
    factory(**kwargs)


def test_client_count_checked_when_traced():
  rng = np.random.default_rng(9)
  g = make_global(rng)
  cp, stats = make_clients(rng, g, 6), make_stats(rng, 6)
  agg = byz.bulyan(num_byzantine=1)  # C unknown at build time.
  with pytest.raises(ValueError, match=r"num_byzantine=1: Bulyan needs num_clients >= 4f \+ 3 = 7.*got num_clients=6"):
    jax.jit(agg.aggregate)(agg.init(g), g, cp, stats, jax.random.key(0))
  agg = byz.dnc(num_byzantine=3, filter_frac=2.0)
  with pytest.raises(ValueError, match=r"num_byzantine=3, filter_frac=2.0: DnC removes .* = 6 .*num_clients=6"):
    jax.jit(agg.aggregate)(agg.init(g), g, cp, stats, jax.random.key(0))
