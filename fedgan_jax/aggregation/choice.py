"""Several aggregation rules, and rules with traced hyperparameters, in ONE compiled program.

A sweep over defenses (Jin & Li, SASHIMI 2022: no defense vs the global
malicious detection; FedDetect 2023; the matrix of backdoor defenses) varies
the server's rule and its hyperparameters between points that are otherwise
the same program. ``fedgan_jax/pack.py`` trains such points as one program
over a leading point axis; this module gives it the server side:

* ``one_of(rules, index)`` is the ``Aggregator`` ``rules[index]`` for a traced
  int32 ``index``: its state is the tuple of every rule's state (each rule's
  own slot, the others kept), its diagnostics the union of the rules' keys
  (a key a rule does not report is zero-filled: ``PointRules.metric_keys``
  says which keys are each point's own). Under ``vmap`` over points with a
  per-point index, ``lax.switch`` runs every rule and selects, so a program
  of k rules costs the k aggregations (small next to local training).
* ``PointRules`` holds the distinct rules of a pack (``(name, kwargs)``
  each) and which float hyperparameters its points differ in
  (``TRACEABLE_KWARGS``, by rule name): ``build(hyper)`` rebuilds the rules
  inside the traced round from ``RoundData.hyper`` (the point's rule index
  under ``RULE_KEY``, each traced value under ``hyper_key(i, name)``), so
  the factories close over traced scalars instead of Python floats
  (``base.check_real`` lets them through, after the Python values were
  checked when the pack was planned).

A rule's hyperparameter is traceable when it only enters arithmetic in
``aggregate`` (never a shape, a Python branch or ``init``): the detection's
``decay`` and ``threshold``, a clip's ``max_norm``, CenteredClip's ``tau``,
DP-FedAvg's ``clip_norm`` and ``noise_multiplier``, FoolsGold's ``kappa``,
RLR's ``server_lr``. The others (Krum's ``f``, trimmed mean's ``beta``,
FLAME's ``noise_lambda`` whose 0 skips the noise draw, ...) make points with
different values different rules of ``one_of``. FLTrust (its server trains on
a root set: another program) never joins a choice.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedgan_jax.aggregation import registry
from fedgan_jax.aggregation.base import Aggregator

RULE_KEY = "aggregation/rule"

# Rule name -> the float kwargs that may be traced per point (see the module docstring). Adding a rule whose
# hyperparameter only enters aggregate's arithmetic: one line here (its factory reads it through base.check_real).
TRACEABLE_KWARGS: dict[str, tuple[str, ...]] = {
  "detect": ("decay", "threshold"),
  "norm_clip": ("max_norm",),
  "centered_clip": ("tau",),
  "dp_mean": ("clip_norm", "noise_multiplier"),
  "foolsgold": ("kappa",),
  "rlr": ("server_lr",),
}

# Rules that shape the program beyond the aggregation (FLTrust trains the server's models on a root set).
NOT_CHOOSABLE = ("fltrust",)


def hyper_key(rule: int, name: str) -> str:
  """``RoundData.hyper``'s key of rule ``rule``'s traced hyperparameter ``name``."""
  return f"aggregation/{rule}/{name}"


def one_of(rules: Sequence[Aggregator], index: jax.Array) -> Aggregator:
  """The aggregation rule ``rules[index]``, chosen by a (traced) int32 scalar.

  Args:
    rules: two or more rules.
    index: int32 scalar in ``[0, len(rules))`` (clamped by ``lax.switch``).

  Returns:
    An ``Aggregator``: state ``tuple(rule.init(g) for rule in rules)`` (the chosen rule updates its slot, the
    others pass through), ``client_axes`` the tuple of the rules' own, diagnostics the union of the rules' keys
    with the keys the chosen rule lacks zero-filled.

  Raises:
    ValueError: (when traced) two rules reporting one diagnostic with different shapes or dtypes.
  """
  rules = tuple(rules)

  def init(global_params):
    return tuple(r.init(global_params) for r in rules)

  def aggregate(state, global_params, client_params, client_stats, key):
    args = (global_params, client_params, client_stats, key)
    shapes = [jax.eval_shape(r.aggregate, s, *args)[2] for r, s in zip(rules, state)]
    union: dict[str, jax.ShapeDtypeStruct] = {}
    for i, diag in enumerate(shapes):
      for k, v in diag.items():
        if k in union and (union[k].shape, union[k].dtype) != (v.shape, v.dtype):
          raise ValueError(
            f"aggregation: rules 0..{len(rules) - 1} of one program report diagnostic {k!r} as "
            f"{union[k].dtype}{list(union[k].shape)} and (rule {i}) {v.dtype}{list(v.shape)}; run them apart."
          )
        union.setdefault(k, v)

    def branch(i):
      def run(state, global_params, client_params, client_stats, key):
        new_global, own, diag = rules[i].aggregate(state[i], global_params, client_params, client_stats, key)
        new_global = jax.tree.map(lambda x, g: jnp.asarray(x, g.dtype), new_global, global_params)
        own = jax.tree.map(lambda x, s: jnp.asarray(x, s.dtype), own, state[i])
        filled = {
          k: jnp.asarray(diag[k], v.dtype) if k in diag else jnp.zeros(v.shape, v.dtype) for k, v in union.items()
        }
        return new_global, state[:i] + (own,) + state[i + 1 :], filled

      return run

    return jax.lax.switch(jnp.asarray(index, jnp.int32), [branch(i) for i in range(len(rules))], state, *args)

  return Aggregator(init, aggregate, tuple(r.client_axes for r in rules))


def _canonical(kwargs: dict) -> str:
  return json.dumps(kwargs, sort_keys=True, default=str)


class PointRules(NamedTuple):
  """The server rules of a pack of sweep points (``fedgan_jax/pack.py``).

  Attributes:
    specs: the distinct rules, ``(name, kwargs)`` each (kwargs with the first such point's values).
    traced: per rule, the kwargs its points differ in (each point's own ``RoundData.hyper`` value).
    index: per point, its rule's index in ``specs``.
    values: per point, ``{hyper_key(i, name): value}`` of its rule's traced kwargs.
  """

  specs: tuple
  traced: tuple
  index: tuple
  values: tuple

  def base(self, num_clients: int) -> Aggregator:
    """The rule(s) built from Python values: ``init`` and ``client_axes`` of the pack (one rule, or ``one_of``)."""
    rules = [registry.get(n, num_clients=num_clients, **kw) for n, kw in self.specs]
    return rules[0] if len(rules) == 1 else one_of(rules, jnp.int32(0))

  def build(self, hyper: dict | None, num_clients: int) -> Aggregator:
    """Inside the traced round: the point's rule from its ``RoundData.hyper`` (its traced values and choice)."""
    hyper = hyper or {}
    rules = [
      registry.get(n, num_clients=num_clients, **{**kw, **{k: hyper[hyper_key(i, k)] for k in self.traced[i]}})
      for i, (n, kw) in enumerate(self.specs)
    ]
    return rules[0] if len(rules) == 1 else one_of(rules, hyper[RULE_KEY])

  def hyper(self) -> dict[str, jax.Array]:
    """The ``RoundData.hyper`` entries of the points (leading point axis): rule index and traced values."""
    out = {}
    if len(self.specs) > 1:
      out[RULE_KEY] = jnp.asarray(self.index, jnp.int32)
    for i, names in enumerate(self.traced):
      for k in names:
        # A point of another rule never reads this value: it gets rule i's first (a valid value, no NaN).
        first = next(v[hyper_key(i, k)] for v in self.values if hyper_key(i, k) in v)
        out[hyper_key(i, k)] = jnp.asarray([v.get(hyper_key(i, k), first) for v in self.values], jnp.float32)
    return out

  @property
  def active(self) -> bool:
    """Whether the points differ in their rule or its hyperparameters at all."""
    return len(self.specs) > 1 or any(self.traced)


def choosable(name: str) -> bool:
  """Whether points with rule ``name`` may share a program with other rules (``NOT_CHOOSABLE``)."""
  return name not in NOT_CHOOSABLE


def point_rules(rules: Sequence[tuple[str, dict]]) -> PointRules:
  """The ``PointRules`` of points whose rules are ``(aggregation.name, aggregation.kwargs)`` each.

  Points of one name whose kwargs differ only in that rule's ``TRACEABLE_KWARGS`` (real numbers in every such
  point) share a rule and trace those kwargs; any other difference makes another rule of the choice.
  """
  static_of = []
  for name, kw in rules:  # A traceable kwarg given as a real number is a placeholder: its value is the point's.
    names = TRACEABLE_KWARGS.get(name, ())
    static_of.append((name, _canonical({k: "<traced>" if k in names and _real(v) else v for k, v in kw.items()})))
  specs, index, groups = [], [], {}
  for (name, kw), key in zip(rules, static_of):
    if key not in groups:
      groups[key] = len(specs)
      specs.append((name, dict(kw)))
    index.append(groups[key])
  traced = []
  for i, (name, kw0) in enumerate(specs):
    members = [kw for (_, kw), j in zip(rules, index) if j == i]
    traced.append(
      tuple(sorted(k for k in TRACEABLE_KWARGS.get(name, ()) if k in kw0 and len({m.get(k) for m in members}) > 1))
    )
  values = tuple({hyper_key(j, k): float(kw[k]) for k in traced[j]} for (_, kw), j in zip(rules, index))
  return PointRules(tuple(specs), tuple(traced), tuple(index), values)


def _real(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
