"""FLTrust (``aggregation.fltrust``): a numpy reference of the formula on random inputs, hand-checkable cases,
what a round without trust does, NaN/Inf uploads and server models, kwargs and config errors, and one compiled
round of ``configs/test.py`` whose server lane is an honest client's training on the root set."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trees import flat, flat_clients, from_flat

from conftest import tiny_config
from fedgan_jax import assemble, config_lib
from fedgan_jax.aggregation import SERVER_MODEL, fltrust
from fedgan_jax.aggregation.fltrust import DEFAULT_ROOT_SIZE


@functools.cache
def _built(items):
  agg = fltrust(**dict(items))
  return agg, jax.jit(agg.aggregate)


def run(g, cp, server, stats, **kwargs):
  """``(new_global, new_state, diagnostics)``; one compiled program per (shapes, kwargs)."""
  agg, fn = _built(tuple(sorted(kwargs.items())))
  return fn(agg.init(g), g, cp, {**stats, SERVER_MODEL: server}, jax.random.key(0))


def make_global(rng):
  return {
    "params": {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)},
    "batch_stats": {"mean": rng.normal(size=(2,)).astype(np.float32), "var": rng.uniform(2, 3, 2).astype(np.float32)},
  }


def from_updates(g, u):
  return from_flat(flat(g)[None] + u, g)


def server_from_update(g, u0):
  return jax.tree.map(lambda x: x[0], from_updates(g, u0[None]))


def counts(rng, c):
  return {"num_examples": rng.integers(5, 20, size=c).astype(np.float32)}


def var_mask(g):
  """True at the coordinates of BatchNorm running variances in ``flat(g)``'s order."""
  paths = jax.tree_util.tree_flatten_with_path(g)[0]
  return np.concatenate(
    [np.full(x.size, "batch_stats" in jax.tree_util.keystr(p) and "var" in str(p[-1])) for p, x in paths]
  )


def groups(g, scope):
  """Per coordinate of ``flat(g)``: 0 for the ``params`` collection (or every leaf), 1 for the other collections."""
  paths = jax.tree_util.tree_flatten_with_path(g)[0]
  top = [p[0].key for p, _ in paths]
  split = scope == "params" and "params" in top
  return np.concatenate([np.full(x.size, int(split and t != "params")) for t, (_, x) in zip(top, paths)])


def reference(g, cp, server, stats, no_trust="keep", server_lr=1.0, scope="params"):
  """FLTrust as the authors' code computes it (without its 1e-9 guards), per collection, in float64 numpy."""
  gf, x, s = flat(g), flat_clients(cp), flat(server)
  grp = groups(g, scope)
  valid = np.all(np.isfinite(x), axis=1) & (np.asarray(stats["num_examples"]) > 0)
  u0 = s - gf
  cos, rescale = np.zeros(len(x)), np.zeros((len(x), grp.max() + 1))
  for i in np.nonzero(valid)[0]:
    u = x[i] - gf
    p, p0 = u[grp == 0], u0[grp == 0]
    n, n0 = np.linalg.norm(p), np.linalg.norm(p0)
    cos[i] = p @ p0 / (n * n0) if n * n0 > 0 else 0.0
    for k in range(grp.max() + 1):
      nk = np.linalg.norm(u[grp == k])
      rescale[i, k] = np.linalg.norm(u0[grp == k]) / nk if nk > 0 else 0.0
  trust = np.maximum(cos, 0.0)
  w = trust / trust.sum() if trust.sum() > 0 else np.zeros_like(trust)
  agg = np.zeros_like(gf)
  for i in np.nonzero(w)[0]:
    agg += w[i] * rescale[i, grp] * (x[i] - gf)
  if trust.sum() == 0 and no_trust == "server":
    agg = u0
  if not valid.any() or not np.all(np.isfinite(s)):
    return gf, w, trust, cos, rescale[:, 0]
  out = gf + server_lr * agg
  return np.where(var_mask(g), np.maximum(out, 0.0), out), w, trust, cos, rescale[:, 0]


def updates(rng, c, d):
  """Client updates around a shared direction, a third of them flipped, varied norms; and a server update."""
  direction = rng.normal(size=d)
  u = 0.3 * rng.normal(size=(c, d)) + rng.permutation(np.geomspace(0.1, 5.0, c))[:, None] * direction
  u[: c // 3] = -u[: c // 3]
  return u, direction + 0.5 * rng.normal(size=d)


@pytest.mark.parametrize("c", [1, 2, 5, 8])
@pytest.mark.parametrize(
  "no_trust,server_lr,scope", [("keep", 1.0, "params"), ("server", 0.5, "params"), ("keep", 1.0, "all")]
)
def test_matches_numpy_reference(c, no_trust, server_lr, scope):
  for seed in range(4):
    rng = np.random.default_rng(seed)
    g = make_global(rng)
    d = flat(g).size
    u, u0 = updates(rng, c, d)
    cp, server, stats = from_updates(g, 0.1 * u), server_from_update(g, 0.1 * u0), counts(rng, c)
    out, state, diag = run(g, cp, server, stats, no_trust=no_trust, server_lr=server_lr, scope=scope)
    expect, w, trust, cos, rescale = reference(g, cp, server, stats, no_trust, server_lr, scope)
    np.testing.assert_allclose(flat(out), expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(diag["weights"], w, atol=1e-6)
    np.testing.assert_allclose(diag["trust_score"], trust, atol=1e-6)
    np.testing.assert_allclose(diag["server_cosine"], cos, atol=1e-6)
    np.testing.assert_allclose(diag["rescale"], rescale, rtol=1e-5)
    np.testing.assert_array_equal(diag["flagged"], trust <= 0)
    np.testing.assert_allclose(
      float(diag["server_update_norm"]), np.linalg.norm((0.1 * u0)[groups(g, scope) == 0]), rtol=1e-5
    )
    assert bool(diag["no_trust"]) == (trust.sum() == 0) and bool(diag["server_finite"])
    assert not np.any(diag["nonfinite"]) and state == fltrust().init(g)
    if trust.sum() > 0:
      assert abs(float(np.sum(diag["weights"])) - 1) < 1e-5


def test_random_inputs_cover_trusted_distrusted_and_rescaled_clients():
  """The reference test above sees clients with trust 0 and rescale factors far from 1 (not a vacuous check)."""
  rng = np.random.default_rng(0)
  g = make_global(rng)
  u, u0 = updates(rng, 8, flat(g).size)
  _, w, trust, _, rescale = reference(g, from_updates(g, u), server_from_update(g, u0), counts(rng, 8), scope="all")
  assert (trust == 0).sum() >= 2 and (trust > 0).sum() >= 4
  assert rescale.min() < 0.5 and rescale.max() > 2


def hand_case(client_updates, server_update, **kwargs):
  g = {"w": np.zeros(2, np.float32)}
  cp = {"w": np.asarray(client_updates, np.float32)}
  server = {"w": np.asarray(server_update, np.float32)}
  stats = {"num_examples": np.ones(len(client_updates), np.float32)}
  return run(g, cp, server, stats, **kwargs)


def test_hand_case_opposite_client_gets_zero_and_scaled_client_is_rescaled():
  # Server update (1, 0). A: (3, 0), same direction, 3x the norm; B: (-1, 0), opposite; C: (0, 2), orthogonal;
  # D: (1, 1) at 45 degrees; E: A scaled up 1e6.
  out, _, diag = hand_case([[3, 0], [-1, 0], [0, 2], [1, 1], [3e6, 0]], [1, 0])
  c45 = 1 / np.sqrt(2)
  trust = np.asarray([1, 0, 0, c45, 1])
  np.testing.assert_allclose(diag["trust_score"], trust, atol=1e-6)
  np.testing.assert_allclose(diag["server_cosine"], [1, -1, 0, c45, 1], atol=1e-6)
  np.testing.assert_array_equal(diag["flagged"], [False, True, True, False, False])
  np.testing.assert_allclose(diag["rescale"], [1 / 3, 1, 0.5, c45, 1 / 3e6], rtol=1e-6)
  w = trust / trust.sum()
  np.testing.assert_allclose(diag["weights"], w, atol=1e-6)
  # Every trusted update arrives at the server's norm: A and E both as (1, 0), D as (c45, c45).
  expect = (w[0] + w[4]) * np.asarray([1.0, 0.0]) + w[3] * np.asarray([c45, c45]) * c45 * np.sqrt(2)
  np.testing.assert_allclose(out["w"], expect, rtol=1e-6)
  # The scaled-up client counts exactly as its unscaled twin.
  out_twin, _, diag_twin = hand_case([[3, 0], [-1, 0], [0, 2], [1, 1], [3, 0]], [1, 0])
  np.testing.assert_allclose(out_twin["w"], out["w"], rtol=1e-6)
  np.testing.assert_allclose(diag_twin["weights"], diag["weights"], atol=1e-7)


def test_one_trusted_client_moves_the_model_by_the_server_norm_along_its_own_direction():
  out, _, diag = hand_case([[0, 10], [-3, -4]], [2, 2])
  np.testing.assert_allclose(diag["weights"], [1, 0], atol=1e-7)
  np.testing.assert_allclose(out["w"], [0, np.sqrt(8)], rtol=1e-6)


@pytest.mark.parametrize("no_trust,expect", [("keep", [0.0, 0.0]), ("server", [0.5, 0.0])])
def test_no_trusted_client_keeps_the_model_or_applies_the_server_update(no_trust, expect):
  """Every update at 90 degrees or more from the server's: the authors' code leaves the model unchanged."""
  out, _, diag = hand_case([[-1, 0], [0, 3], [-2, 1]], [0.5, 0], no_trust=no_trust)
  np.testing.assert_allclose(out["w"], expect, atol=1e-7)
  assert bool(diag["no_trust"]) and float(np.sum(diag["weights"])) == 0 and np.all(diag["flagged"])
  # A zero server update (the root set did not move the model) trusts nobody either.
  out, _, diag = hand_case([[1, 0], [0, 1]], [0, 0], no_trust=no_trust)
  np.testing.assert_array_equal(out["w"], [0, 0])
  assert bool(diag["no_trust"]) and float(diag["server_update_norm"]) == 0


def test_zero_update_client_gets_no_trust_and_no_nan():
  out, _, diag = hand_case([[0, 0], [2, 0]], [1, 0])
  np.testing.assert_allclose(diag["weights"], [0, 1])
  np.testing.assert_allclose(out["w"], [1, 0])
  assert np.all(np.isfinite(diag["rescale"])) and float(diag["rescale"][0]) == 0


def test_running_variances_stay_non_negative():
  g = {"batch_stats": {"var": np.asarray([1.0, 1.0], np.float32)}, "params": {"w": np.zeros(2, np.float32)}}
  cp = {"batch_stats": {"var": np.asarray([[0.9, 1.0]], np.float32)}, "params": {"w": np.zeros((1, 2), np.float32)}}
  server = {"batch_stats": {"var": np.asarray([-9.0, 1.0], np.float32)}, "params": {"w": np.zeros(2, np.float32)}}
  stats = {"num_examples": np.ones(1, np.float32)}
  out, _, _ = run(g, cp, server, stats, scope="all")  # Update rescaled x100: var 1 - 10.
  np.testing.assert_array_equal(out["batch_stats"]["var"], [0.0, 1.0])


def test_each_collection_is_rescaled_to_the_server_norm_in_it():
  """scope='params': trust from the parameters; a client's BatchNorm statistics scaled up 1e6 arrive at the
  server's norm in batch_stats, whatever its parameters' norm."""
  g = {"batch_stats": {"mean": np.zeros(2, np.float32)}, "params": {"w": np.zeros(2, np.float32)}}
  cp = {
    "batch_stats": {"mean": np.asarray([[0, 2e6], [0, 0.4]], np.float32)},
    "params": {"w": np.asarray([[4, 0], [-1, 0]], np.float32)},
  }
  server = {
    "batch_stats": {"mean": np.asarray([0.1, 0.2], np.float32)},
    "params": {"w": np.asarray([2, 0], np.float32)},
  }
  out, _, diag = run(g, cp, server, {"num_examples": np.ones(2, np.float32)})
  np.testing.assert_allclose(diag["weights"], [1, 0])
  np.testing.assert_allclose(diag["rescale"], [0.5, 2], rtol=1e-6)
  np.testing.assert_allclose(out["params"]["w"], [2, 0], rtol=1e-6)
  np.testing.assert_allclose(out["batch_stats"]["mean"], [0, np.hypot(0.1, 0.2)], rtol=1e-5)
  # Over all leaves the statistics dominate: client 0's cosine is its statistics' (~0.1), not its parameters' (1).
  _, _, diag = run(g, cp, server, {"num_examples": np.ones(2, np.float32)}, scope="all")
  assert float(diag["server_cosine"][0]) == pytest.approx(0.2 / np.hypot(2, np.hypot(0.1, 0.2)), rel=1e-3)


def test_nan_and_inf_uploads_are_excluded_and_never_reach_the_output():
  c = 7
  rng = np.random.default_rng(50)
  g = make_global(rng)
  u, u0 = updates(rng, c, flat(g).size)
  cp, server, stats = from_updates(g, 0.1 * u), server_from_update(g, 0.1 * u0), counts(rng, c)
  bad = jax.tree.map(np.copy, cp)
  bad["params"]["w"][1, 0, 0] = np.nan
  bad["params"]["b"][4, 2] = np.inf
  out, _, diag = run(g, bad, server, stats)
  # The same round with those two clients replaced by finite values and no examples.
  other = jax.tree.map(np.copy, cp)
  for i in (1, 4):
    for x in jax.tree.leaves(other):
      x[i] = 1e3
  stats0 = {"num_examples": np.where(np.isin(np.arange(c), [1, 4]), 0.0, stats["num_examples"]).astype(np.float32)}
  out0, _, diag0 = run(g, other, server, stats0)
  assert np.all(np.isfinite(flat(out)))
  np.testing.assert_allclose(flat(out), flat(out0), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(flat(out), reference(g, bad, server, stats)[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(diag["nonfinite"], np.isin(np.arange(c), [1, 4]))
  np.testing.assert_allclose(diag["weights"], diag0["weights"], atol=1e-7)
  assert np.all(np.asarray(diag["weights"])[[1, 4]] == 0) and not np.any(np.asarray(diag["flagged"])[[1, 4]])
  for k in ("trust_score", "server_cosine", "rescale"):
    assert np.all(np.isfinite(diag[k])) and np.all(np.asarray(diag[k])[[1, 4]] == 0), k


@pytest.mark.parametrize("no_trust", ["keep", "server"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_server_model_keeps_the_global_model(no_trust, value):
  rng = np.random.default_rng(3)
  g = make_global(rng)
  u, u0 = updates(rng, 4, flat(g).size)
  server = jax.tree.map(np.copy, server_from_update(g, u0))
  server["params"]["b"][0] = value
  out, _, diag = run(g, from_updates(g, u), server, counts(rng, 4), no_trust=no_trust)
  np.testing.assert_array_equal(flat(out), flat(g))
  assert not bool(diag["server_finite"]) and float(np.sum(diag["weights"])) == 0
  assert all(np.all(np.isfinite(np.asarray(v))) for v in diag.values())


def test_all_clients_invalid_keeps_global_even_with_the_server_fallback():
  rng = np.random.default_rng(60)
  g = make_global(rng)
  server = server_from_update(g, rng.normal(size=flat(g).size))
  cp = jax.tree.map(lambda x: np.full((5,) + x.shape, np.nan, np.float32), g)
  for no_trust in ("keep", "server"):
    out, _, diag = run(g, cp, server, counts(rng, 5), no_trust=no_trust)
    np.testing.assert_array_equal(flat(out), flat(g))
    assert float(jnp.sum(diag["weights"])) == 0 and not np.any(diag["flagged"]) and np.all(diag["nonfinite"])


def test_without_the_server_model_says_what_is_missing():
  agg = fltrust()
  g = {"w": np.zeros(2, np.float32)}
  with pytest.raises(ValueError, match=r"client_stats has no 'server_model'.*aggregation.name='fltrust'"):
    agg.aggregate(agg.init(g), g, {"w": np.ones((3, 2), np.float32)}, {"num_examples": np.ones(3)}, jax.random.key(0))


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"root_size": 0}, r"aggregation.kwargs.root_size=0: must be an integer >= 1"),
    ({"root_size": 2.5}, r"aggregation.kwargs.root_size=2.5"),
    ({"root_size": True}, r"aggregation.kwargs.root_size=True"),
    ({"no_trust": "global"}, r"aggregation.kwargs.no_trust='global': accepted values are \['keep', 'server'\]"),
    ({"server_lr": 0.0}, r"aggregation.kwargs.server_lr=0.0: must be a finite number > 0"),
    ({"server_lr": float("nan")}, r"aggregation.kwargs.server_lr=nan"),
    ({"scope": "batch_stats"}, r"aggregation.kwargs.scope='batch_stats': accepted values are \['params', 'all'\]"),
  ],
)
def test_bad_kwargs_name_the_field(kwargs, match):
  with pytest.raises(ValueError, match=match):
    fltrust(**kwargs)


def test_default_root_size_is_the_config_default():
  assert DEFAULT_ROOT_SIZE == config_lib.FLTRUST_ROOT_SIZE
  assert assemble.root_size(tiny_config(**{"aggregation.name": "fltrust"})) == DEFAULT_ROOT_SIZE
  assert assemble.root_size(tiny_config(**{"aggregation.name": "fltrust", "aggregation.kwargs.root_size": 5})) == 5
  assert assemble.root_size(tiny_config(**{"aggregation.kwargs.root_size": 5})) == 0  # Not fltrust: no root set.


@pytest.mark.parametrize(
  "overrides,match",
  [
    ({"aggregation.kwargs.root_size": 0}, r"config.aggregation.kwargs.root_size=0 is invalid: must be an integer >= 1"),
    ({"aggregation.kwargs.root_size": "8"}, r"config.aggregation.kwargs.root_size='8' is invalid"),
    (
      {"aggregation.kwargs.root_size": 65},
      r"config.aggregation.kwargs.root_size=65 is invalid: .*data.heldout=64 images: accepted 1..64",
    ),
    ({"data.heldout": 16}, r"config.aggregation.kwargs.root_size=32 is invalid: .*accepted 1..16"),
  ],
)
def test_config_errors_name_the_field_the_value_and_what_is_accepted(overrides, match):
  with pytest.raises(ValueError, match=match):
    tiny_config(**{"aggregation.name": "fltrust", **overrides})


def test_no_held_out_images_is_an_error_before_anything_compiles():
  config = tiny_config(**{"aggregation.name": "fltrust", "data.heldout": 0})
  with pytest.raises(ValueError, match=r"root_size=32 is invalid: .*held-out split, which has 0 images"):
    assemble.setup_data(config)
  with pytest.raises(ValueError, match=r"root_size=32: the server's root set has 0 images, 32 needed"):
    assemble.round_data(config, np.zeros((2, 8, 32, 32, 3), np.uint8), [8, 8])


@pytest.mark.slow
def test_compiled_round_trains_the_server_on_its_root_set_and_aggregates_with_it():
  """Two rounds of configs/test.py with fltrust: the server lane equals an honest client's local training on the
  root set (the first root_size held-out images), its state carries over, and one program serves both rounds."""
  from fedgan_jax.federated import program as program_lib

  config = tiny_config(**{"aggregation.name": "fltrust", "aggregation.kwargs.root_size": 8})
  data, heldout, info = assemble.setup_data(config)
  np.testing.assert_array_equal(np.asarray(data.root), heldout.images[:8])
  assert info["fltrust_root_images"] == 8
  program, _, _ = assemble.build_program(config)
  traces = []

  def counted(state, data, key):
    traces.append(1)
    return program.round(state, data, key)

  round_jit = jax.jit(counted)
  state0 = program.init(jax.random.key(0))
  server0, rule0 = state0.g_agg
  key = jax.random.key(1)
  state1, m1 = round_jit(state0, data, key)
  state2, m2 = round_jit(state1, data, jax.random.key(2))
  jax.block_until_ready(state2)
  assert len(traces) == 1 and int(state2.round) == 2

  # The server lane: one client's local training on the root set, never poisoned.
  _, server_g, _, stats = jax.jit(program.local_train)(
    server0,
    state0.g_global,
    state0.d_global,
    data.root,
    jnp.int32(8),
    jnp.bool_(False),
    jnp.zeros((8,), bool),
    data.trigger,
    data.trigger_loc,
    jax.random.fold_in(key, program_lib.SERVER_STREAM),
  )
  u0 = {k: flat(server_g[k]) - flat(state0.g_global[k]) for k in ("params", "batch_stats")}
  np.testing.assert_allclose(float(m1["agg/server_update_norm"]), np.linalg.norm(u0["params"]), rtol=1e-4)
  np.testing.assert_allclose(float(m1["agg/server_g_loss"]), float(stats["g_loss"]), rtol=1e-4)
  np.testing.assert_allclose(float(m1["agg/server_d_loss"]), float(stats["d_loss"]), rtol=1e-4)

  # Its discriminator and optimizer states carry over in g_agg; the rule's own state is empty.
  server1, rule1 = state1.g_agg
  assert rule1 == rule0
  assert not np.allclose(flat(server1.d_vars["params"]), flat(server0.d_vars["params"]))
  for m in (m1, m2):
    w = np.asarray(m["agg/weights"])
    assert w.shape == (2,) and np.all(w >= 0)
    assert abs(w.sum() - 1) < 1e-5 or (bool(m["agg/no_trust"]) and w.sum() == 0)
    np.testing.assert_allclose(w, np.asarray(m["agg/trust_score"]) / max(np.sum(m["agg/trust_score"]), 1e-30))
    assert bool(m["train/global_finite"]) and bool(m["agg/server_finite"])
  # Every trusted update arrives at the server's norm in each collection: the global model moved by at most that.
  for k in ("params", "batch_stats"):
    moved = np.linalg.norm(flat(state1.g_global[k]) - flat(state0.g_global[k]))
    assert moved <= np.linalg.norm(u0[k]) * (1 + 1e-4), k
