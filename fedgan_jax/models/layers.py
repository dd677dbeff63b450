"""Convolutions with a selectable lowering (DESIGN §6).

Two lowerings of the same math:

* ``xla``: plain ``lax.conv_general_dilated`` with autodiff; under ``vmap`` over
  per-client weights XLA emits a grouped convolution. Right where cuDNN serves
  convs (GPU).
* ``fast_cpu``: every conv is a ``custom_vjp`` whose forward and backward are
  plain convolutions, each wrapped in a ``custom_vmap`` rule that emits one
  ordinary conv per client instead of a grouped conv when the weights are
  batched over clients. The 4x4 stride-2 transposed conv is written as the
  adjoint of the stride-2 conv, so its weight gradient is an ordinary conv
  weight gradient with input and output-gradient roles swapped. On XLA:CPU the
  grouped conv and the lhs-dilated weight gradient are 4-12x slower than these
  forms (DESIGN §6 measurements).

``auto`` picks ``fast_cpu`` on the CPU backend and ``xla`` elsewhere.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

_DN = ("NHWC", "HWIO", "NHWC")


def resolve_impl(impl: str) -> str:
  """Maps ``'auto'`` to the lowering for the default backend."""
  if impl == "auto":
    return "fast_cpu" if jax.default_backend() == "cpu" else "xla"
  if impl not in ("xla", "fast_cpu"):
    raise ValueError(f"model.conv_impl={impl!r}: accepted 'auto', 'xla', 'fast_cpu'.")
  return impl


def _conv(x, w, stride: int, pad: int):
  return lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=_DN)


def _conv_input_t(g, w, stride: int, pad: int, in_hw: tuple[int, int]):
  """Transpose of ``_conv`` w.r.t. its input: maps an output cotangent to the input space."""
  shape = (g.shape[0], in_hw[0], in_hw[1], w.shape[2])
  _, vjp = jax.vjp(lambda x: _conv(x, w, stride, pad), jnp.zeros(shape, g.dtype))
  return vjp(g)[0]


def _conv_weight_t(x, g, w_shape, stride: int, pad: int):
  """Gradient of ``<g, conv(x, w)>`` w.r.t. ``w`` (a plain conv weight gradient)."""
  _, vjp = jax.vjp(lambda w: _conv(x, w, stride, pad), jnp.zeros(w_shape, x.dtype))
  return vjp(g)[0]


def _per_client(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """Wraps a two-array op so that vmap emits one op per client, not a grouped op.

  If only the first (activation) argument is batched, the client axis is folded
  into the image batch (one larger ordinary op); if the weight-like argument is
  batched, the op is emitted once per client (C static), then stacked.
  """

  @jax.custom_batching.custom_vmap
  def op(a, b):
    return fn(a, b)

  @op.def_vmap
  def rule(axis_size, in_batched, a, b):
    a_b, b_b = in_batched
    if a_b and not b_b:
      n = a.shape[1]
      out = op(a.reshape((axis_size * n,) + a.shape[2:]), b)
      return out.reshape((axis_size, n) + out.shape[1:]), True
    outs = [op(a[c] if a_b else a, b[c] if b_b else b) for c in range(axis_size)]
    return jnp.stack(outs), True

  return op


@functools.lru_cache(maxsize=None)
def _fast_conv(stride: int, pad: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """``conv(x, w)`` with the per-client lowering in forward and backward."""

  def forward(x, w):
    return _per_client(lambda xx, ww: _conv(xx, ww, stride, pad))(x, w)

  @jax.custom_vjp
  def conv(x, w):
    return forward(x, w)

  def fwd(x, w):
    return forward(x, w), (x, w)

  def bwd(res, g):
    x, w = res
    in_hw = x.shape[1:3]
    dx = _per_client(lambda gg, ww: _conv_input_t(gg, ww, stride, pad, in_hw))(g, w)
    dw = _per_client(lambda xx, gg: _conv_weight_t(xx, gg, w.shape, stride, pad))(x, g)
    return dx, dw

  conv.defvjp(fwd, bwd)
  return conv


@functools.lru_cache(maxsize=None)
def _fast_conv_transpose(stride: int, pad: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The adjoint of ``conv(·, w)`` (a transposed conv), with plain-conv gradients.

  ``w`` has the layout of the forward conv it is the adjoint of: ``[k, k, out, in]``
  maps an ``in``-channel ``[B, H, W, in]`` input to ``[B, H*s, W*s, out]``.
  """

  def forward(y, w):
    hw = (y.shape[1] * stride, y.shape[2] * stride)
    return _per_client(lambda yy, ww: _conv_input_t(yy, ww, stride, pad, hw))(y, w)

  @jax.custom_vjp
  def conv_t(y, w):
    return forward(y, w)

  def fwd(y, w):
    return forward(y, w), (y, w)

  def bwd(res, g):
    y, w = res
    # <g, T_w y> = <conv(g, w), y>: the input gradient is a strided conv of g, the
    # weight gradient is conv's weight gradient with input g and cotangent y.
    dy = _per_client(lambda gg, ww: _conv(gg, ww, stride, pad))(g, w)
    dw = _per_client(lambda gg, yy: _conv_weight_t(gg, yy, w.shape, stride, pad))(g, y)
    return dy, dw

  conv_t.defvjp(fwd, bwd)
  return conv_t


def conv2d(x, w, stride: int, pad: int, impl: str):
  """NHWC conv with HWIO weights, symmetric padding, lowering ``impl``."""
  if impl == "fast_cpu":
    return _fast_conv(stride, pad)(x, w)
  return _conv(x, w, stride, pad)


def conv2d_transpose(y, w, stride: int, pad: int, impl: str):
  """Adjoint of ``conv2d(·, w, stride, pad)``: PyTorch ``ConvTranspose2d(k, stride, pad)``.

  Args:
    y: ``[B, H, W, in]``.
    w: ``[k, k, out, in]`` (the forward conv's HWIO layout).
    stride: upsampling factor.
    pad: the forward conv's padding.
    impl: lowering.

  Returns:
    ``[B, H*stride, W*stride, out]``.
  """
  if impl == "fast_cpu":
    return _fast_conv_transpose(stride, pad)(y, w)
  hw = (y.shape[1] * stride, y.shape[2] * stride)
  return _conv_input_t(y, w, stride, pad, hw)


Dtype = Any
