"""FLOPs of a JAX program counted from its operations' shapes, on any backend.

``count(fn, *args)`` traces ``fn`` to a jaxpr and adds up, per equation:

* ``conv_general_dilated``: 2 x the multiply-adds that touch real input
  elements (padding and the zeros of a dilated input are not counted), i.e.
  ``2 * batch/bgc * in_features/fgc * out_features * prod(valid spatial
  pairs)`` -- the rule of XLA's ``HloCostAnalysis``, so a transposed conv
  written as an lhs-dilated conv counts its useful work, not its zeros;
* ``dot_general``: ``2 * output size * contracted size``;
* elementwise arithmetic: one per output element; transcendentals (exp, log,
  tanh, logistic, sqrt, rsqrt, pow, ...) are counted apart, as XLA does;
* reductions: one per reduced input element;
* data movement (reshape, slice, pad, concatenate, transpose, gather,
  convert, broadcast, ...): none.

Control flow is followed: a ``scan`` counts its body ``length`` times, a
``cond`` its costliest branch, ``shard_map`` its per-device body once per
device; a ``while`` loop's trip count is unknown, so its body is counted once
and ``FlopCount.unknown_loops`` says how many such loops there were.

Why not XLA's cost analysis: on GPU it undercounts convolutions by three
orders of magnitude (convs become cuDNN custom calls), it counts a while body
once, and it is not available on every backend. This count is the same on
every backend and agrees with XLA's CPU cost analysis of the same loop-free
program (``tests/test_flops.py``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.extend  # noqa: F401  (jax.extend.core: Jaxpr types)
import numpy as np

try:  # Dead-code elimination, as XLA does before it counts (e.g. the primal conv a VJP traces).
  from jax._src.interpreters.partial_eval import dce_jaxpr as _dce_jaxpr
except ImportError:  # pragma: no cover - a JAX without it counts dead code too.
  _dce_jaxpr = None

_TRANSCENDENTAL = frozenset(
  {
    "exp",
    "exp2",
    "expm1",
    "log",
    "log1p",
    "tanh",
    "logistic",
    "sin",
    "cos",
    "tan",
    "asin",
    "acos",
    "atan",
    "atan2",
    "sinh",
    "cosh",
    "asinh",
    "acosh",
    "atanh",
    "sqrt",
    "rsqrt",
    "cbrt",
    "pow",
    "erf",
    "erfc",
    "erf_inv",
    "lgamma",
    "digamma",
  }
)
_ELEMENTWISE = frozenset(
  {
    "add",
    "add_any",
    "sub",
    "mul",
    "div",
    "rem",
    "neg",
    "abs",
    "sign",
    "max",
    "min",
    "floor",
    "ceil",
    "round",
    "nextafter",
    "integer_pow",
    "square",
    "reciprocal",
    "select_n",
    "clamp",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "and",
    "or",
    "not",
    "xor",
    "shift_left",
    "shift_right_logical",
    "shift_right_arithmetic",
    "is_finite",
    "population_count",
    "clz",
  }
)
_REDUCTIONS = frozenset(
  {
    "reduce_sum",
    "reduce_max",
    "reduce_min",
    "reduce_prod",
    "reduce_and",
    "reduce_or",
    "argmax",
    "argmin",
    "cumsum",
    "cumprod",
    "cummax",
    "cummin",
    "cumlogsumexp",
  }
)


class FlopCount(NamedTuple):
  """FLOPs of one program, by kind.

  Attributes:
    conv: convolutions (2 per multiply-add on real input elements).
    dot: ``dot_general`` (2 per multiply-add).
    elementwise: elementwise arithmetic and reductions (1 per element).
    transcendental: exp/log/tanh/... evaluations (not in ``total``, as in XLA).
    unknown_loops: ``while`` loops whose body was counted once.
  """

  conv: float = 0.0
  dot: float = 0.0
  elementwise: float = 0.0
  transcendental: float = 0.0
  unknown_loops: int = 0

  @property
  def total(self) -> float:
    """``conv + dot + elementwise``: what ``achieved_tflops`` divides."""
    return self.conv + self.dot + self.elementwise

  def __add__(self, other: FlopCount) -> FlopCount:  # type: ignore[override]
    return FlopCount(*(a + b for a, b in zip(self, other)))

  def scale(self, n: float) -> FlopCount:
    """Every FLOP kind times ``n`` (loop counters unchanged)."""
    return FlopCount(self.conv * n, self.dot * n, self.elementwise * n, self.transcendental * n, self.unknown_loops)

  def as_dict(self) -> dict[str, float]:
    return {"total": self.total, **self._asdict()}


def _size(aval) -> int:
  return int(math.prod(getattr(aval, "shape", ())))


def _valid_positions(in_size: int, out_size: int, k: int, stride: int, pad_lo: int, lhs_dil: int, rhs_dil: int) -> int:
  """(output, kernel-tap) pairs along one spatial axis that read a real (not padded/dilated) input."""
  o = np.arange(out_size)[:, None]
  t = np.arange(k)[None, :]
  idx = o * stride - pad_lo + t * rhs_dil
  real = (idx % lhs_dil == 0) & (idx >= 0) & (idx // lhs_dil < in_size)
  return int(real.sum())


def conv_flops(lhs_shape, rhs_shape, out_shape, params: dict[str, Any]) -> float:
  """FLOPs of one ``conv_general_dilated`` equation (XLA ``HloCostAnalysis`` rule)."""
  dn = params["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  batch = lhs_shape[lhs_spec[0]] // params.get("batch_group_count", 1)
  in_features = lhs_shape[lhs_spec[1]] // params.get("feature_group_count", 1)
  out_features = out_shape[out_spec[1]]
  n_sp = len(lhs_spec) - 2
  strides = params["window_strides"]
  padding = params["padding"]
  lhs_dil = params.get("lhs_dilation") or (1,) * n_sp
  rhs_dil = params.get("rhs_dilation") or (1,) * n_sp
  pairs = 1
  for a in range(n_sp):
    pairs *= _valid_positions(
      lhs_shape[lhs_spec[2 + a]],
      out_shape[out_spec[2 + a]],
      rhs_shape[rhs_spec[2 + a]],
      strides[a],
      padding[a][0],
      lhs_dil[a],
      rhs_dil[a],
    )
  return 2.0 * batch * in_features * out_features * pairs


def dot_flops(lhs_shape, out_shape, params: dict[str, Any]) -> float:
  """FLOPs of one ``dot_general`` equation: 2 x output size x contracted size."""
  (lhs_contract, _), _ = params["dimension_numbers"]
  return 2.0 * math.prod(out_shape) * math.prod(lhs_shape[d] for d in lhs_contract)


def _sub_jaxprs(params: dict[str, Any]):
  for v in params.values():
    for item in v if isinstance(v, (tuple, list)) else (v,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def count_jaxpr(jaxpr) -> FlopCount:
  """FLOPs of a (closed or open) jaxpr, following control flow (see module doc)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = FlopCount()
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    params = eqn.params
    if name == "conv_general_dilated":
      total += FlopCount(
        conv=conv_flops(eqn.invars[0].aval.shape, eqn.invars[1].aval.shape, eqn.outvars[0].aval.shape, params)
      )
    elif name == "dot_general":
      total += FlopCount(dot=dot_flops(eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape, params))
    elif name in _ELEMENTWISE:
      total += FlopCount(elementwise=float(_size(eqn.outvars[0].aval)))
    elif name in _TRANSCENDENTAL:
      total += FlopCount(transcendental=float(_size(eqn.outvars[0].aval)))
    elif name in _REDUCTIONS:
      total += FlopCount(elementwise=float(_size(eqn.invars[0].aval)))
    elif name == "scan":
      total += count_jaxpr(params["jaxpr"]).scale(params["length"])
    elif name == "cond":
      branches = [count_jaxpr(b) for b in params["branches"]]
      total += max(branches, key=lambda f: f.total)
    elif name == "while":
      body = count_jaxpr(params["body_jaxpr"]) + count_jaxpr(params["cond_jaxpr"])
      total += body._replace(unknown_loops=body.unknown_loops + 1)
    elif name == "shard_map":
      total += count_jaxpr(params["jaxpr"]).scale(params["mesh"].size)
    else:  # pjit, custom_jvp/vjp calls, remat, ...: their sub-programs, once.
      for sub in _sub_jaxprs(params):
        total += count_jaxpr(sub)
  return total


def count(fn: Callable[..., Any], *args, **kwargs) -> FlopCount:
  """FLOPs of ``fn(*args, **kwargs)`` (traced, not run; args may be ``ShapeDtypeStruct``s).

  Work whose result is never used (dead code, e.g. the forward conv inside a
  VJP that only needs the transpose) is removed first, as XLA removes it.
  """
  jaxpr = jax.make_jaxpr(fn)(*args, **kwargs).jaxpr
  if _dce_jaxpr is not None:
    jaxpr, _ = _dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
  return count_jaxpr(jaxpr)


_HLO_PATTERNS = {
  "feature_group_count": re.compile(r"feature_group_count = (\d+)"),
  "batch_group_count": re.compile(r"batch_group_count = (\d+)"),
  "lhs_dilate": re.compile(r"lhs_dilate = \[([\d, ]+)\]"),
}


def hlo_op_counts(lowered) -> dict[str, int]:
  """Convolutions (all / grouped / lhs-dilated) and ``dot_general``s in a lowered program.

  Read from its StableHLO text, before XLA's backend rewrites (which turn
  them into library calls), so the counts say which lowering the program
  uses on any backend.
  """
  text = lowered.as_text()
  convs = [line for line in text.splitlines() if "stablehlo.convolution" in line]

  def over_one(pattern, line):
    return any(int(v) > 1 for m in pattern.findall(line) for v in m.split(","))

  return {
    "convolution": len(convs),
    "grouped_convolution": sum(
      over_one(_HLO_PATTERNS["feature_group_count"], line) or over_one(_HLO_PATTERNS["batch_group_count"], line)
      for line in convs
    ),
    "lhs_dilated_convolution": sum(over_one(_HLO_PATTERNS["lhs_dilate"], line) for line in convs),
    "dot_general": text.count("stablehlo.dot_general") + text.count("stablehlo.dot "),
  }
