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
  forms (DESIGN §6 measurements). The input and weight transposes are written
  out in the canonical NHWC/HWIO layout behind an optimization barrier: left to
  autodiff, XLA folds their transposes into the conv's dimension numbers, and
  inside a loop body (a rolled ``scan``, ``lax.map`` over clients) such a conv
  is not re-canonicalized and runs ~40x slower (docs/benchmarks.md).

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
  """Transpose of ``_conv`` w.r.t. its input: maps an output cotangent to the input space.

  An lhs-dilated conv with the spatially flipped, in/out-swapped kernel, written
  out (with a barrier, see ``_conv_weight_t``) so the kernel is in the layout
  XLA:CPU's library kernels take, in or out of a loop body.
  """
  k = w.shape[0]
  rhs = jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2))  # [k, k, out, in] -> flipped [k, k, in, out]
  g, rhs = lax.optimization_barrier((g, rhs))
  lo = k - 1 - pad
  hi = [in_hw[a] - (g.shape[1 + a] - 1) * stride - 1 - lo + k - 1 for a in (0, 1)]
  return lax.conv_general_dilated(g, rhs, (1, 1), ((lo, hi[0]), (lo, hi[1])), lhs_dilation=(stride, stride),
                                  dimension_numbers=_DN)


def _conv_weight_t(x, g, w_shape, stride: int, pad: int):
  """Gradient of ``<g, conv(x, w)>`` w.r.t. ``w`` (a plain conv weight gradient).

  Written as the canonical conv XLA:CPU runs through its library kernels: the
  image batch becomes the contracted feature axis, the input channels the conv
  batch, the stride a kernel dilation. The barrier keeps XLA from folding the
  two transposes back into the conv's dimension numbers, which inside a loop
  body (rolled ``scan``/``map``) leaves a non-canonical conv on a slow path.
  """
  k = w_shape[0]
  lhs = jnp.transpose(x, (3, 1, 2, 0))  # [Cin, H, W, N]
  rhs = jnp.transpose(g, (1, 2, 0, 3))  # [Ho, Wo, N, Cout]
  lhs, rhs = lax.optimization_barrier((lhs, rhs))
  hi = [k + stride * (g.shape[1 + a] - 1) - x.shape[1 + a] - pad for a in (0, 1)]
  out = lax.conv_general_dilated(lhs, rhs, (1, 1), ((pad, hi[0]), (pad, hi[1])), rhs_dilation=(stride, stride),
                                 dimension_numbers=_DN)  # [Cin, k, k, Cout]
  return jnp.transpose(out, (1, 2, 0, 3))


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
def _fast_ops(stride: int, pad: int, k: int, in_hw: tuple[int, int]):
  """The three bilinear ops of a conv, closed under differentiation.

  ``conv(x, w)``, its input transpose ``tin(g, w)`` and its weight transpose
  ``tw(x, g)``: each one's VJP is expressed with the other two, so gradients of
  any order (e.g. WGAN-GP's gradient of an input gradient) stay on plain
  convolutions with the per-client lowering. With ``A_w x = conv(x, w)``:

  * ``<g, A_w x>``: d/dx = ``tin(g, w)``, d/dw = ``tw(x, g)``;
  * ``<h, A_w^T g> = <A_w h, g>``: d/dg = ``conv(h, w)``, d/dw = ``tw(h, g)``;
  * ``<V, tw(x, g)> = <g, A_V x>``: d/dx = ``tin(g, V)``, d/dg = ``conv(x, V)``.

  Args:
    stride, pad, k: conv geometry (square kernel ``k``).
    in_hw: spatial size of the conv's input ``x`` (needed by ``tin``).
  """
  conv_p = _per_client(lambda x, w: _conv(x, w, stride, pad))
  tin_p = _per_client(lambda g, w: _conv_input_t(g, w, stride, pad, in_hw))
  tw_p = _per_client(lambda x, g: _conv_weight_t(x, g, (k, k, x.shape[-1], g.shape[-1]), stride, pad))

  @jax.custom_vjp
  def conv(x, w):
    return conv_p(x, w)

  @jax.custom_vjp
  def tin(g, w):
    return tin_p(g, w)

  @jax.custom_vjp
  def tw(x, g):
    return tw_p(x, g)

  conv.defvjp(lambda x, w: (conv(x, w), (x, w)), lambda r, g: (tin(g, r[1]), tw(r[0], g)))
  tin.defvjp(lambda g, w: (tin(g, w), (g, w)), lambda r, h: (conv(h, r[1]), tw(h, r[0])))
  tw.defvjp(lambda x, g: (tw(x, g), (x, g)), lambda r, v: (tin(r[1], v), conv(r[0], v)))
  # The forward rules call the custom_vjp ops themselves (not the raw primals), so an
  # outer differentiation (gradient penalty) sees differentiable forwards too.
  return conv, tin, tw


def conv2d(x, w, stride: int, pad: int, impl: str):
  """NHWC conv with HWIO weights, symmetric padding, lowering ``impl``."""
  if impl == "fast_cpu":
    return _fast_ops(stride, pad, w.shape[0], tuple(x.shape[1:3]))[0](x, w)
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
  hw = (y.shape[1] * stride, y.shape[2] * stride)
  if impl == "fast_cpu":
    return _fast_ops(stride, pad, w.shape[0], hw)[1](y, w)
  # Stock: the linear transpose of the conv, left to XLA (cuDNN) and autodiff.
  _, vjp = jax.vjp(lambda x: _conv(x, w, stride, pad), jnp.zeros((y.shape[0], *hw, w.shape[2]), y.dtype))
  return vjp(y)[0]


Dtype = Any
