"""Grids of config overrides for sweeps: expansion (``product``, ``zipped``) and point names.

A *point* is a dict of dotted config overrides (``{'attack.malicious': (0,),
'seed': 1}``); keys starting with ``_`` are labels (``{'_defense': 'gp', ...}``
names the point ``defense-gp`` instead of spelling out the keys it stands for).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Point = dict[str, Any]

_HIDE = "_hide"  # Internal: keys a label stands for (left out of the name).
MAX_NAME = 200  # Directory names (file systems allow 255 bytes; group names add "__seeds-a-b").


# --------------------------------------------------------------------------- grid helpers


def _as_points(factor: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]) -> list[Point]:
  if isinstance(factor, Mapping):
    keys = list(factor)
    for k in keys:
      if isinstance(factor[k], (str, bytes)) or not isinstance(factor[k], Iterable):
        raise ValueError(f"sweep axis {k!r}: expected a list of values, got {factor[k]!r}.")
    return [dict(zip(keys, vals)) for vals in itertools.product(*(list(factor[k]) for k in keys))]
  points = []
  for p in factor:
    if not isinstance(p, Mapping):
      raise ValueError(f"sweep factor: expected dicts of overrides, got {p!r}.")
    p = dict(p)
    labels = [k for k in p if k.startswith("_") and k != _HIDE]
    if labels:  # A labelled alternative: its own keys are named by the label.
      p[_HIDE] = tuple(sorted(set(p.get(_HIDE, ())) | {k for k in p if not k.startswith("_")}))
    points.append(p)
  return points


def _merge(points: Sequence[Point]) -> Point:
  out: Point = {}
  for p in points:
    for k, v in p.items():
      if k == _HIDE:
        out[_HIDE] = tuple(sorted(set(out.get(_HIDE, ())) | set(v)))
      elif k in out:
        raise ValueError(f"sweep: key {k!r} is set by two factors ({out[k]!r} and {v!r}).")
      else:
        out[k] = v
  return out


def product(*factors: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]) -> list[Point]:
  """The Cartesian product of sweep factors, first factor outermost.

  Args:
    *factors: each either a dict ``{dotted_key: [values]}`` (itself expanded
      as a product over its keys) or a list of override dicts (alternatives,
      e.g. defenses that set several keys at once; add a ``'_label': 'name'``
      key to name the alternative).

  Returns:
    A list of override dicts.

  Raises:
    ValueError: two factors set the same key, or an axis is not a list.
  """
  expanded = [_as_points(f) for f in factors]
  return [_merge(combo) for combo in itertools.product(*expanded)]


def zipped(axes: Mapping[str, Sequence[Any]] | None = None, **kwargs: Sequence[Any]) -> list[Point]:
  """Points that move several keys together: ``zipped({'a': [1, 2], 'b': [3, 4]})``.

  Args:
    axes: ``{dotted_key: [values]}``, all lists of one length.
    **kwargs: more axes (keys without dots).

  Returns:
    ``[{'a': 1, 'b': 3}, {'a': 2, 'b': 4}]``.

  Raises:
    ValueError: the lists differ in length.
  """
  axes = {**(axes or {}), **kwargs}
  lens = {k: len(v) for k, v in axes.items()}
  if len(set(lens.values())) > 1:
    raise ValueError(f"zipped: all axes need the same number of values, got {lens}.")
  keys = list(axes)
  return [dict(zip(keys, vals)) for vals in zip(*(axes[k] for k in keys))]


# --------------------------------------------------------------------------- naming


def overrides(point: Point) -> dict[str, Any]:
  """The config overrides of a point (labels and internal keys dropped)."""
  return {k: v for k, v in point.items() if not k.startswith("_")}


def _fmt_value(v: Any) -> str:
  if isinstance(v, (tuple, list)):
    return "-".join(_fmt_value(x) for x in v) if v else "none"
  if isinstance(v, float):
    return f"{v:g}"
  return str(v)


def point_name(point: Point) -> str:
  """A readable, filesystem-safe directory name read off a point's overrides.

  ``{'attack.malicious': (0,), '_defense': 'gp', 'seed': 1}`` ->
  ``malicious-0__defense-gp__seed-1`` (the last part of each dotted key; a
  label ``_x`` reads ``x``; keys a label stands for are left out).
  """
  hidden = set(point.get(_HIDE, ()))
  parts = []
  for k, v in point.items():
    if k == _HIDE or k in hidden:
      continue
    short = k.lstrip("_").split(".")[-1]
    parts.append(f"{short}-{_fmt_value(v)}")
  name = "__".join(parts) or "base"
  return re.sub(r"[^A-Za-z0-9._=-]+", "-", name)


def check_names(points: Sequence[Point]) -> list[str]:
  """The points' names; raises ``ValueError`` if two points share one."""
  names = [point_name(p) for p in points]
  seen: dict[str, int] = {}
  for i, n in enumerate(names):
    if n in seen:
      raise ValueError(
        f"sweep points {seen[n]} and {i} both map to the directory name {n!r}; "
        f"give the alternatives distinct '_label' values."
      )
    seen[n] = i
    if len(n) > MAX_NAME:
      raise ValueError(
        f"sweep point {i}'s directory name is {len(n)} characters (at most {MAX_NAME}): {n[:80]}...; "
        "name it with '_label' keys through product() or zipped(), which leave out the keys a label stands for."
      )
  return names
