"""FLTrust: trust bootstrapped from the server's own update on a small clean root set.

Cao, Fang, Liu & Gong, "FLTrust: Byzantine-robust Federated Learning via Trust
Bootstrapping", NDSS 2021 (code: the authors' ``fltrust`` of their MXNet
release, reproduced in later PyTorch/numpy ports). Every round the server
trains the global model on its own small clean *root set* exactly as an honest
client trains (same local steps, same losses), which gives the server update
``g0 = server_model - global``. With ``g_i = client_i - global``::

    TS_i  = ReLU(cos(g_i, g0))                      (trust score)
    g     = sum_i TS_i * (|g0| / |g_i|) * g_i / sum_j TS_j
    new   = global + server_lr * g

Every update is rescaled to the server update's norm, so a scaled-up upload
carries no more weight than an honest one, and an update pointing away from
the server's (``cos <= 0``) gets weight 0. Here the cosine reads the
trainable parameters and each collection (``params``, BatchNorm statistics)
is rescaled on its own (``fltrust``'s ``scope``).

The rule is a pure function over the client axis like every other
(``base``); the server's model arrives as ``client_stats[SERVER_MODEL]`` (a
pytree shaped as ``global_params``, no client axis). The round program
(``federated/program.py``) trains it in the same compiled round when
``aggregation.name='fltrust'``: a separate call of the client-training
function on the root set (``RoundData.root``, the first
``aggregation.kwargs.root_size`` images of the clean held-out split), never
poisoned, with the server's own discriminator and optimizer states kept
between rounds as an honest client's are (in ``RoundState.g_agg``, so a fork,
``config.init_from``, starts them fresh with the aggregator's state). The root
images are held-out images no client holds; the evaluation also uses them as
real references (``root_size`` of ``data.heldout``; the server's model is only
a reference direction and norm, never aggregated).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from fedgan_jax.aggregation.base import (
  Aggregator,
  client_deltas,
  expand_to,
  finite_mask,
  keep_global_if_empty,
  normalize,
  stateless_init,
  valid_mask,
)

SERVER_MODEL = "server_model"  # The client_stats key of the server's own model (a pytree, no client axis).
DEFAULT_ROOT_SIZE = 32  # config_lib.FLTRUST_ROOT_SIZE, kept equal by a test.
NO_TRUST = ("keep", "server")
SCOPES = ("params", "all")


def root_size_of(name: str, kwargs: Mapping[str, Any]) -> int:
  """The root-set size the round program trains the server on: ``root_size`` for ``'fltrust'``, else 0."""
  if name != "fltrust":
    return 0
  return int(kwargs.get("root_size", DEFAULT_ROOT_SIZE))


def _is_running_variance(path) -> bool:
  """Whether a leaf is a BatchNorm running variance (``batch_stats/.../var``), as in ``privacy``."""
  names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  return bool(names) and names[-1] == "var" and "batch_stats" in names


def _groups(paths, scope: str) -> list[int]:
  """Per leaf: 0 for the trainable parameters (the ``params`` collection), 1 for the other collections.

  With ``scope='all'``, or a tree without a top-level ``params`` key (a plain
  parameter tree), every leaf is in group 0.
  """
  top = [getattr(p[0], "key", None) if p else None for p in paths]
  if scope == "all" or "params" not in top:
    return [0] * len(paths)
  return [0 if t == "params" else 1 for t in top]


def fltrust(
  root_size: int = DEFAULT_ROOT_SIZE, no_trust: str = "keep", server_lr: float = 1.0, scope: str = "params"
) -> Aggregator:
  """FLTrust (Cao et al., NDSS 2021): cosine trust to the server's own update, norms rescaled to it.

  With ``u_i = client_i - global`` and ``u0 = server_model - global`` (float32),
  and the valid clients of ``base``::

      cos_i = <p_i, p0> / (|p_i| |p0|)      (p: the trainable parameters' part; 0 when a norm is 0)
      TS_i  = max(cos_i, 0)                 (0 for an invalid client)
      w_i   = TS_i / sum_j TS_j
      new   = global + server_lr * sum_i w_i * (|u0_k| / |u_i_k|) * u_i_k   (per collection k)

  ``scope='params'`` (default): the trust score is the cosine of the updates of
  the ``params`` collection, the trainable parameters whose gradients form the
  authors' update vector (the server's own statistics, ``stats.server_stats``,
  read the same collection); each collection's update (``params``, BatchNorm's
  ``batch_stats``) is rescaled to the server update's norm in that
  collection, so no collection of an upload, however scaled, moves the model
  further than the server's does. Measured on ``configs/test.py``'s DCGAN
  generator, the running statistics' update is ~40x the parameters' in norm:
  over all leaves the cosine would mostly compare BatchNorm statistics. A tree
  without a ``params`` collection is one vector. ``scope='all'``: every leaf
  of the upload is one vector for both the cosine and the rescaling (as
  ``flame`` and ``foolsgold`` read uploads).

  As the authors' code (``normalized_weights = relu(cos) / (sum + 1e-9)``, each
  update times ``weight / |u_i| * |u0|``, summed), without its ``1e-9`` guards:
  zero norms are caught exactly instead. When every trust score is 0 (every
  update at 90 degrees or more from the server's, or the server's update is 0)
  the code's weights are all 0 and its global update is 0: the global model is
  unchanged. That is the default, ``no_trust='keep'``; ``no_trust='server'``
  applies the server's own update ``u0`` instead (the root set alone moves the
  model). Example counts only decide validity (FLTrust ignores them). When no
  client is valid, or the server's model is non-finite (its root-set training
  diverged), the global model is kept whatever ``no_trust`` says. BatchNorm
  running variances (``batch_stats/.../var``) are clamped at 0, since the
  rescaled updates need not stay in the clients' range.

  Args:
    root_size: root images the server trains on (an integer >= 1); read by the
      round program (``root_size_of``), not by ``aggregate``. Drawn from the
      clean held-out split, so ``config_lib.validate`` requires
      ``root_size <= data.heldout``.
    no_trust: ``'keep'`` (the authors' code) or ``'server'``: what a round in
      which every trust score is 0 does.
    server_lr: the global learning rate (the paper's alpha; > 0).
    scope: ``'params'`` or ``'all'``: the leaves the trust score reads (see above).

  Returns:
    An ``Aggregator`` with an empty state. ``aggregate`` reads
    ``client_stats[SERVER_MODEL]``; diagnostics ``weights`` (normalised trust
    scores), ``flagged`` (valid clients with trust 0), ``nonfinite``,
    ``trust_score: f32[C]`` (``TS_i``), ``server_cosine: f32[C]`` (``cos_i``, 0
    for invalid clients), ``rescale: f32[C]`` (``|p0| / |p_i|``, 0 for invalid
    clients), and the scalars ``server_update_norm`` (``|p0|``), ``no_trust``
    (every trust score 0) and ``server_finite``; ``p`` as ``scope`` says.

  Raises:
    ValueError: a bad ``root_size``, ``no_trust``, ``server_lr`` or ``scope``; at
      aggregation, ``client_stats`` without ``SERVER_MODEL``.
  """
  if isinstance(root_size, bool) or not isinstance(root_size, numbers.Integral) or root_size < 1:
    raise ValueError(
      f"aggregation.kwargs.root_size={root_size!r}: must be an integer >= 1 (the server's clean root images)."
    )
  if scope not in SCOPES:
    raise ValueError(f"aggregation.kwargs.scope={scope!r}: accepted values are {list(SCOPES)}.")
  if no_trust not in NO_TRUST:
    raise ValueError(f"aggregation.kwargs.no_trust={no_trust!r}: accepted values are {list(NO_TRUST)}.")
  real = isinstance(server_lr, numbers.Real) and not isinstance(server_lr, bool)
  if not real or not math.isfinite(server_lr) or server_lr <= 0:
    raise ValueError(f"aggregation.kwargs.server_lr={server_lr!r}: must be a finite number > 0.")
  server_lr = float(server_lr)

  def aggregate(state, global_params, client_params, client_stats, key):
    del key
    if SERVER_MODEL not in client_stats:
      raise ValueError(
        f"fltrust: client_stats has no {SERVER_MODEL!r} (the server's model trained on its root set); "
        "the round program passes it with aggregation.name='fltrust'."
      )
    server = client_stats[SERVER_MODEL]
    valid, nonfinite = valid_mask(client_params, client_stats)
    server_finite = finite_mask(jax.tree.map(lambda x: x[None], server))[0]
    u = jax.tree.leaves(client_deltas(global_params, client_params, valid))  # Invalid clients: 0.
    u0 = [
      jnp.where(server_finite, s.astype(jnp.float32) - g.astype(jnp.float32), 0.0)
      for s, g in zip(jax.tree.leaves(server), jax.tree.leaves(global_params))
    ]
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(global_params)
    group = _groups([path for path, _ in leaves_with_path], scope)
    # Per group: each client's squared norm, the server's; the cosine is over group 0 (the trainable parameters).
    sq = [0.0] * (max(group) + 1)
    sq0 = [0.0] * (max(group) + 1)
    dot = 0.0
    for k, d, d0 in zip(group, u, u0):
      sq[k] = sq[k] + jnp.sum(jnp.square(d).reshape(d.shape[0], -1), axis=1)
      sq0[k] = sq0[k] + jnp.sum(jnp.square(d0))
      if k == 0:
        dot = dot + jnp.sum((d * d0[None]).reshape(d.shape[0], -1), axis=1)
    norm = [jnp.sqrt(v) for v in sq]
    norm0 = [jnp.sqrt(v) for v in sq0]
    denom = norm[0] * norm0[0]
    cos = jnp.clip(jnp.where(denom > 0, dot / jnp.where(denom > 0, denom, 1.0), 0.0), -1.0, 1.0)
    cos = jnp.where(valid, cos, 0.0)
    trust = jnp.maximum(cos, 0.0)
    weights = normalize(trust)
    trusted = jnp.sum(trust) > 0
    rescale = [jnp.where(valid & (n > 0), n0 / jnp.where(n > 0, n, 1.0), 0.0) for n, n0 in zip(norm, norm0)]
    apply = jnp.any(valid) & server_finite
    outs = []
    for (path, g), k, d, d0, x in zip(leaves_with_path, group, u, u0, jax.tree.leaves(client_params)):
      step = jnp.sum(expand_to(weights * rescale[k], d) * d, axis=0)
      if no_trust == "server":
        step = jnp.where(trusted, step, d0)
      y = g.astype(jnp.float32) + server_lr * step
      if _is_running_variance(path):
        y = jnp.maximum(y, 0.0)
      outs.append(y.astype(x.dtype))
    new_global = keep_global_if_empty(apply, jax.tree.unflatten(treedef, outs), global_params)
    diagnostics = {
      "weights": weights,
      "flagged": valid & (trust <= 0),
      "nonfinite": nonfinite,
      "trust_score": trust,
      "server_cosine": cos,
      "rescale": rescale[0],
      "server_update_norm": norm0[0],
      "no_trust": ~trusted,
      "server_finite": server_finite,
    }
    return new_global, state, diagnostics

  return Aggregator(stateless_init, aggregate)
