"""Sliced Wasserstein distance between Laplacian-pyramid patch distributions of two image sets.

PGGAN's metric (Karras et al., "Progressive Growing of GANs for Improved
Quality, Stability, and Variation", ICLR 2018, ``metrics/sliced_wasserstein.py``
of their code), on images ``[N, H, W, C]`` in [-1, 1]. Host-side NumPy in
float64 by default, seeded; a jitted float32 ``jax.numpy`` path
(``backend='jax'``) runs it on accelerators, and a reusable reference side
(:func:`swd_reference`) serves repeated comparisons with the same real images
(the evaluations of a run).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from fedgan_jax.metrics import swd_jax

__all__ = ["sliced_wasserstein", "swd_reference", "SlicedWasserstein", "SwdReference"]


_BINOMIAL5 = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0  # separable cv2.pyrDown kernel


def _blur(x: np.ndarray, gain: float = 1.0) -> np.ndarray:
  """5x5 binomial filter (sum ``gain``) on [N, H, W, C], mirror (reflect-101) borders."""
  k = _BINOMIAL5 * np.sqrt(gain)
  p = np.pad(x, ((0, 0), (2, 2), (0, 0), (0, 0)), mode="reflect")
  x = sum(k[i] * p[:, i : i + x.shape[1]] for i in range(5))
  p = np.pad(x, ((0, 0), (0, 0), (2, 2), (0, 0)), mode="reflect")
  return sum(k[i] * p[:, :, i : i + x.shape[2]] for i in range(5))


def _pyr_down(x: np.ndarray) -> np.ndarray:
  return _blur(x)[:, ::2, ::2]


def _pyr_up(x: np.ndarray) -> np.ndarray:
  n, h, w, c = x.shape
  up = np.zeros((n, 2 * h, 2 * w, c), x.dtype)
  up[:, ::2, ::2] = x
  return _blur(up, gain=4.0)  # kernel ×4 as in cv2.pyrUp (zeros between samples)


def _laplacian_pyramid(x: np.ndarray, levels: int) -> list[np.ndarray]:
  pyr = [x]
  for _ in range(1, levels):
    pyr.append(_pyr_down(pyr[-1]))
    h, w = pyr[-2].shape[1:3]
    pyr[-2] = pyr[-2] - _pyr_up(pyr[-1])[:, :h, :w]
  return pyr


def _level_shapes(h: int, w: int, levels: int) -> list[tuple[int, int]]:
  """``(H, W)`` of each pyramid level: ``_pyr_down`` keeps every other row/column."""
  shapes = [(h, w)]
  for _ in range(1, levels):
    h, w = (h + 1) // 2, (w + 1) // 2
    shapes.append((h, w))
  return shapes


def _chosen_images(num: int, n: int, seed: int) -> np.ndarray:
  """The ``n`` images of a set of ``num`` that enter the comparison, in index order.

  All of them when ``num == n``; otherwise a seeded random subset. At most one
  of the two sets is larger than ``n = min(N_a, N_b)``, so the subset is the
  first draw of its generator whichever side it is on, and each side can be
  computed on its own.
  """
  if num == n:
    return np.arange(num)
  return np.sort(np.random.default_rng(np.random.SeedSequence([seed, 0])).permutation(num)[:n])


def _patch_positions(h: int, w: int, m: int, size: int, seed: int, lvl: int):
  """Centres ``(ys, xs)``, each ``[m]``, of the patches of level ``lvl`` (both sets share them)."""
  rng = np.random.default_rng(np.random.SeedSequence([seed, 1, lvl]))
  half = size // 2
  ys = rng.integers(half, h - half, size=m)
  xs = rng.integers(half, w - half, size=m)
  return ys, xs


def _patches(level: np.ndarray, img_idx: np.ndarray, ys: np.ndarray, xs: np.ndarray, size: int) -> np.ndarray:
  """``size x size`` patches centred at ``(ys, xs)`` of images ``img_idx`` -> [M, size, size, C]."""
  half = size // 2
  off = np.arange(-half, half + 1)
  rows = (ys[:, None] + off[None, :])[:, :, None]
  cols = (xs[:, None] + off[None, :])[:, None, :]
  return level[img_idx[:, None, None], rows, cols]


def _finalize(desc: np.ndarray) -> np.ndarray:
  """Per-channel standardisation over all patches and pixels, then flatten."""
  desc = desc - desc.mean(axis=(0, 1, 2), keepdims=True)
  std = desc.std(axis=(0, 1, 2), keepdims=True)
  desc = desc / np.where(std > 0, std, 1.0)
  return desc.reshape(desc.shape[0], -1).astype(np.float32)


def _directions(dim: int, seed: int, lvl: int, repeats: int, dirs: int) -> list[np.ndarray]:
  """Random unit directions of level ``lvl``: ``repeats`` float32 arrays ``[dirs, dim]``."""
  rng = np.random.default_rng(np.random.SeedSequence([seed, 2, lvl]))
  out = []
  for _ in range(repeats):
    d = rng.standard_normal((dim, dirs))
    d /= np.sqrt((d * d).sum(axis=0, keepdims=True))
    # A transposed view, as the projections have always been computed with it
    # (the BLAS call, hence the float32 rounding, depends on the layout).
    out.append(d.astype(np.float32).T)
  return out


def _sorted_projections(desc: np.ndarray, directions: list[np.ndarray]) -> list[np.ndarray]:
  # [dirs, M] so each direction's projections are sorted contiguously.
  return [np.sort(d @ desc.T, axis=1) for d in directions]


def _swd_sorted(sorted_a: list[np.ndarray], sorted_b: list[np.ndarray]) -> float:
  """Mean over direction batches of the mean absolute difference of sorted projections."""
  return float(np.mean([np.abs(pa - pb).mean() for pa, pb in zip(sorted_a, sorted_b)]))


class SlicedWasserstein(NamedTuple):
  """Result of :func:`sliced_wasserstein` (all values ×1e3, as in PGGAN)."""

  resolutions: tuple[int, ...]  # pyramid level resolutions, finest first
  per_level: tuple[float, ...]  # SWD×1e3 per level, same order
  mean: float  # average over levels ("SWDx1e3_avg")


_SWD_DEFAULTS = dict(patch_size=7, patches_per_image=128, dir_repeats=4, dirs_per_repeat=128, min_resolution=16, seed=0)
_SWD_BACKENDS = ("numpy", "jax")


def _check_images(shape, name: str) -> None:
  if len(shape) != 4:
    raise ValueError(f"{name} must be [N, H, W, C], got shape {tuple(shape)}")


class SwdReference:
  """The reference side of :func:`sliced_wasserstein`, computed once and reused.

  Holds everything that depends only on the reference images and the
  settings: the directions, and, for the size ``n = min(N_ref, N_other)`` of
  the last comparison, the chosen images, the patch positions and the sorted
  projections of the reference's standardised patch descriptors (per
  backend). :meth:`distance` then only computes the other side, and returns
  exactly what ``sliced_wasserstein(reference_images, other, ...)`` returns
  (bit for bit with ``backend='numpy'``). A comparison with another ``n``
  recomputes the reference side for it (the positions depend on ``n``).

  The sorted projections take ``levels × dir_repeats × dirs_per_repeat × n ×
  patches_per_image`` float32 values: 134 MB per level at the defaults with
  ``n = 512`` (on the device for ``backend='jax'``).

  Args:
    images: ``[N, H, W, C]`` reference images (e.g. held-out real images);
      kept as a float32 host array (no copy if already one).
    patch_size: see :func:`sliced_wasserstein`.
    patches_per_image: see :func:`sliced_wasserstein`.
    dir_repeats: see :func:`sliced_wasserstein`.
    dirs_per_repeat: see :func:`sliced_wasserstein`.
    min_resolution: see :func:`sliced_wasserstein`.
    seed: see :func:`sliced_wasserstein`.
    num_other: size of the sets it will be compared with, to prepare the
      reference side now (default: ``N``; any size works later).
    backend: the backend to prepare for now (``'numpy'`` or ``'jax'``).
  """

  def __init__(
    self,
    images,
    *,
    patch_size: int = 7,
    patches_per_image: int = 128,
    dir_repeats: int = 4,
    dirs_per_repeat: int = 128,
    min_resolution: int = 16,
    seed: int = 0,
    num_other: int | None = None,
    backend: str = "numpy",
  ):
    x = np.asarray(images, np.float32)
    _check_images(x.shape, "images")
    if patch_size < 1 or patch_size % 2 == 0:
      raise ValueError(f"patch_size must be odd and positive, got {patch_size}")
    n, h, w, c = x.shape
    if min(h, w) < max(min_resolution, patch_size):
      raise ValueError(f"images of {h}x{w} are smaller than min_resolution={min_resolution} or patch_size={patch_size}")
    if n < 1:
      raise ValueError("images must be non-empty")
    self.images = x
    self.settings = dict(
      patch_size=patch_size,
      patches_per_image=patches_per_image,
      dir_repeats=dir_repeats,
      dirs_per_repeat=dirs_per_repeat,
      min_resolution=min_resolution,
      seed=seed,
    )
    resolutions = []
    res = min(h, w)
    while res >= min_resolution:
      resolutions.append(res)
      res //= 2
    self.resolutions = tuple(resolutions)
    self._shapes = _level_shapes(h, w, len(resolutions))
    self._dirs = [
      _directions(patch_size * patch_size * c, seed, lvl, dir_repeats, dirs_per_repeat)
      for lvl in range(len(resolutions))
    ]
    self._sides: dict[str, dict[str, Any]] = {}  # backend -> prepared reference side
    self._side(n if num_other is None else num_other, backend)

  def _draws(self, n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    m = n * self.settings["patches_per_image"]
    pos = [
      _patch_positions(h, w, m, self.settings["patch_size"], self.settings["seed"], lvl)
      for lvl, (h, w) in enumerate(self._shapes)
    ]
    return [p[0] for p in pos], [p[1] for p in pos]

  def prepare(self, num_other: int, backend: str = "numpy") -> SwdReference:
    """Computes the reference side for sets of ``num_other`` images, unless cached.

    Args:
      num_other: size of the other set (>= 1).
      backend: ``'numpy'`` or ``'jax'``.

    Returns:
      ``self``.
    """
    self._side(num_other, backend)
    return self

  def _side(self, num_other: int, backend: str) -> dict[str, Any]:
    if backend not in _SWD_BACKENDS:
      raise ValueError(f"backend must be one of {_SWD_BACKENDS}, got {backend!r}")
    if num_other < 1:
      raise ValueError("the other set must be non-empty")
    n = min(len(self.images), int(num_other))
    side = self._sides.get(backend)
    if side is not None and side["n"] == n:
      return side
    self._sides.pop(backend, None)  # free the old one first: they are large
    s = self.settings
    chosen = _chosen_images(len(self.images), n, s["seed"])
    ys, xs = self._draws(n)
    if backend == "numpy":
      pyr = _laplacian_pyramid(self.images.astype(np.float64), len(self.resolutions))
      idx = np.repeat(chosen, s["patches_per_image"])
      sorted_proj = []
      for lvl in range(len(pyr)):
        desc = _finalize(_patches(pyr[lvl], idx, ys[lvl], xs[lvl], s["patch_size"]))
        sorted_proj.append(_sorted_projections(desc, self._dirs[lvl]))
      side = dict(n=n, ys=ys, xs=xs, sorted=sorted_proj)
    else:
      ys, xs = (tuple(jnp.asarray(v, jnp.int32) for v in vs) for vs in (ys, xs))
      dirs = tuple(jnp.asarray(np.concatenate(d)) for d in self._dirs)
      sorted_proj = swd_jax.sorted_projections(
        jnp.asarray(self.images[chosen]), ys, xs, dirs, patch_size=s["patch_size"]
      )
      side = dict(n=n, ys=ys, xs=xs, dirs=dirs, sorted=sorted_proj)
    self._sides[backend] = side
    return side

  def distance(self, images, backend: str = "numpy") -> SlicedWasserstein:
    """Sliced Wasserstein distance between the reference and ``images``.

    Args:
      images: ``[N, H, W, C]`` images of the reference's ``H, W, C``; with
        ``backend='jax'`` preferably a device array (it is not copied to the
        host).
      backend: ``'numpy'`` (host, float64 pyramid and statistics) or ``'jax'``
        (jitted float32 on the default device; agrees with ``'numpy'`` to a
        few float32 ulps, ~1e-7 relative, on XLA:CPU).

    Returns:
      The same :class:`SlicedWasserstein` as
      ``sliced_wasserstein(reference_images, images, **settings)``.
    """
    shape = np.shape(images)
    _check_images(shape, "images")
    if tuple(shape[1:]) != self.images.shape[1:]:
      raise ValueError(
        f"images must share H, W, C with the reference; got {tuple(shape[1:])} and {self.images.shape[1:]}"
      )
    side = self._side(shape[0], backend)
    s, n = self.settings, side["n"]
    chosen = _chosen_images(shape[0], n, s["seed"])
    if backend == "numpy":
      x = np.asarray(images, np.float32)
      pyr = _laplacian_pyramid(x.astype(np.float64), len(self.resolutions))
      idx = np.repeat(chosen, s["patches_per_image"])
      per_level = []
      for lvl in range(len(pyr)):
        desc = _finalize(_patches(pyr[lvl], idx, side["ys"][lvl], side["xs"][lvl], s["patch_size"]))
        other = _sorted_projections(desc, self._dirs[lvl])
        per_level.append(1e3 * _swd_sorted(side["sorted"][lvl], other))
    else:
      x = jnp.asarray(images, jnp.float32)
      if shape[0] != n:
        x = jnp.take(x, jnp.asarray(chosen), axis=0)
      other = swd_jax.sorted_projections(x, side["ys"], side["xs"], side["dirs"], patch_size=s["patch_size"])
      vals = np.asarray(swd_jax.swd_sorted(side["sorted"], other, repeats=s["dir_repeats"]))
      per_level = [1e3 * float(v) for v in vals]
    return SlicedWasserstein(self.resolutions, tuple(per_level), float(np.mean(per_level)))


def swd_reference(images, **kwargs) -> SwdReference:
  """A reusable reference side for :func:`sliced_wasserstein` (see :class:`SwdReference`).

  Args:
    images: ``[N, H, W, C]`` reference images.
    **kwargs: the keyword arguments of :class:`SwdReference` (the settings of
      :func:`sliced_wasserstein`, ``num_other``, ``backend``).

  Returns:
    The :class:`SwdReference`.
  """
  return SwdReference(images, **kwargs)


def sliced_wasserstein(
  images_a,
  images_b,
  *,
  patch_size: int | None = None,
  patches_per_image: int | None = None,
  dir_repeats: int | None = None,
  dirs_per_repeat: int | None = None,
  min_resolution: int | None = None,
  seed: int | None = None,
  backend: str = "numpy",
) -> SlicedWasserstein:
  """Sliced Wasserstein distance between Laplacian-pyramid patch distributions.

  Follows PGGAN's ``metrics/sliced_wasserstein.py`` (Karras et al. 2018):
  build a Laplacian pyramid of each image (cv2-style 5x5 binomial filter,
  mirror borders) with one level per resolution from the full size down to
  ``min_resolution`` (halving); at each level sample ``patches_per_image``
  random ``patch_size``² neighbourhoods per image; standardise each channel
  over each *set's* patches (so a global brightness/contrast change is
  ignored, as in PGGAN); then average, over ``dir_repeats`` × ``dirs_per_repeat``
  random unit directions, the mean absolute difference of the sorted 1-D
  projections. Values are multiplied by 1e3 ("SWDx1e3"), as PGGAN reports.

  Randomness is seeded: both sets use the *same* patch positions (and, when
  ``N_a == N_b``, the same image order), and the same directions, so
  ``sliced_wasserstein(x, x) == 0`` exactly and comparisons between runs use
  common random numbers. When set sizes differ, ``min(N_a, N_b)`` random
  images of the larger set are used so both sides have equally many patches.

  To compare many sets with one reference set, pass a :class:`SwdReference`
  (:func:`swd_reference`) as ``images_a``: its side is computed once, with
  identical results.

  Args:
    images_a: ``[N_a, H, W, C]`` images (any affine scale, e.g. [-1, 1]), or
      a :class:`SwdReference` (then the settings below default to its own,
      and must match them if given).
    images_b: ``[N_b, H, W, C]`` images of the same ``H, W, C``.
    patch_size: neighbourhood size (odd), 7 in PGGAN (default).
    patches_per_image: neighbourhoods per image and level, 128 in PGGAN (default).
    dir_repeats: number of direction batches, 4 in PGGAN (default).
    dirs_per_repeat: directions per batch, 128 in PGGAN (default; 512 in total).
    min_resolution: coarsest pyramid level (16 in PGGAN, default).
    seed: seed of patch positions and directions (default 0).
    backend: ``'numpy'``: host, float64 pyramid and statistics (the
      reference); ``'jax'``: the same computation jitted in float32 on the
      default device (for GPUs, where it takes device arrays without a host
      copy; slow on XLA:CPU, whose sort is ~18x slower than NumPy's), within
      ~1e-7 relative of ``'numpy'`` on XLA:CPU (tests allow 1e-4).

  Returns:
    A :class:`SlicedWasserstein` with per-level values and their mean.
  """
  given = dict(
    patch_size=patch_size,
    patches_per_image=patches_per_image,
    dir_repeats=dir_repeats,
    dirs_per_repeat=dirs_per_repeat,
    min_resolution=min_resolution,
    seed=seed,
  )
  given = {k: v for k, v in given.items() if v is not None}
  if isinstance(images_a, SwdReference):
    differ = {k: v for k, v in given.items() if images_a.settings[k] != v}
    if differ:
      raise ValueError(f"settings {differ} differ from those of the SwdReference {images_a.settings}")
    return images_a.distance(images_b, backend)
  shape_a, shape_b = np.shape(images_a), np.shape(images_b)
  _check_images(shape_a, "images_a")
  _check_images(shape_b, "images_b")
  if tuple(shape_a[1:]) != tuple(shape_b[1:]):
    raise ValueError(f"images_a and images_b must share H, W, C; got {tuple(shape_a[1:])} and {tuple(shape_b[1:])}")
  if min(shape_a[0], shape_b[0]) < 1:
    raise ValueError("images_a and images_b must be non-empty")
  ref = SwdReference(images_a, num_other=shape_b[0], backend=backend, **{**_SWD_DEFAULTS, **given})
  return ref.distance(images_b, backend)
