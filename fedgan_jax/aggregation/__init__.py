"""Server aggregation rules as pure functions over the client axis.

Rules are looked up by name in the explicit registry ``AGGREGATORS``; a rule
living outside the package is named ``'module:factory'`` (DESIGN §2). Stages
for ``chain`` are in ``STAGES``, detectors in ``DETECTORS``.

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
from typing import Any, Callable

from fedgan_jax.aggregation.base import (
    Aggregator,
    EmptyState,
    finite_mask,
    mean,
    normalize,
    valid_mask,
    weighted_average,
)
from fedgan_jax.aggregation.compose import Stage, chain, clip_updates, norm_clip
from fedgan_jax.aggregation.detectors import (
    DETECTORS,
    DecayState,
    decay_flagged,
    detect,
    detect_and_decay,
    isolation_forest,
    robust_zscore,
)
from fedgan_jax.aggregation.robust import geometric_median, krum, median, multi_krum, trimmed_mean
from fedgan_jax.aggregation.stats import server_stats

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
}

# Name -> stage factory, for ``chain`` elements given by name.
STAGES: dict[str, Callable[..., Stage]] = {
    "clip": clip_updates,
    "detect": detect,
    "decay": decay_flagged,
}


def _accepts_num_clients(factory: Callable[..., Any]) -> bool:
  try:
    return "num_clients" in inspect.signature(factory).parameters
  except (TypeError, ValueError):
    return False


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
      raise ValueError(
          f"aggregation.name={name!r}: cannot import module {module_name!r} ({e})."
      ) from e
    factory = getattr(module, attr, None)
    if not callable(factory):
      raise ValueError(
          f"aggregation.name={name!r}: module {module_name!r} has no callable {attr!r}."
      )
  elif name in AGGREGATORS:
    factory = AGGREGATORS[name]
  else:
    raise ValueError(
        f"aggregation.name={name!r} is not a known rule; accepted: "
        f"{sorted(AGGREGATORS)} or 'module:factory'."
    )
  if "num_clients" in kwargs and not _accepts_num_clients(factory):
    kwargs = {k: v for k, v in kwargs.items() if k != "num_clients"}
  try:
    agg = factory(**kwargs)
  except TypeError as e:
    raise ValueError(f"aggregation.name={name!r}: bad aggregation.kwargs {kwargs}: {e}") from e
  if not isinstance(agg, Aggregator):
    raise ValueError(f"aggregation.name={name!r}: factory returned {type(agg).__name__}, not an Aggregator.")
  return agg


__all__ = [
    "AGGREGATORS", "Aggregator", "DETECTORS", "DecayState", "EmptyState", "STAGES", "Stage",
    "chain", "clip_updates", "decay_flagged", "detect", "detect_and_decay", "finite_mask",
    "geometric_median", "get", "isolation_forest", "krum", "mean", "median", "multi_krum",
    "norm_clip", "normalize", "robust_zscore", "server_stats", "trimmed_mean", "valid_mask",
    "weighted_average",
]
