"""Convolutions with a selectable lowering (docs/design.md, "Lowerings").

Three lowerings of the same math:

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
  forms (docs/design.md §6 measurements). The input and weight transposes are written
  out in the canonical NHWC/HWIO layout behind an optimization barrier: left to
  autodiff, XLA folds their transposes into the conv's dimension numbers, and
  inside a loop body (a rolled ``scan``, ``lax.map`` over clients) such a conv
  is not re-canonicalized and runs ~40x slower (docs/benchmarks.md).

* ``gemm``: every conv is im2col (strided slices of the padded input,
  concatenated on the feature axis) + ``dot_general``, and the transposed conv
  is its exact adjoint (``dot_general`` + col2im, an overlap-add of padded
  slices). Only slices, pads, adds and matmuls, so autodiff of any order
  (WGAN-GP, R1) stays in that form, and under ``vmap`` over per-client weights
  every matmul is a ``dot_general`` with the client axis as a batch dimension:
  one batched GEMM per layer for all clients, no grouped and no lhs-dilated
  convolution anywhere. Built for accelerators, where XLA:GPU runs the input
  gradient of a grouped conv and every lhs-dilated conv as a forward conv over
  a zero-inserted input (docs/benchmarks.md, GPU). In bf16 the operands are
  bf16 and XLA's GPU/TPU GEMMs accumulate in f32.

``auto`` picks per backend (``AUTO_IMPL``): ``fast_cpu`` on CPU (measured
fastest there), ``gemm`` on GPU and TPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

_DN = ("NHWC", "HWIO", "NHWC")

IMPLS = ("xla", "fast_cpu", "gemm")
# What ``auto`` resolves to, per backend. CPU: fast_cpu, 7x stock convs at 16 clients and
# 1.0-1.1x PyTorch (docs/benchmarks.md (a), (b)); gemm is ~0.5x PyTorch there. GPU: an
# im2col + batched-GEMM prototype ran the vmapped 64-client round 2.2x faster than stock
# convs on an H200 (docs/benchmarks.md, GPU); ``launch.device_check`` re-measures all three.
AUTO_IMPL = {"cpu": "fast_cpu", "gpu": "gemm", "cuda": "gemm", "rocm": "gemm", "tpu": "gemm"}


def resolve_impl(impl: str, backend: str | None = None) -> str:
  """Maps ``'auto'`` to the lowering for ``backend`` (default: JAX's default backend).

  Raises:
    ValueError: ``impl`` is not one of ``'auto'`` and ``IMPLS``.
  """
  if impl == "auto":
    return AUTO_IMPL.get(backend or jax.default_backend(), "gemm")
  if impl not in IMPLS:
    raise ValueError(f"model.conv_impl={impl!r}: accepted {['auto', *IMPLS]}.")
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
  return lax.conv_general_dilated(
    g, rhs, (1, 1), ((lo, hi[0]), (lo, hi[1])), lhs_dilation=(stride, stride), dimension_numbers=_DN
  )


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
  out = lax.conv_general_dilated(
    lhs, rhs, (1, 1), ((pad, hi[0]), (pad, hi[1])), rhs_dilation=(stride, stride), dimension_numbers=_DN
  )  # [Cin, k, k, Cout]
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


@functools.cache
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


def _out_size(n: int, k: int, stride: int, pad: int) -> int:
  return (n + 2 * pad - k) // stride + 1


def _taps(k: int, stride: int, out_hw: tuple[int, int]):
  """``(i, j, limits)`` of each kernel tap: the strided window of the padded input it reads."""
  span = [stride * (o - 1) + 1 for o in out_hw]
  return [(i, j, (i + span[0], j + span[1])) for i in range(k) for j in range(k)]


def _im2col(x, k: int, stride: int, pad: int):
  """``[B, H, W, C] -> [B, Ho, Wo, k*k*C]``: the patch of every output pixel, taps in HWI order.

  One strided slice of the zero-padded input per kernel tap; their transpose
  (autodiff, or ``_col2im``) is a pad with interior zeros, never a conv.
  """
  b, h, w, c = x.shape
  out_hw = (_out_size(h, k, stride, pad), _out_size(w, k, stride, pad))
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  cols = [
    lax.slice(xp, (0, i, j, 0), (b, hi, wj, c), (1, stride, stride, 1)) for i, j, (hi, wj) in _taps(k, stride, out_hw)
  ]
  return jnp.concatenate(cols, axis=-1)


def _col2im(cols, k: int, stride: int, pad: int, in_hw: tuple[int, int]):
  """The adjoint of ``_im2col``: ``[B, Ho, Wo, k*k*C] -> [B, H, W, C]`` by overlap-add.

  Each tap's columns are placed back on its strided window of the padded
  input (a pad with ``stride - 1`` interior zeros) and summed; the padding is
  then cropped.
  """
  b, ho, wo, kkc = cols.shape
  c = kkc // (k * k)
  hp, wp = in_hw[0] + 2 * pad, in_hw[1] + 2 * pad
  zero = jnp.zeros((), cols.dtype)
  out = None
  for t, (i, j, (hi, wj)) in enumerate(_taps(k, stride, (ho, wo))):
    part = lax.pad(
      cols[..., t * c : (t + 1) * c], zero, ((0, 0, 0), (i, hp - hi, stride - 1), (j, wp - wj, stride - 1), (0, 0, 0))
    )
    out = part if out is None else out + part
  return out[:, pad : pad + in_hw[0], pad : pad + in_hw[1], :]


def _gemm_conv(x, w, stride: int, pad: int):
  """``conv2d`` as im2col + one matmul: ``[B, Ho, Wo, kkC] @ [kkC, O]``."""
  k, _, cin, cout = w.shape
  return lax.dot_general(_im2col(x, k, stride, pad), w.reshape(k * k * cin, cout), (((3,), (0,)), ((), ())))


def _gemm_conv_transpose(y, w, stride: int, pad: int, in_hw: tuple[int, int]):
  """The adjoint of ``_gemm_conv(·, w)``: one matmul ``[B, Ho, Wo, O] @ [O, kkC]``, then col2im."""
  k, _, cin, cout = w.shape
  cols = lax.dot_general(y, w.reshape(k * k * cin, cout), (((3,), (1,)), ((), ())))
  return _col2im(cols, k, stride, pad, in_hw)


def conv2d(x, w, stride: int, pad: int, impl: str):
  """NHWC conv with HWIO weights, symmetric padding, lowering ``impl``."""
  if impl == "fast_cpu":
    return _fast_ops(stride, pad, w.shape[0], tuple(x.shape[1:3]))[0](x, w)
  if impl == "gemm":
    return _gemm_conv(x, w, stride, pad)
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
  if impl == "gemm":
    return _gemm_conv_transpose(y, w, stride, pad, hw)
  # Stock: the linear transpose of the conv, left to XLA (cuDNN) and autodiff.
  _, vjp = jax.vjp(lambda x: _conv(x, w, stride, pad), jnp.zeros((y.shape[0], *hw, w.shape[2]), y.dtype))
  return vjp(y)[0]


Dtype = Any
