"""The sliced Wasserstein distance on the device: ``metrics.swd``'s computation in jitted float32.

On the host-drawn image choice, patch positions and directions of
``metrics.swd``, so it equals the NumPy float64 path to ~1e-7 relative; used
on accelerators, where the generated samples already are (XLA:CPU's sort is
~18x slower than NumPy's, so CPUs keep the NumPy path).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_BINOMIAL5 = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0  # separable cv2.pyrDown kernel, as in metrics.swd


def blur(x: jax.Array, gain: float = 1.0) -> jax.Array:
  k = [float(v) for v in _BINOMIAL5 * np.sqrt(gain)]
  h, w = x.shape[1:3]
  p = jnp.pad(x, ((0, 0), (2, 2), (0, 0), (0, 0)), mode="reflect")  # reflect-101, as numpy
  x = sum(k[i] * p[:, i : i + h] for i in range(5))
  p = jnp.pad(x, ((0, 0), (0, 0), (2, 2), (0, 0)), mode="reflect")
  return sum(k[i] * p[:, :, i : i + w] for i in range(5))


def laplacian_pyramid(x: jax.Array, levels: int) -> list[jax.Array]:
  pyr = [x]
  for _ in range(1, levels):
    pyr.append(blur(pyr[-1])[:, ::2, ::2])
    h, w = pyr[-2].shape[1:3]
    # Zeros between samples by interior padding (no scatter), then the ×4 kernel.
    up = jax.lax.pad(pyr[-1], jnp.zeros((), x.dtype), ((0, 0, 0), (0, 1, 1), (0, 1, 1), (0, 0, 0)))
    pyr[-2] = pyr[-2] - blur(up, gain=4.0)[:, :h, :w]
  return pyr


def finalize(desc: jax.Array) -> jax.Array:
  """``metrics.swd._finalize`` in float32 (XLA reduces in a tree, accurate enough here)."""
  desc = desc - desc.mean(axis=(0, 1, 2), keepdims=True)
  std = jnp.sqrt(jnp.mean(desc * desc, axis=(0, 1, 2), keepdims=True))
  desc = desc / jnp.where(std > 0, std, 1.0)
  return desc.reshape(desc.shape[0], -1)


@functools.partial(jax.jit, static_argnames=("patch_size",))
def sorted_projections(images, ys, xs, directions, *, patch_size: int):
  """Sorted projections of one set, per level.

  Args:
    images: float32 ``[n, H, W, C]``, the chosen images in order.
    ys: per level, patch centre rows ``[n * patches_per_image]``.
    xs: per level, patch centre columns, same shape.
    directions: per level, float32 ``[repeats * dirs, patch_size² C]``.
    patch_size: patch side.

  Returns:
    Per level, float32 ``[repeats * dirs, n * patches_per_image]``, sorted
    along the last axis.
  """
  n = images.shape[0]
  img_idx = jnp.repeat(jnp.arange(n), ys[0].shape[0] // n)[:, None, None]
  off = jnp.arange(-(patch_size // 2), patch_size // 2 + 1)
  out = []
  for level, y, x, d in zip(laplacian_pyramid(images, len(ys)), ys, xs, directions):
    rows, cols = (y[:, None] + off)[:, :, None], (x[:, None] + off)[:, None, :]
    desc = finalize(level[img_idx, rows, cols])  # [M, size, size, C] gathered
    # HIGHEST: no TF32/bf16 passes on GPUs, the projections must stay float32-exact.
    proj = jnp.matmul(d, desc.T, precision=jax.lax.Precision.HIGHEST)
    out.append(jnp.sort(proj, axis=1))
  return tuple(out)


@functools.partial(jax.jit, static_argnames=("repeats",))
def swd_sorted(sorted_a, sorted_b, *, repeats: int) -> jax.Array:
  """``metrics.swd._swd_sorted`` per level -> ``[levels]`` (row means first: short sums)."""
  return jnp.stack(
    [jnp.abs(a - b).mean(axis=1).reshape(repeats, -1).mean(axis=1).mean() for a, b in zip(sorted_a, sorted_b)]
  )
