"""The vmapped round: equality with sequential clients, single compile, attack masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedgan_jax import assemble
from fedgan_jax.aggregation.base import masked_median
from fedgan_jax.data import triggers
from fedgan_jax.federated import program as program_lib
from fedgan_jax.federated import server as server_lib


def _tree_allclose(a, b, rtol=1e-4, atol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_vmapped_round_equals_clients_one_after_another(tiny_program):
  config, program, round_jit, data, _ = tiny_program
  state = program.init(jax.random.key(0))
  key = jax.random.key(7)
  new_state, metrics = round_jit(state, data, key)

  # The same round written sequentially: a Python loop over clients (test only).
  k_local, k_gagg, _ = jax.random.split(key, 3)
  client_keys = jax.random.split(k_local, config.num_clients)
  local = jax.jit(program.local_train)
  outs = []
  for c in range(config.num_clients):
    client_c = jax.tree.map(lambda x: x[c], state.clients)
    outs.append(
      local(
        client_c,
        state.g_global,
        state.d_global,
        data.images[c],
        data.counts[c],
        data.is_malicious[c],
        data.poison_flags[c],
        data.trigger,
        data.trigger_loc,
        client_keys[c],
      )
    )
  stack = lambda i: jax.tree.map(lambda *xs: jnp.stack(xs), *[o[i] for o in outs])
  clients, client_g, stats = stack(0), stack(1), stack(3)
  counts = np.asarray(data.counts, np.float64)
  expected_g = jax.tree.map(lambda x: np.average(np.asarray(x, np.float64), axis=0, weights=counts), client_g)

  _tree_allclose(new_state.g_global, expected_g)
  _tree_allclose(new_state.clients, clients)
  np.testing.assert_allclose(metrics["train/g_loss"], stats["g_loss"], rtol=1e-4)
  np.testing.assert_allclose(metrics["agg/weights"], counts / counts.sum(), rtol=1e-6)
  assert int(new_state.round) == 1
  # Local training moved the generator and the malicious client trained on other data.
  assert float(jnp.abs(client_g["params"]["out"]["kernel"][0] - client_g["params"]["out"]["kernel"][1]).max()) > 0


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [2, 3])
def test_client_chunks_compute_the_same_local_round(tiny_program, chunk):
  """Chunks of 2 (a vmapped pair, then a remainder of 1) and all 3 clients vmapped at
  once equal clients in turn (``client_chunk`` 1, the tiny program's on CPU)."""
  from conftest import tiny_config

  config, program, _, data, _ = tiny_program
  state = program.init(jax.random.key(5))
  keys = program_lib.client_keys(jax.random.key(6), config.num_clients)
  one = assemble.build_program(tiny_config(num_clients=3, **{"train.client_chunk": 1}))[0]
  other = assemble.build_program(tiny_config(num_clients=3, **{"train.client_chunk": chunk}))[0]
  assert program_lib.client_chunk(tiny_config(num_clients=3, **{"train.client_chunk": chunk}), 3) == chunk
  expected = jax.jit(one.local_round)(state, data, keys)
  got = jax.jit(other.local_round)(state, data, keys)
  _tree_allclose(got, expected)


def test_client_chunk_auto_and_bounds():
  from conftest import tiny_config

  auto = tiny_config(num_clients=3)
  expected = 1 if jax.default_backend() == "cpu" else 3
  assert program_lib.client_chunk(auto, 3) == expected
  assert program_lib.client_chunk(tiny_config(num_clients=3, **{"train.client_chunk": 50}), 3) == 3


def test_round_compiles_once_for_every_attack_setting(tiny_program):
  config, program, round_jit, data, traces = tiny_program
  state = program.init(jax.random.key(1))
  settings = [
    data,
    data._replace(is_malicious=jnp.asarray([False, True, True])),
    data._replace(is_malicious=jnp.zeros(3, bool), trigger=-data.trigger),
    data._replace(poison_flags=jnp.zeros_like(data.poison_flags)),
    # DBA: clients 0 and 1 each paste half of the trigger.
    data._replace(
      is_malicious=jnp.asarray([True, True, False]),
      trigger_part=jnp.asarray(triggers.dba_parts(data.trigger.shape[0], [0, 1], 3)),
    ),
  ]
  for r, d in enumerate(settings):
    state, m = round_jit(state, d, jax.random.fold_in(jax.random.key(2), r))
  jax.block_until_ready(state)
  # One trace for the whole session (whichever test compiled first): never one per round or setting.
  assert len(traces) == 1
  assert int(state.round) == 5
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


def test_round_is_deterministic_given_key(tiny_program):
  _, program, round_jit, data, _ = tiny_program
  s1, m1 = round_jit(program.init(jax.random.key(3)), data, jax.random.key(4))
  s2, m2 = round_jit(program.init(jax.random.key(3)), data, jax.random.key(4))
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mimic_reports_honest_median(tiny_program):
  """A defense-aware attacker reports the median loss of honest clients."""
  v = jnp.asarray([5.0, 1.0, 2.0, 4.0])
  honest = jnp.asarray([False, True, True, True])
  assert float(masked_median(v, honest)[0]) == 2.0
  assert float(masked_median(v, jnp.asarray([False, True, True, False]))[0]) == 1.5


def test_server_stats_update_norm():
  g = {"params": {"w": jnp.zeros((2,))}}
  c = {"params": {"w": jnp.asarray([[3.0, 4.0], [0.0, 0.0]])}}
  stats = server_lib.server_stats(g, c)
  np.testing.assert_allclose(stats["update_norm"], [5.0, 0.0])
  np.testing.assert_allclose(stats["dist_to_median"], [2.5, 2.5])  # Median of two = their midpoint.


@pytest.mark.slow
def test_average_discriminator_averages_and_broadcasts_d():
  from conftest import tiny_config

  config = tiny_config(**{"aggregation.average_discriminator": True, "model.d_norm": "none"})
  program, _, _ = assemble.build_program(config)
  C, n, R = 2, 8, config.resolution
  data = assemble.round_data(config, np.random.default_rng(0).integers(0, 256, (C, n, R, R, 3), dtype=np.uint8), [8, 4])
  state = program.init(jax.random.key(0))
  new, m = jax.jit(program.round)(state, data, jax.random.key(1))
  client_d = new.clients.d_vars["params"]
  expected = jax.tree.map(lambda x: np.average(np.asarray(x), axis=0, weights=[8, 4]), client_d)
  _tree_allclose(new.d_global["params"], expected)
  assert not np.allclose(new.d_global["params"]["logit"]["kernel"], state.d_global["params"]["logit"]["kernel"])
  np.testing.assert_allclose(m["agg_d/weights"], [2 / 3, 1 / 3], rtol=1e-6)


def _gp_config(impl: str, **extra):
  from conftest import tiny_config

  return tiny_config(
    num_clients=2,
    **{"model.conv_impl": impl, "train.regularizers.gradient_penalty": 10.0, "model.d_norm": "instance", **extra},
  )


def test_lowered_gemm_round_holds_no_grouped_and_no_lhs_dilated_conv(tiny_program):
  """The whole round (all clients vmapped, WGAN-GP's double backward included) lowered with
  conv_impl='gemm' is convolution-free; the stock lowering of the same round is not (grouped
  and lhs-dilated convs), which is what the check would catch."""
  from fedgan_jax import flops

  _, _, _, data, _ = tiny_program
  data = jax.tree.map(lambda x: x[:2] if x.ndim and x.shape[0] == 3 else x, data)
  counts = {}
  for impl in ("gemm", "xla"):
    program, _, _ = assemble.build_program(_gp_config(impl, **{"train.client_chunk": 2}))
    lowered = jax.jit(program.round).lower(program.init(jax.random.key(0)), data, jax.random.key(1))
    counts[impl] = flops.hlo_op_counts(lowered)
  assert counts["gemm"]["convolution"] == 0 and counts["gemm"]["dot_general"] > 20
  assert counts["xla"]["grouped_convolution"] > 0 and counts["xla"]["lhs_dilated_convolution"] > 0


@pytest.mark.slow
def test_gemm_round_equals_xla_round(tiny_program):
  """One full round (2 clients vmapped, 2 local steps, WGAN-GP) with the gemm lowering equals
  the stock-conv round to float tolerance: parameters, optimizer states and losses."""
  _, _, _, data, _ = tiny_program
  data = jax.tree.map(lambda x: x[:2] if x.ndim and x.shape[0] == 3 else x, data)
  out = {}
  for impl in ("gemm", "xla"):
    program, _, _ = assemble.build_program(_gp_config(impl, **{"train.client_chunk": 2}))
    out[impl] = jax.jit(program.round)(program.init(jax.random.key(0)), data, jax.random.key(1))
  (s_gemm, m_gemm), (s_xla, m_xla) = out["gemm"], out["xla"]
  _tree_allclose(s_gemm, s_xla, rtol=1e-3, atol=2e-5)
  for k in ("train/g_loss", "train/d_loss", "train/update_norm"):
    np.testing.assert_allclose(m_gemm[k], m_xla[k], rtol=1e-4, err_msg=k)
