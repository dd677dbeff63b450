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

``chain(stage, ..., reduction)`` runs them in order and ends in an
``Aggregator`` (the reduction). This is how the defense of Jin & Li (SASHIMI
2022) is built: ``chain(detect(isolation_forest), decay, mean)``.
"""

from __future__ import annotations

import inspect
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedgan_jax.aggregation.base import (
    Aggregator,
    Diagnostics,
    EmptyState,
    PyTree,
    Stats,
    expand_to,
    client_deltas,
    tree_sq_norms,
)


class Stage(NamedTuple):
  """A pre-aggregation step of a ``chain``: a pair of pure, jittable functions."""

  init: Callable[[PyTree], PyTree]
  update: Callable[
      [PyTree, PyTree, PyTree, Stats, jax.Array],
      tuple[PyTree, Stats, PyTree, Diagnostics],
  ]


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
  if not isinstance(max_norm, numbers.Real) or not max_norm > 0:
    raise ValueError(f"aggregation.kwargs.max_norm={max_norm!r}: must be > 0.")
  max_norm = float(max_norm)

  def init(global_params):
    del global_params
    return EmptyState()

  def update(state, global_params, client_params, client_stats, key):
    del key
    u = client_deltas(global_params, client_params)
    norm = jnp.sqrt(tree_sq_norms(u))
    clipped = norm > max_norm
    scale = jnp.where(clipped, max_norm / jnp.where(clipped, norm, 1.0), 1.0)
    new_params = jax.tree.map(
        lambda g, d, x: (g.astype(jnp.float32)[None] + expand_to(scale, d) * d).astype(x.dtype),
        global_params, u, client_params)
    return new_params, client_stats, state, {"clipped": clipped, "update_norm": norm}

  return Stage(init, update)


def _accepts(factory: Callable[..., Any], name: str) -> bool:
  try:
    return name in inspect.signature(factory).parameters
  except (TypeError, ValueError):
    return False


def _build(spec: Any, is_last: bool, num_clients: int | None, where: str):
  """Resolves one chain element spec to a ``Stage`` or ``Aggregator``."""
  from fedgan_jax import aggregation  # Lazy: the package imports this module.

  if isinstance(spec, (Stage, Aggregator)):
    return spec
  if isinstance(spec, str):
    name, kwargs = spec, {}
  elif (isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str)
        and hasattr(spec[1], "keys")):  # A dict or an ml_collections ConfigDict.
    name, kwargs = spec[0], {k: spec[1][k] for k in spec[1].keys()}
  else:
    raise ValueError(
        f"{where}={spec!r}: expected a Stage, an Aggregator, a name, or (name, kwargs).")
  if num_clients is not None:
    kwargs.setdefault("num_clients", num_clients)
  if is_last:
    return aggregation.get(name, **kwargs)  # get() drops num_clients if unused.
  if name not in aggregation.STAGES:
    raise ValueError(
        f"{where}={name!r} is not a known stage; accepted: {sorted(aggregation.STAGES)}.")
  factory = aggregation.STAGES[name]
  if not _accepts(factory, "num_clients"):
    kwargs.pop("num_clients", None)
  try:
    return factory(**kwargs)
  except TypeError as e:
    raise ValueError(f"{where}={name!r}: bad kwargs {kwargs}: {e}") from e


def chain(*stages: Any, num_clients: int | None = None, **named: Any) -> Aggregator:
  """Composes stages and a final reduction into one ``Aggregator``.

  Each element is a ``Stage`` (all but the last), the final one an
  ``Aggregator``; either may be given as a registry name (``aggregation.STAGES`` for
  stages, ``AGGREGATORS`` for the reduction) or ``(name, kwargs)``, which is
  how configs spell it: ``chain(stages=(('clip', {'max_norm': 1.0}), 'median'))``.

  Per round, the key is split once per element. Diagnostics are the union of
  the elements' diagnostics (later keys win), with ``weights`` from the
  reduction and ``flagged`` the OR of every element's ``flagged``. The state
  is the tuple of the elements' states.

  Args:
    *stages: the elements, in order (or pass ``stages=`` by keyword).
    num_clients: C, forwarded to elements built from names that accept it.
    **named: only ``stages``.

  Returns:
    The composed ``Aggregator``.

  Raises:
    ValueError: empty chain, unknown names, or a misplaced element type.
  """
  if named:
    if set(named) != {"stages"} or stages:
      raise ValueError(
          f"aggregation.kwargs: chain takes its elements positionally or as stages=...; "
          f"got unexpected {sorted(named)}.")
    stages = tuple(named["stages"])
  if not stages:
    raise ValueError("aggregation.kwargs.stages: chain needs at least a final reduction.")
  built = tuple(
      _build(s, i == len(stages) - 1, num_clients, f"aggregation.kwargs.stages[{i}]")
      for i, s in enumerate(stages))
  *pre, reduction = built
  for i, s in enumerate(pre):
    if not isinstance(s, Stage):
      raise ValueError(f"aggregation.kwargs.stages[{i}]: only the last element may be an "
                       f"Aggregator (reduction); got {type(s).__name__}.")
  if not isinstance(reduction, Aggregator):
    raise ValueError("aggregation.kwargs.stages[-1]: the last element must be an Aggregator.")

  def init(global_params):
    return tuple(s.init(global_params) for s in built)

  def aggregate(state, global_params, client_params, client_stats, key):
    keys = jax.random.split(key, len(built))
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

  return Aggregator(init, aggregate)


def norm_clip(max_norm: float, inner: Any = "mean", inner_kwargs: dict | None = None,
              num_clients: int | None = None) -> Aggregator:
  """Clips every update to L2 norm ``max_norm``, then aggregates with ``inner``.

  Equivalent to ``chain(clip_updates(max_norm), inner)``. Bounds the influence
  of any one client on ``mean`` to ``weight * max_norm``.

  Args:
    max_norm: the bound on ``|client - global|`` (> 0).
    inner: the reduction: a registry name or an ``Aggregator``.
    inner_kwargs: kwargs of ``inner`` when given by name.
    num_clients: C, forwarded to ``inner`` when it accepts it.

  Returns:
    The ``Aggregator``; diagnostics add ``clipped`` and ``update_norm``.
  """
  spec = inner if not isinstance(inner, str) else (inner, dict(inner_kwargs or {}))
  return chain(clip_updates(max_norm), spec, num_clients=num_clients)
