"""Composing aggregation: pre-aggregation stages chained into a reduction.

A ``Stage`` transforms the client bundle before a reduction sees it, in the
manner of ``optax.chain``::

    Stage = NamedTuple(init, update)
    init(global_params) -> stage_state
    update(stage_state, global_params, client_params, client_stats, key)
        -> (client_params, client_stats, stage_state, diagnostics)

Stages talk to each other and to the reduction only through ``client_params``
and ``client_stats``:

- a *detector* stage writes ``client_stats['flagged']`` (``bool[C]``) and
  ``client_stats['anomaly_score']`` (``f32[C]``);
- a *reweighting* stage rescales ``client_stats['num_examples']``; weight 0
  excludes a client from every built-in reduction (see ``base``);
- a *transform* stage rewrites ``client_params`` (e.g. norm clipping of the
  updates, Sun et al., "Can You Really Backdoor Federated Learning?", 2019).

``chain(stage, ..., reduction)`` runs built elements in order and ends in an
``Aggregator`` (the reduction). This is how the defense of Jin & Li (SASHIMI
2022) is built: ``chain(detect(isolation_forest), decay, mean)``. Elements
named in a config are resolved by ``aggregation.registry``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedgan_jax.aggregation.base import (
  Aggregator,
  Diagnostics,
  PyTree,
  Stats,
  check_real,
  client_deltas,
  expand_to,
  stateless_init,
  tree_sq_norms,
)


class Stage(NamedTuple):
  """A pre-aggregation step of a ``chain``: a pair of pure, jittable functions.

  ``client_axes`` declares the per-client part of the stage's state, as
  ``Aggregator.client_axes`` does (``base``): ``False`` (the default) for none.
  """

  init: Callable[[PyTree], PyTree]
  update: Callable[
    [PyTree, PyTree, PyTree, Stats, jax.Array],
    tuple[PyTree, Stats, PyTree, Diagnostics],
  ]
  client_axes: Any = False


def clip_updates(max_norm: float) -> Stage:
  """Stage: scales each update ``client - global`` to L2 norm <= ``max_norm``.

  The norm is over all leaves of the client's pytree. A non-finite upload
  stays non-finite (and is excluded by the reduction).

  Args:
    max_norm: the bound (> 0).

  Returns:
    A stateless ``Stage``; diagnostics ``clipped: bool[C]``,
    ``update_norm: f32[C]`` (before clipping).

  Raises:
    ValueError: ``max_norm <= 0``.
  """
  max_norm = check_real("max_norm", max_norm, "> 0", lambda v: v > 0)  # May be traced (aggregation/choice.py).

  def update(state, global_params, client_params, client_stats, key):
    del key
    u = client_deltas(global_params, client_params)
    norm = jnp.sqrt(tree_sq_norms(u))
    clipped = norm > max_norm
    scale = jnp.where(clipped, max_norm / jnp.where(clipped, norm, 1.0), 1.0)
    new_params = jax.tree.map(
      lambda g, d, x: (g.astype(jnp.float32)[None] + expand_to(scale, d) * d).astype(x.dtype),
      global_params,
      u,
      client_params,
    )
    return new_params, client_stats, state, {"clipped": clipped, "update_norm": norm}

  return Stage(stateless_init, update)


def chain(*elements: Stage | Aggregator) -> Aggregator:
  """Composes built stages and a final reduction into one ``Aggregator``.

  Per round, the key is split once per element. Diagnostics are the union of
  the elements' diagnostics (later keys win), with ``weights`` from the
  reduction and ``flagged`` the OR of every element's ``flagged``. The state
  is the tuple of the elements' states, its ``client_axes`` the tuple of
  theirs. ``aggregation.chain`` is the same
  with elements given by registry name (how configs spell it).

  Args:
    *elements: ``Stage``s, then the final ``Aggregator`` (the reduction).

  Returns:
    The composed ``Aggregator``.

  Raises:
    ValueError: empty chain or a misplaced element type.
  """
  if not elements:
    raise ValueError("aggregation.kwargs.stages: chain needs at least a final reduction.")
  *pre, reduction = elements
  for i, s in enumerate(pre):
    if not isinstance(s, Stage):
      raise ValueError(
        f"aggregation.kwargs.stages[{i}]: only the last element may be an "
        f"Aggregator (reduction); got {type(s).__name__}."
      )
  if not isinstance(reduction, Aggregator):
    raise ValueError("aggregation.kwargs.stages[-1]: the last element must be an Aggregator.")

  def init(global_params):
    return tuple(s.init(global_params) for s in elements)

  def aggregate(state, global_params, client_params, client_stats, key):
    keys = jax.random.split(key, len(elements))
    diagnostics: dict[str, jax.Array] = {}
    flagged = None
    new_state = []
    stats = dict(client_stats)
    for stage, s, k in zip(pre, state[:-1], keys[:-1]):
      client_params, stats, s, d = stage.update(s, global_params, client_params, stats, k)
      new_state.append(s)
      diagnostics.update(d)
      if "flagged" in d:
        flagged = d["flagged"] if flagged is None else flagged | d["flagged"]
    new_global, s, d = reduction.aggregate(state[-1], global_params, client_params, stats, keys[-1])
    new_state.append(s)
    diagnostics.update(d)
    diagnostics["flagged"] = d["flagged"] if flagged is None else flagged | d["flagged"]
    return new_global, tuple(new_state), diagnostics

  return Aggregator(init, aggregate, tuple(e.client_axes for e in elements))
