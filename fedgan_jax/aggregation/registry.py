"""Rules by name: the registries, ``get``, and the rules composed from named elements.

``AGGREGATORS`` and ``STAGES`` are plain dicts (adding a rule = one factory +
one line); ``get(name, **kwargs)`` builds a rule by name or from
``'module:factory'`` outside the package. ``chain``, ``norm_clip`` and
``detect_and_decay`` take their elements as names (as configs spell them) and
compose them with ``compose.chain``.

Stateful rules (``detect``, and ``chain`` with a ``decay`` stage) need the
number of clients C at construction, because ``init`` sees only the global
params: pass ``num_clients=C`` to ``get``; it is forwarded to every factory
that has a ``num_clients`` parameter and dropped for the others.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

from fedgan_jax.aggregation import compose
from fedgan_jax.aggregation.alpha_detect import alpha_detect, alpha_test, recovering_weights
from fedgan_jax.aggregation.backdoor import flame, foolsgold, rlr
from fedgan_jax.aggregation.base import Aggregator, mean
from fedgan_jax.aggregation.byzantine import bulyan, centered_clip, dnc
from fedgan_jax.aggregation.compose import Stage, clip_updates
from fedgan_jax.aggregation.detectors import check_num_clients, decay_flagged, detect
from fedgan_jax.aggregation.fltrust import fltrust
from fedgan_jax.aggregation.privacy import dp_mean
from fedgan_jax.aggregation.robust import geometric_median, krum, median, multi_krum, trimmed_mean


def _accepts(factory: Callable[..., Any], name: str) -> bool:
  try:
    return name in inspect.signature(factory).parameters
  except (TypeError, ValueError):
    return False


def _element(spec: Any, is_last: bool, num_clients: int | None, where: str) -> Stage | Aggregator:
  """Resolves one chain element spec (built, a name, or ``(name, kwargs)``) to a ``Stage`` or ``Aggregator``."""
  if isinstance(spec, (Stage, Aggregator)):
    return spec
  if isinstance(spec, str):
    name, kwargs = spec, {}
  elif (
    isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str) and hasattr(spec[1], "keys")
  ):  # A dict or an ml_collections ConfigDict.
    name, kwargs = spec[0], {k: spec[1][k] for k in spec[1].keys()}
  else:
    raise ValueError(f"{where}={spec!r}: expected a Stage, an Aggregator, a name, or (name, kwargs).")
  if num_clients is not None:
    kwargs.setdefault("num_clients", num_clients)
  if is_last:
    return get(name, **kwargs)  # get() drops num_clients if unused.
  if name not in STAGES:
    raise ValueError(f"{where}={name!r} is not a known stage; accepted: {sorted(STAGES)}.")
  factory = STAGES[name]
  if not _accepts(factory, "num_clients"):
    kwargs.pop("num_clients", None)
  try:
    return factory(**kwargs)
  except TypeError as e:
    raise ValueError(f"{where}={name!r}: bad kwargs {kwargs}: {e}") from e


def chain(*stages: Any, num_clients: int | None = None, **named: Any) -> Aggregator:
  """Composes stages and a final reduction into one ``Aggregator`` (``compose.chain``).

  Each element is a ``Stage`` (all but the last), the final one an
  ``Aggregator``; either may be given as a registry name (``STAGES`` for
  stages, ``AGGREGATORS`` for the reduction) or ``(name, kwargs)``, which is
  how configs spell it: ``chain(stages=(('clip', {'max_norm': 1.0}), 'median'))``.

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
        f"aggregation.kwargs: chain takes its elements positionally or as stages=...; got unexpected {sorted(named)}."
      )
    stages = tuple(named["stages"])
  if not stages:
    raise ValueError("aggregation.kwargs.stages: chain needs at least a final reduction.")
  return compose.chain(
    *(_element(s, i == len(stages) - 1, num_clients, f"aggregation.kwargs.stages[{i}]") for i, s in enumerate(stages))
  )


def norm_clip(
  max_norm: float, inner: Any = "mean", inner_kwargs: dict | None = None, num_clients: int | None = None
) -> Aggregator:
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


def detect_and_decay(
  detector: str = "isolation_forest",
  features: tuple[str, ...] | str = ("g_loss",),
  warmup_rounds: int = 10,
  decay: float = 0.9,
  block_after: int | None = None,
  inner: Any = "mean",
  inner_kwargs: dict | None = None,
  abs_features: bool = True,
  num_clients: int | None = None,
  mode: str = "persistent",
  **detector_kwargs: Any,
) -> Aggregator:
  """The global malicious detection defense of Jin & Li (SASHIMI 2022).

  ``chain(detect(detector, features), decay_flagged(...), inner)``: every
  round the detector scores the clients on ``|client_stats[features]|``
  (``flagged`` reports its verdict every round, warm-up included); from round
  index ``warmup_rounds + 1`` on, if fewer than ``C // 2`` clients are
  flagged, each flagged client's weight is multiplied by
  ``decay ** times_flagged`` (count incremented first), persistently by
  default, and ``inner`` renormalizes: the paper's code's rule.
  ``block_after=k`` blocks a client flagged in ``k`` acted-on rounds for
  good. See ``decay_flagged`` for the order. The paper's code feeds the
  Isolation Forest ``|G loss|`` of each client's *last* local batch:
  ``features=('g_loss_last',)``; the default ``('g_loss',)`` is the mean over
  the round's local steps.

  Args:
    detector: ``'isolation_forest'`` (paper) or ``'robust_zscore'``.
    features: ``client_stats`` keys the detector sees.
    warmup_rounds: flags are acted on from round index ``warmup_rounds + 1``.
    decay: per-flag weight factor in ``(0, 1]``.
    block_after: None, or flagged rounds after which a client is blocked.
    inner: the reduction (registry name or ``Aggregator``), ``mean`` in the paper.
    inner_kwargs: kwargs of ``inner`` when given by name.
    abs_features: take ``abs`` of the features (the paper's |G loss|).
    num_clients: C, required (the state holds ``times_flagged: int32[C]``).
    mode: ``'persistent'`` (the paper's code) or ``'per_round'`` decay (``decay_flagged``).
    **detector_kwargs: hyperparameters of the detector, e.g. ``num_trees``,
      ``threshold``.

  Returns:
    The ``Aggregator``; state ``(EmptyState(), DecayState, inner_state)``;
    diagnostics ``weights``, ``flagged``, ``scores``, ``times_flagged``,
    ``blocked``, ``decay_active``, ``decay_factor``, ``nonfinite`` plus ``inner``'s.
  """
  spec = inner if not isinstance(inner, str) else (inner, dict(inner_kwargs or {}))
  return chain(
    detect(detector, features, abs_features, **detector_kwargs),
    decay_flagged(decay, warmup_rounds, block_after, check_num_clients(num_clients, "detect"), mode),
    spec,
    num_clients=num_clients,
  )


# Name -> factory. Adding a rule = one factory + one line here.
AGGREGATORS: dict[str, Callable[..., Aggregator]] = {
  "mean": mean,
  "median": median,
  "trimmed_mean": trimmed_mean,
  "krum": krum,
  "multi_krum": multi_krum,
  "geometric_median": geometric_median,
  "norm_clip": norm_clip,
  "chain": chain,
  "detect": detect_and_decay,
  "dp_mean": dp_mean,
  "rlr": rlr,
  "flame": flame,
  "foolsgold": foolsgold,
  "centered_clip": centered_clip,
  "dnc": dnc,
  "bulyan": bulyan,
  "alpha_detect": alpha_detect,
  "fltrust": fltrust,
}

# Name -> stage factory, for ``chain`` elements given by name.
STAGES: dict[str, Callable[..., Stage]] = {
  "clip": clip_updates,
  "detect": detect,
  "decay": decay_flagged,
  "alpha_test": alpha_test,
  "recovering_weights": recovering_weights,
}


def get(name: str, **kwargs: Any) -> Aggregator:
  """Builds the aggregation rule called ``name`` with hyperparameters ``kwargs``.

  Args:
    name: a key of ``AGGREGATORS`` or ``'module.path:factory'`` for a rule
      outside the package (imported from the working directory or Python path).
    **kwargs: passed to the factory. ``num_clients`` is special: passed only
      to factories with a ``num_clients`` parameter, silently dropped for
      others, so callers may always pass it.

  Returns:
    The ``Aggregator``.

  Raises:
    ValueError: unknown name, unimportable module, or bad hyperparameters.
  """
  if ":" in name:
    module_name, _, attr = name.partition(":")
    if os.getcwd() not in sys.path:
      sys.path.insert(0, os.getcwd())
    try:
      module = importlib.import_module(module_name)
    except ImportError as e:
      raise ValueError(f"aggregation.name={name!r}: cannot import module {module_name!r} ({e}).") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
      raise ValueError(f"aggregation.name={name!r}: module {module_name!r} has no callable {attr!r}.")
  elif name in AGGREGATORS:
    factory = AGGREGATORS[name]
  else:
    raise ValueError(
      f"aggregation.name={name!r} is not a known rule; accepted: {sorted(AGGREGATORS)} or 'module:factory'."
    )
  if "num_clients" in kwargs and not _accepts(factory, "num_clients"):
    kwargs = {k: v for k, v in kwargs.items() if k != "num_clients"}
  try:
    agg = factory(**kwargs)
  except TypeError as e:
    raise ValueError(f"aggregation.name={name!r}: bad aggregation.kwargs {kwargs}: {e}") from e
  if not isinstance(agg, Aggregator):
    raise ValueError(f"aggregation.name={name!r}: factory returned {type(agg).__name__}, not an Aggregator.")
  return agg
