"""The server's part of a round: statistics of the uploads, then aggregation.

The server sees only what the clients upload (``Uploads``: parameters and
reported stats); it computes its own statistics from the uploaded parameters
(which an attacker cannot fake) and hands both to the aggregation rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fedgan_jax.aggregation import stats as agg_stats
from fedgan_jax.aggregation.base import Aggregator
from fedgan_jax.aggregation.fltrust import SERVER_MODEL
from fedgan_jax.federated.state import ClientState, RoundState, Uploads

PyTree = Any
SERVER_STATS = ("update_norm", "cosine_to_mean", "dist_to_median")


def server_stats(global_vars: PyTree, client_vars: PyTree) -> dict[str, jax.Array]:
  """Stats the server computes itself from the uploaded parameters (not reported by clients).

  ``update_norm``, ``cosine_to_mean`` and ``dist_to_median`` (each ``[C]``) of
  the ``params`` collection (BatchNorm statistics are not updates).
  """
  return agg_stats.server_stats(global_vars["params"], client_vars["params"])


def server_round(
  g_aggregator: Aggregator,
  d_aggregator: Aggregator,
  average_discriminator: bool,
  weighting: str = "examples",
  rule_for: Callable[[dict | None], Aggregator] | None = None,
) -> Callable:
  """The server step for these aggregation rules.

  Args:
    g_aggregator: the rule applied to generators every round.
    d_aggregator: the rule for discriminators when ``average_discriminator``.
    average_discriminator: also aggregate discriminators and send the result
      back to the clients (the paper's code averages generators only).
    weighting: ``'examples'``: the rules weigh clients by their reported
      image counts (FedAvg); ``'uniform'``: every client with data counts 1
      (the paper's code: weights 1/C before any defense changes them).
    rule_for: packed sweep points (``aggregation/choice.PointRules.build``): ``hyper -> Aggregator``, the
      point's rule rebuilt in the trace from its ``RoundData.hyper`` (its rule index, traced hyperparameters),
      for generators and discriminators; the two rules above then only gave the state's structure (``init``).

  Returns:
    ``server_round(state, clients, uploads, key, server_models=None, hyper=None) -> (new_state, metrics)``:
    ``clients`` are the clients' states after local training (kept in the new
    state); ``key`` is the round's key; ``server_models``, the server's own
    ``(generator, discriminator)`` variables trained on its root set
    (``aggregation.name='fltrust'``), reach the rules as
    ``client_stats['server_model']``. Metrics: the reported stats
    (``train/reported_*``), the server stats (``train/update_norm`` ...), the
    aggregator's diagnostics (``agg/``, ``agg_d/``) and
    ``train/global_finite``.
  """

  def step(state: RoundState, clients: ClientState, uploads: Uploads, key: jax.Array, server_models=None, hyper=None):
    g_rule, d_rule = (rule_for(hyper),) * 2 if rule_for is not None else (g_aggregator, d_aggregator)
    _, k_gagg, k_dagg = jax.random.split(key, 3)
    if weighting == "uniform":
      n = uploads.reported["num_examples"]
      uploads = uploads._replace(reported={**uploads.reported, "num_examples": (n > 0).astype(n.dtype)})
    g_ref, d_ref = ({SERVER_MODEL: m} for m in server_models) if server_models is not None else ({}, {})
    g_stats = {**uploads.reported, **server_stats(state.g_global, uploads.client_g)}
    g_global, g_agg, g_diag = g_rule.aggregate(
      state.g_agg, state.g_global, uploads.client_g, {**g_stats, **g_ref}, k_gagg
    )
    d_global, d_agg, d_diag = state.d_global, state.d_agg, {}
    if average_discriminator:
      d_stats = {**uploads.reported, **server_stats(state.d_global, uploads.client_d)}
      d_global, d_agg, d_diag = d_rule.aggregate(
        state.d_agg, state.d_global, uploads.client_d, {**d_stats, **d_ref}, k_dagg
      )
      clients = clients._replace(d_vars=uploads.client_d)
    metrics = {f"train/{k}": g_stats[k] for k in SERVER_STATS}
    metrics.update({f"train/reported_{k}": uploads.reported[k] for k in ("g_loss", "d_loss")})
    metrics.update({f"agg/{k}": v for k, v in g_diag.items()})
    metrics.update({f"agg_d/{k}": v for k, v in d_diag.items()})
    metrics["train/global_finite"] = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(g_global)]))
    new_state = RoundState(
      round=state.round + 1, g_global=g_global, d_global=d_global, g_agg=g_agg, d_agg=d_agg, clients=clients
    )
    return new_state, metrics

  return step
