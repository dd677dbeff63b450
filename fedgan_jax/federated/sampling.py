"""Clients sampled per round: m of the C clients train and upload, the rest sit the round out.

``config.clients_per_round = m`` (0, the default, or C: every client, the
round exactly as without sampling). This is the cross-device setting of
FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks
from Decentralized Data", AISTATS 2017: a fraction of the clients per round)
and of the distributed backdoor attack's experiments (Xie et al., "DBA:
Distributed Backdoor Attacks against Federated Learning", ICLR 2020: 100
clients, 10 per round), where an attacker takes part only in the rounds it is
drawn for.

Which clients: ``sampled_clients(key, C, m)`` is the first m entries of
``jax.random.permutation(fold_in(round_key, SAMPLE_STREAM), C)``, sorted: m
distinct clients, uniform over the m-subsets, a pure function of the round's
key (so a resumed run draws the same clients). Each sampled client trains
with the key it would have had in a round of all clients
(``program.client_keys(round_key, C)[clients]``).

How (``sampled_round``, inside the one jitted round): the per-client leaves
of the state (``ClientState``, ``[C, ...]``) and of the data
(``state.CLIENT_DATA_FIELDS``) are gathered to ``[m, ...]``; local training
is vmapped over the m; the clients' reports, the upload attacks (ALIE and IPM
see the sampled honest uploads only) and the server see the m; the
aggregators' per-client state (``Aggregator.client_axes``, see
``aggregation.base``) is gathered for the m before ``aggregate`` and
scattered back after; the new client states are scattered back into their
slots, so a client that was not drawn keeps its state. Shapes stay static (m
is a Python int), so one compiled program serves every round.

Metrics stay indexed by client id: every per-client metric (leading axis m)
is scattered to ``[C]`` with a fill for the clients that sat the round out
(``FILL``: NaN for floats, -1 for integers, False for booleans), and
``agg/sampled: bool[C]`` says who took part. Detection rates are computed
over the sampled clients only (``metrics.detection``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fedgan_jax.aggregation.base import gather_state, scatter_state
from fedgan_jax.federated.state import CLIENT_DATA_FIELDS, LocalOut, RoundData, RoundState

PyTree = Any
SAMPLE_STREAM = 0x5A3  # fold_in(round key, SAMPLE_STREAM): the key that draws the round's clients.
SAMPLED = "agg/sampled"  # The metric: bool[C], True for the clients of the round.


def clients_per_round(config) -> int | None:
  """The m of ``config.clients_per_round``, or None when every client takes part (0, None or C)."""
  m = config.clients_per_round
  if m is None or m == 0 or m == config.num_clients:
    return None
  return int(m)


def sampled_clients(key: jax.Array, num_clients: int, m: int) -> jax.Array:
  """The m clients of the round whose key is ``key``: int32 ``[m]``, distinct, ascending.

  Args:
    key: the round's key (``fold_in(k_rounds, r)``).
    num_clients: C.
    m: clients per round, ``1 <= m <= C`` (a Python int: it sets shapes).

  Returns:
    ``sort(permutation(fold_in(key, SAMPLE_STREAM), C)[:m])``.
  """
  perm = jax.random.permutation(jax.random.fold_in(key, SAMPLE_STREAM), num_clients)
  return jnp.sort(perm[:m]).astype(jnp.int32)


def gather_clients(tree: PyTree, clients: jax.Array) -> PyTree:
  """Rows ``clients`` of every leaf (leaves ``[C, ...]`` -> ``[m, ...]``)."""
  return jax.tree.map(lambda x: x[clients], tree)


def scatter_clients(tree: PyTree, clients: jax.Array, rows: PyTree) -> PyTree:
  """``tree`` with rows ``clients`` of every leaf replaced by ``rows`` (the other rows unchanged)."""
  return jax.tree.map(lambda x, r: jnp.asarray(x).at[clients].set(jnp.asarray(r, x.dtype)), tree, rows)


def gather_data(data: RoundData, clients: jax.Array) -> RoundData:
  """The round data of the sampled clients: ``CLIENT_DATA_FIELDS`` gathered, the rest as is."""
  return data._replace(**{f: gather_clients(getattr(data, f), clients) for f in CLIENT_DATA_FIELDS})


def fill_value(dtype) -> Any:
  """What a per-client metric holds for a client that sat the round out: NaN, -1 or False."""
  if jnp.issubdtype(dtype, jnp.bool_):
    return False
  if jnp.issubdtype(dtype, jnp.integer):
    return -1
  return jnp.nan


def scatter_metrics(metrics: dict, clients: jax.Array, num_clients: int) -> dict:
  """Per-client metrics of the m sampled clients back on the ``[C]`` client axis.

  Every metric whose leading axis has m entries is per-client (the
  contract: the round's metrics and an aggregator's diagnostics are scalars
  or per-client arrays); it becomes ``[C, ...]`` with ``fill_value`` for the
  clients not sampled. Scalars are kept. ``agg/sampled`` is added.

  Args:
    metrics: the round's metrics over the m sampled clients.
    clients: int32 ``[m]``, the sampled clients.
    num_clients: C.

  Returns:
    The metrics indexed by client id.
  """
  m = clients.shape[0]

  def full(x):
    x = jnp.asarray(x)
    if x.ndim == 0 or x.shape[0] != m:
      return x
    return jnp.full((num_clients,) + x.shape[1:], fill_value(x.dtype), x.dtype).at[clients].set(x)

  out = {k: full(v) for k, v in metrics.items()}
  out[SAMPLED] = jnp.zeros((num_clients,), bool).at[clients].set(True)
  return out


def sampled_round(
  state: RoundState,
  data: RoundData,
  key: jax.Array,
  clients: jax.Array,
  *,
  client_keys: jax.Array,
  local_fn: Callable[[RoundState, RoundData, jax.Array], LocalOut],
  finish_fn: Callable[[RoundState, RoundData, LocalOut, jax.Array], tuple[RoundState, dict]],
  agg_axes: tuple[Any, Any],
) -> tuple[RoundState, dict]:
  """One round in which only ``clients`` take part (see the module docstring).

  Args:
    state: the full ``RoundState`` (client leaves ``[C, ...]``).
    data: the full ``RoundData``.
    key: the round's key.
    clients: int32 ``[m]``, distinct client ids (``sampled_clients``).
    client_keys: ``[C]`` local-training keys of every client
      (``program.client_keys``); the sampled ones train with theirs.
    local_fn: ``(state, data, keys) -> LocalOut`` over the clients it is given
      (``Program.local_round``, or its ``shard_map``-ped form).
    finish_fn: ``Program.finish_round``.
    agg_axes: ``client_axes`` of the generator's and the discriminator's
      aggregator states (``RoundState.g_agg``, ``RoundState.d_agg``).

  Returns:
    ``(new_state, metrics)``: the state with the sampled clients' rows
    replaced (every other client's unchanged), metrics indexed by client id.
  """
  g_axes, d_axes = agg_axes
  sub = state._replace(
    clients=gather_clients(state.clients, clients),
    g_agg=gather_state(state.g_agg, g_axes, clients),
    d_agg=gather_state(state.d_agg, d_axes, clients),
  )
  sub_data = gather_data(data, clients)
  local = local_fn(sub, sub_data, client_keys[clients])
  new, metrics = finish_fn(sub, sub_data, local, key)
  new = new._replace(
    clients=scatter_clients(state.clients, clients, new.clients),
    g_agg=scatter_state(state.g_agg, g_axes, clients, new.g_agg),
    d_agg=scatter_state(state.d_agg, d_axes, clients, new.d_agg),
  )
  return new, scatter_metrics(metrics, clients, jax.tree.leaves(state.clients)[0].shape[0])
