"""fedgan_jax.flops: exact per-op rules against XLA's CPU cost analysis, loops, and a whole round."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import pytest

from conftest import tiny_config
from fedgan_jax import assemble, bench, flops
from fedgan_jax.models import layers


def _xla(fn, *args, compiled=True) -> float:
  lowered = jax.jit(fn).lower(*args)
  ca = lowered.compile().cost_analysis() if compiled else lowered.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca["flops"])


@pytest.mark.parametrize("hw,k,stride,pad", [(9, 4, 2, 1), (8, 4, 2, 0), (7, 3, 1, 1), (10, 3, 3, 2)])
def test_conv_rules_equal_xla_cost_analysis_exactly(hw, k, stride, pad):
  """A conv, its transposed conv (lhs-dilated: only real input elements count), its weight
  gradient and a vmapped (grouped) conv: the count equals XLA's CPU cost analysis."""
  x = jnp.ones((2, hw, hw + 1, 3))
  w = jnp.ones((k, k, 3, 5))
  conv = lambda a, b: layers._conv(a, b, stride, pad)
  y = jnp.ones(conv(x, w).shape)
  cases = [
    (conv, (x, w)),
    (lambda yy, b: jax.vjp(lambda a: conv(a, b), x)[1](yy)[0], (y, w)),
    (lambda a, b: jax.grad(lambda bb: jnp.sum(conv(a, bb) * y))(b), (x, w)),
    (jax.vmap(conv), (jnp.stack([x] * 3), jnp.stack([w] * 3))),
  ]
  for fn, args in cases:
    got = flops.count(fn, *args)
    # XLA folds the few elementwise ops of these snippets (a multiply by ones) away: the
    # convolution FLOPs are what must agree exactly.
    assert got.conv <= _xla(fn, *args) <= got.total
    assert got.conv > 0 and got.elementwise <= 0.05 * got.conv


def test_dot_rule_and_hand_counts():
  a, b = jnp.ones((3, 4, 5)), jnp.ones((3, 5, 6))
  f = lambda a, b: jnp.einsum("cij,cjk->cik", a, b)
  assert flops.count(f, a, b).dot == 2 * 3 * 4 * 6 * 5 == _xla(f, a, b)
  g = lambda x: jnp.sum(jnp.exp(x) * 2.0 + 1.0)
  c = flops.count(g, jnp.ones((10, 7)))
  assert (c.elementwise, c.transcendental, c.conv, c.dot) == (70 + 70 + 70, 70, 0, 0)


def test_loops_are_followed():
  w = jnp.ones((8, 8))
  body = lambda h, _: (jnp.tanh(h @ w), None)
  one = flops.count(lambda h: body(h, None)[0], jnp.ones((2, 8)))
  scanned = flops.count(lambda h: jax.lax.scan(body, h, None, length=5)[0], jnp.ones((2, 8)))
  assert scanned.dot == 5 * one.dot and scanned.total == 5 * one.total
  mapped = flops.count(lambda hs: jax.lax.map(lambda h: body(h, None)[0], hs), jnp.ones((4, 2, 8)))
  assert mapped.dot == 4 * one.dot
  looped = flops.count(
    lambda h: jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (body(c[0], None)[0], c[1] + 1), (h, 0))[0],
    jnp.ones((2, 8)),
  )
  assert looped.unknown_loops == 1 and looped.dot == one.dot  # Trip count unknown: the body once.


@pytest.fixture(scope="module")
def tiny_round():
  config = tiny_config(**{"train.regularizers.gradient_penalty": 10.0, "model.d_norm": "instance"})
  data, _, _ = assemble.setup_data(config)
  return config, data


def _with(config, **fields):
  c = copy.deepcopy(config)
  for dotted, v in fields.items():
    section, name = dotted.split("__")
    c[section][name] = v
  return c


def test_round_count_equals_xla_cost_analysis_of_the_loop_free_round(tiny_round):
  """The counted FLOPs of a whole round (G and D, forward, backward and the gradient
  penalty's double backward, the aggregation) against XLA's CPU cost analysis of the same
  loop-free round: equal to the pre-optimisation HLO's, within 10 % of the compiled one's
  (XLA expands e.g. the PRNG into integer arithmetic it counts as FLOPs)."""
  config, data = tiny_round
  flat = _with(config, model__conv_impl="xla", train__unroll="true", train__client_chunk=config.num_clients)
  program, _, _ = assemble.build_program(flat)
  state, key = program.init(jax.random.key(0)), jax.random.key(1)
  got = flops.count(program.round, state, data, key)
  assert got.unknown_loops == 0 and got.conv > 0.9 * got.total
  assert got.total == pytest.approx(_xla(program.round, state, data, key, compiled=False), rel=2e-3)
  assert got.total == pytest.approx(_xla(program.round, state, data, key), rel=0.1)
  # The same round with loops (clients in turn under lax.map, a rolled local-step scan) and in
  # any lowering counts the same work: bench.round_flops traces the model with stock convs.
  looping = _with(config, train__unroll="false", train__client_chunk=1, model__conv_impl="gemm")
  assert bench.round_flops(looping, state, data, key).total == pytest.approx(got.total, rel=1e-6)
