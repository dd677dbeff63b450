"""Clients sampled per round (config.clients_per_round): the draw, gather/scatter, metrics by client id,
detection over the sampled clients, DP accounting with q = m / C, and the round itself."""

from __future__ import annotations

import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fedgan_jax import assemble, experiment, privacy, run_console
from fedgan_jax.federated import replicas, sampling, sharding
from fedgan_jax.federated.state import CLIENT_DATA_FIELDS
from fedgan_jax.metrics import detection

# --------------------------------------------------------------------------- the draw


def test_sampled_clients_are_the_documented_draw():
  key = jax.random.key(11)
  got = np.asarray(sampling.sampled_clients(key, 10, 4))
  perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, sampling.SAMPLE_STREAM), 10))
  np.testing.assert_array_equal(got, np.sort(perm[:4]))
  assert got.dtype == np.int32 and len(set(got.tolist())) == 4 and np.all(np.diff(got) > 0)
  # Reproducible from the key alone (a resumed run draws the same clients), different for another round.
  np.testing.assert_array_equal(np.asarray(sampling.sampled_clients(jax.random.key(11), 10, 4)), got)
  draws = {tuple(np.asarray(sampling.sampled_clients(jax.random.fold_in(key, r), 10, 4))) for r in range(20)}
  assert len(draws) > 15
  np.testing.assert_array_equal(np.asarray(sampling.sampled_clients(key, 5, 5)), np.arange(5))


def test_every_client_is_drawn_with_probability_m_over_c():
  keys = jax.random.split(jax.random.key(0), 4000)
  drawn = jax.vmap(lambda k: sampling.sampled_clients(k, 10, 3))(keys)
  freq = np.bincount(np.asarray(drawn).ravel(), minlength=10) / 4000
  np.testing.assert_allclose(freq, 0.3, atol=0.03)  # Binomial std ~0.007 per client.
  # Pairs are uniform too (each of the 45 pairs in 3 * 2 / (10 * 9) of the draws): no fixed blocks.
  pairs = np.zeros((10, 10))
  for row in np.asarray(drawn):
    pairs[np.ix_(row, row)] += 1
  off = pairs[~np.eye(10, dtype=bool)] / 4000
  np.testing.assert_allclose(off, 6 / 90, atol=0.025)


@pytest.mark.parametrize("m,expected", [(0, None), (None, None), (6, None), (2, 2), (5, 5)])
def test_clients_per_round_resolves(m, expected):
  config = tiny_config(num_clients=6)
  config.clients_per_round = m
  assert sampling.clients_per_round(config) == expected


@pytest.mark.parametrize("m", [-1, 7])
def test_bad_clients_per_round_is_named(m):
  with pytest.raises(
    ValueError, match=rf"config.clients_per_round={m} is invalid: must be an integer in 0..num_clients=6"
  ):
    tiny_config(num_clients=6, clients_per_round=m)
  with pytest.raises(ValueError, match=r"config.clients_per_round=2.5: wrong type"):
    tiny_config(num_clients=6, clients_per_round=2.5)


def test_rule_requirements_are_checked_on_the_sampled_clients():
  """Krum with f = 1 needs more than 4 uploads a round: 6 clients are enough, 4 of them a round are not."""
  ok = tiny_config(num_clients=6, **{"aggregation.name": "krum", "aggregation.kwargs.f": 1})
  assemble.build_program(ok)
  bad = tiny_config(num_clients=6, clients_per_round=4, **{"aggregation.name": "krum", "aggregation.kwargs.f": 1})
  with pytest.raises(ValueError, match=r"config.clients_per_round=4: aggregation.name='krum' aggregates the 4"):
    assemble.build_program(bad)


def test_sharded_sampling_needs_m_divisible_by_the_devices():
  sharding.check_clients_per_round(None, 8)
  sharding.check_clients_per_round(16, 8)
  sharding.check_clients_per_round(3, 1)
  with pytest.raises(ValueError, match=r"config.clients_per_round=10 is invalid on 8 devices: .* multiple of 8"):
    sharding.check_clients_per_round(10, 8)


# --------------------------------------------------------------------------- gather / scatter


def test_gather_and_scatter_clients():
  tree = {"a": jnp.arange(12.0).reshape(4, 3), "b": jnp.arange(4)}
  idx = jnp.array([1, 3])
  sub = sampling.gather_clients(tree, idx)
  np.testing.assert_array_equal(sub["a"], [[3, 4, 5], [9, 10, 11]])
  new = sampling.scatter_clients(tree, idx, {"a": -sub["a"], "b": jnp.array([7, 8])})
  np.testing.assert_array_equal(new["a"], [[0, 1, 2], [-3, -4, -5], [6, 7, 8], [-9, -10, -11]])
  np.testing.assert_array_equal(new["b"], [0, 7, 2, 8])


def test_gather_data_takes_the_client_fields_only(tiny_program):
  _, _, _, data, _ = tiny_program
  idx = jnp.array([0, 2])
  sub = sampling.gather_data(data, idx)
  for f in data._fields:
    x, y = getattr(data, f), getattr(sub, f)
    if f in CLIENT_DATA_FIELDS and x is None:  # An optional field that is off (labels of an unconditional run).
      assert y is None
    elif f in CLIENT_DATA_FIELDS:
      np.testing.assert_array_equal(np.asarray(y), np.asarray(x)[[0, 2]])
    else:
      assert jax.tree.structure(x) == jax.tree.structure(y)
      for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
        assert a is b


def test_scatter_metrics_fills_the_clients_not_sampled():
  idx = jnp.array([0, 3])
  out = sampling.scatter_metrics(
    {
      "train/g_loss": jnp.array([1.5, 2.5]),
      "agg/flagged": jnp.array([True, True]),
      "agg/times_flagged": jnp.array([2, 5], jnp.int32),
      "agg/decay_active": jnp.asarray(True),
      "train/global_finite": jnp.asarray(True),
    },
    idx,
    5,
  )
  np.testing.assert_array_equal(out["train/g_loss"], [1.5, np.nan, np.nan, 2.5, np.nan])
  np.testing.assert_array_equal(out["agg/flagged"], [True, False, False, True, False])
  np.testing.assert_array_equal(out["agg/times_flagged"], [2, -1, -1, 5, -1])
  assert out["agg/decay_active"].shape == () and bool(out["train/global_finite"])
  np.testing.assert_array_equal(out["agg/sampled"], [True, False, False, True, False])


# --------------------------------------------------------------------------- detection and DP


def test_detection_rates_count_the_sampled_clients_only():
  mal = [True, True, False, False, False]
  flagged = [True, False, False, True, False]
  assert detection.detection_rates(flagged, mal) == (0.5, 1 / 3)
  sampled = [True, False, True, True, False]  # Attacker 1 and honest client 4 sat the round out.
  assert detection.detection_rates(flagged, mal, sampled) == (1.0, 0.5)
  tpr, fpr = detection.detection_rates(flagged, mal, [False, False, True, True, True])  # No attacker drawn.
  assert np.isnan(tpr) and fpr == 1 / 3
  records = [{"round": 2, "agg/flagged": flagged, "agg/sampled": sampled, "agg/weights": [0.5, None, 0.25, 0.25, None]}]
  out = detection.after_warmup(records, mal, 0)
  assert out["tpr_flagged"] == 1.0 and out["fpr_flagged"] == 0.5


def _dp_records(sampled_rows):
  return [
    {"round": r, "agg/noise_multiplier": 1.0, **({"agg/sampled": s} if s is not None else {})}
    for r, s in enumerate(sampled_rows, start=1)
  ]


def test_dp_accounting_uses_m_over_c():
  config = tiny_config(
    num_clients=10,
    clients_per_round=2,
    **{
      "aggregation.name": "dp_mean",
      "aggregation.kwargs.clip_norm": 0.1,
      "aggregation.kwargs.noise_multiplier": 1.0,
      "data.num_images": 160,
    },
  )
  row = [True, True] + [False] * 8
  block = privacy.summary_block(config, _dp_records([row] * 5))
  assert block["sampling_prob"] == pytest.approx(0.2) and "note" not in block
  assert block["epsilon"] == pytest.approx(privacy.client_level_epsilon(1.0, 5, 1e-5, sampling_prob=0.2))
  assert block["epsilon"] < privacy.client_level_epsilon(1.0, 5, 1e-5)
  assert "exactly 2 of the 10 clients" in block["sampling"] and "not a proven bound" in block["sampling"]
  assert "clients sampled with q = 0.2 a round" in privacy.guarantee_text(block)
  # A run resumed from rounds without sampling: every round accounted with q = 1 (an upper bound), and said.
  mixed = privacy.summary_block(config, _dp_records([None, row, row]))
  assert "sampling_prob" not in mixed and "q = 1" in mixed["note"]
  assert mixed["epsilon"] == pytest.approx(privacy.client_level_epsilon(1.0, 3, 1e-5))
  assert privacy.summary_block(config, [])["epsilon"] == 0.0


# --------------------------------------------------------------------------- the round


@pytest.fixture(scope="module")
def sampled_round(tiny_program):
  """The tiny program's round with the clients given (jitted once per m)."""
  _, program, _, _, _ = tiny_program
  return jax.jit(lambda s, d, k, c: program.round_with(s, d, k, clients=c))


def _equal_trees(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_all_clients_through_the_sampled_path_equal_the_round(tiny_program, sampled_round):
  """m = C: gathering every client and scattering back is the round without sampling, to the bit."""
  _, program, round_jit, data, _ = tiny_program
  state, key = program.init(jax.random.key(0)), jax.random.key(5)
  ref_state, ref = round_jit(state, data, key)
  new_state, got = sampled_round(state, data, key, jnp.arange(3, dtype=jnp.int32))
  _equal_trees(new_state, ref_state)
  assert np.asarray(got.pop("agg/sampled")).all()
  _equal_trees(got, ref)


@pytest.mark.slow
def test_clients_not_sampled_keep_their_state(tiny_program, sampled_round):
  """m = 2 of 3: client 1 sits the round out; clients 0 and 2 train exactly as in a round of all clients."""
  _, program, round_jit, data, _ = tiny_program
  state, key = program.init(jax.random.key(0)), jax.random.key(5)
  # Different starting states per client, so a row written into the wrong slot shows.
  state = state._replace(
    clients=jax.tree.map(lambda x: x + jnp.arange(3, dtype=x.dtype).reshape((3,) + (1,) * (x.ndim - 1)), state.clients)
  )
  full_state, full = round_jit(state, data, key)
  new_state, m = sampled_round(state, data, key, jnp.array([0, 2], jnp.int32))
  for before, after, trained in zip(
    jax.tree.leaves(state.clients), jax.tree.leaves(new_state.clients), jax.tree.leaves(full_state.clients)
  ):
    np.testing.assert_array_equal(np.asarray(after)[1], np.asarray(before)[1])
    np.testing.assert_allclose(np.asarray(after)[[0, 2]], np.asarray(trained)[[0, 2]], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(m["agg/sampled"], [True, False, True])
  g = np.asarray(m["train/g_loss"])
  assert np.isnan(g[1]) and np.allclose(g[[0, 2]], np.asarray(full["train/g_loss"])[[0, 2]], rtol=1e-5)
  counts = np.asarray(data.counts, np.float64)[[0, 2]]
  np.testing.assert_allclose(np.asarray(m["agg/weights"])[[0, 2]], counts / counts.sum(), rtol=1e-6)
  assert np.isnan(np.asarray(m["agg/weights"])[1]) and not bool(np.asarray(m["agg/flagged"])[1])
  assert int(new_state.round) == 1
  assert not np.allclose(
    np.asarray(new_state.g_global["params"]["out"]["kernel"]),
    np.asarray(full_state.g_global["params"]["out"]["kernel"]),
  )


@pytest.mark.slow
def test_end_to_end_run_with_sampled_clients(tmp_path):
  """6 clients, 3 a round, FoolsGold (per-client history) and a malicious client, two rounds end to end."""
  config = tiny_config(
    num_clients=6,
    clients_per_round=3,
    **{"data.num_images": 96, "aggregation.name": "foolsgold", "eval.num_samples": 32},
  )
  summary = experiment.run(config, str(tmp_path))
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["round"] for r in records] == [1, 2] and summary["rounds"] == 2
  for r in records:
    sampled = np.asarray(r["agg/sampled"], bool)
    assert sampled.shape == (6,) and sampled.sum() == 3
    g = np.array(r["train/g_loss"], dtype=float)  # None (NaN) for the clients not sampled.
    assert np.all(np.isfinite(g[sampled])) and np.all(np.isnan(g[~sampled]))
    w = np.array(r["agg/weights"], dtype=float)
    assert abs(w[sampled].sum() - 1) < 1e-5 and np.all(np.isnan(w[~sampled]))
    # Detection over the round's sampled clients (NaN, written as null, when no attacker was drawn).
    tpr, fpr = detection.detection_rates(r["agg/flagged"], assemble.malicious_mask(config), sampled)
    assert r["eval/detect_tpr"] == (None if np.isnan(tpr) else tpr) and r["eval/detect_fpr"] == fpr
  # Every round's draw is the documented one from the run's round keys.
  _, k_rounds, _ = replicas.run_keys(config.seed)
  for r in records:
    idx = np.asarray(sampling.sampled_clients(jax.random.fold_in(k_rounds, r["round"]), 6, 3))
    np.testing.assert_array_equal(np.flatnonzero(r["agg/sampled"]), idx)


def test_console_header_says_how_many_clients_a_round():
  out = io.StringIO()
  run_console.Console(out=out).header(tiny_config(num_clients=6, clients_per_round=2), "/tmp/w", jax.devices(), 0)
  assert "clients: 6 (malicious: [0]), 2 a round" in out.getvalue()
  out = io.StringIO()
  run_console.Console(out=out).header(tiny_config(num_clients=6), "/tmp/w", jax.devices(), 0)
  assert "clients: 6 (malicious: [0])  aggregation" in out.getvalue()
