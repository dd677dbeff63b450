"""Several rules and traced rule hyperparameters in one program (fedgan_jax/aggregation/choice.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_aggregation import RULE_KWARGS, make_clients, make_global, make_stats, with_client

from fedgan_jax import aggregation
from fedgan_jax.aggregation import choice
from fedgan_jax.aggregation.base import Aggregator, EmptyState, stateless_init

C = 7

# The traceable hyperparameters of the first point of each rule (given, so that a second point of other values,
# OTHER_VALUES, is the same rule with those values traced per point).
FIRST_VALUES = {
  "detect": {"decay": 0.9, "threshold": 0.5},
  "norm_clip": {"max_norm": 1.0},
  "centered_clip": {"tau": 1.0},
  "dp_mean": {"clip_norm": 1.0, "noise_multiplier": 0.0},
  "foolsgold": {"kappa": 1.0},
  "rlr": {"server_lr": 1.0},
}
OTHER_VALUES = {
  "detect": {"decay": 0.3, "threshold": 0.45},
  "norm_clip": {"max_norm": 0.2},
  "centered_clip": {"tau": 0.05},
  "dp_mean": {"clip_norm": 0.1, "noise_multiplier": 0.7},
  "foolsgold": {"kappa": 3.0},
  "rlr": {"server_lr": 0.5},
}


def test_point_rules_group_points_by_their_static_kwargs():
  rules = choice.point_rules(
    [
      ("mean", {}),
      ("detect", {"decay": 0.5}),
      ("detect", {"decay": 0.9}),
      ("detect", {}),  # The factory's default decay: another rule (nothing to trace).
      ("trimmed_mean", {"beta": 0.1}),  # beta sets how many clients are cut (a shape): not traceable.
      ("trimmed_mean", {"beta": 0.2}),
      ("detect", {"decay": 0.5}),
    ]
  )
  assert rules.specs == (
    ("mean", {}),
    ("detect", {"decay": 0.5}),
    ("detect", {}),
    ("trimmed_mean", {"beta": 0.1}),
    ("trimmed_mean", {"beta": 0.2}),
  )
  assert rules.index == (0, 1, 1, 2, 3, 4, 1) and rules.traced == ((), ("decay",), (), (), ())
  hyper = rules.hyper()
  assert sorted(hyper) == ["aggregation/1/decay", "aggregation/rule"]
  np.testing.assert_array_equal(hyper["aggregation/rule"], [0, 1, 1, 2, 3, 4, 1])
  # Points of other rules carry rule 1's first value (read by nobody, and a valid decay).
  np.testing.assert_allclose(hyper["aggregation/1/decay"], [0.5, 0.5, 0.9, 0.5, 0.5, 0.5, 0.5])
  one = choice.point_rules([("detect", {"decay": 0.5}), ("detect", {"decay": 0.9})])
  assert one.active and len(one.specs) == 1 and sorted(one.hyper()) == ["aggregation/0/decay"]
  assert not choice.point_rules([("mean", {}), ("mean", {})]).active


def _points():
  """(name, kwargs) of every rule that may share a program, plus a second point of each traceable one."""
  names = [n for n in sorted(RULE_KWARGS) if choice.choosable(n)]
  points = [(n, {**RULE_KWARGS[n], **FIRST_VALUES.get(n, {})}) for n in names]
  points += [(n, {**RULE_KWARGS[n], **OTHER_VALUES[n]}) for n in sorted(OTHER_VALUES)]
  return points


def test_every_rule_keeps_its_own_result_in_one_program_of_all_rules():
  """All registered rules but FLTrust (and the traceable ones twice, other values traced) as ONE vmapped program
  of 3 rounds: every point's new global, own diagnostics and own state equal its rule built from Python values."""
  points = _points()
  assert set(choice.TRACEABLE_KWARGS) <= {n for n, _ in points}
  rules = choice.point_rules(points)
  assert len(rules.specs) == len(points) - len(OTHER_VALUES)  # Traced values share their rule.
  K = len(points)
  rng = np.random.default_rng(0)
  g = make_global(rng)
  base = rules.base(C)
  state = jax.tree.map(lambda x: jnp.stack([x] * K), base.init(g))

  def step(state, hyper, g, cp, stats, key):
    return rules.build(hyper, C).aggregate(state, g, cp, stats, key)

  packed = jax.jit(jax.vmap(step, in_axes=(0, 0, None, None, None, None)))
  own = [aggregation.get(n, num_clients=C, **kw) for n, kw in points]
  own_state = [a.init(g) for a in own]
  hyper = rules.hyper()
  for r in range(3):
    cp = with_client(make_clients(rng, g), 0, lambda x: x + 3.0)  # Client 0 an outlier: flagged, decayed.
    stats = make_stats(rng)
    stats["g_loss"][0] = 5.0
    key = jax.random.key(r)
    new_g, state, diag = packed(state, hyper, g, cp, stats, key)
    for k, (name, kw) in enumerate(points):
      want_g, own_state[k], want_diag = jax.jit(own[k].aggregate)(own_state[k], g, cp, stats, key)
      where = f"round {r} point {k} {name} {kw}"
      for got, want in zip(jax.tree.leaves(new_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(got[k], want, rtol=1e-5, atol=1e-6, err_msg=where)
      for key_name, want in want_diag.items():
        np.testing.assert_allclose(
          np.asarray(diag[key_name][k], float), np.asarray(want, float), rtol=1e-5, atol=1e-6, err_msg=where
        )
      mine = jax.tree.map(lambda x: x[k], state[rules.index[k]])
      for got, want in zip(jax.tree.leaves(mine), jax.tree.leaves(own_state[k])):
        np.testing.assert_allclose(np.asarray(got, float), np.asarray(want, float), rtol=1e-5, atol=1e-6)
    g = jax.tree.map(lambda x: np.asarray(x[0]), new_g)  # Every point goes on from point 0's model.
  # The traced values did change the results (else the second points could not tell them apart).
  first, second = {}, {}
  for k, (n, _) in enumerate(points):
    if n in OTHER_VALUES:
      first.setdefault(n, k)
      second[n] = k
  outputs = lambda k: [x[k] for x in jax.tree.leaves((new_g, diag))]
  same = lambda a, b: np.allclose(a, b, equal_nan=True)
  differ = [n for n in OTHER_VALUES if not all(map(same, outputs(first[n]), outputs(second[n])))]
  assert set(differ) == set(OTHER_VALUES)


def test_one_of_refuses_rules_that_report_one_diagnostic_differently():
  def rule(shape):
    def aggregate(state, g, cp, stats, key):
      del cp, stats, key
      return g, state, {"weights": jnp.ones(shape), "flagged": jnp.zeros(3, bool)}

    return Aggregator(stateless_init, aggregate)

  agg = choice.one_of([rule((3,)), rule((2,))], jnp.int32(1))
  g = {"w": jnp.zeros(2)}
  with pytest.raises(ValueError, match=r"diagnostic 'weights' as float32\[3\] and \(rule 1\) float32\[2\]"):
    agg.aggregate((EmptyState(), EmptyState()), g, {"w": jnp.zeros((3, 2))}, {}, jax.random.key(0))


def test_traced_values_reach_the_factories_but_python_values_are_still_checked():
  with pytest.raises(ValueError, match=r"aggregation.kwargs.decay=1.5: must be in \(0, 1\]"):
    aggregation.get("detect", num_clients=3, decay=1.5)
  with pytest.raises(ValueError, match=r"aggregation.kwargs.tau=True: must be a finite number > 0"):
    aggregation.get("centered_clip", tau=True)

  @jax.jit
  def clipped(max_norm, cp):
    agg = aggregation.get("norm_clip", max_norm=max_norm)
    return agg.aggregate(agg.init(None), {"w": jnp.zeros(2)}, cp, {"num_examples": jnp.ones(2)}, jax.random.key(0))

  new, _, diag = clipped(jnp.float32(0.5), {"w": jnp.asarray([[3.0, 4.0], [0.15, 0.2]])})
  np.testing.assert_allclose(new["w"], [(0.3 + 0.15) / 2, (0.4 + 0.2) / 2], rtol=1e-6)
  np.testing.assert_array_equal(diag["clipped"], [True, False])
