"""Fidelity metrics between two sets of features: FD, KID, precision/recall.

All functions are host-side NumPy (float64 where it matters), pure and seeded;
they take features (``[N, D]`` arrays from :mod:`fedgan_jax.metrics.extractors`)
and return Python floats. The image-space sliced Wasserstein distance is in
:mod:`fedgan_jax.metrics.swd`.

References:
  * Fréchet distance (FID): Heusel et al., "GANs Trained by a Two Time-Scale
    Update Rule Converge to a Local Nash Equilibrium", NeurIPS 2017.
  * Kernel Inception Distance: Bińkowski et al., "Demystifying MMD GANs",
    ICLR 2018 (unbiased MMD² with the cubic polynomial kernel).
  * Improved precision and recall: Kynkäänniemi et al., "Improved Precision and
    Recall Metric for Assessing Generative Models", NeurIPS 2019.
"""

from __future__ import annotations

import numpy as np

__all__ = [
  "frechet_distance",
  "frechet_distance_from_stats",
  "feature_stats",
  "kid",
  "precision_recall",
]


def _check_features(x, name: str, min_rows: int = 2) -> np.ndarray:
  x = np.asarray(x, dtype=np.float64)
  if x.ndim != 2:
    raise ValueError(f"{name} must be a [N, D] array, got shape {x.shape}")
  if x.shape[0] < min_rows:
    raise ValueError(f"{name} needs at least {min_rows} rows, got {x.shape[0]}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} contains NaN or Inf")
  return x


def _check_pair(a, b, names=("features_a", "features_b"), min_rows: int = 2):
  a = _check_features(a, names[0], min_rows)
  b = _check_features(b, names[1], min_rows)
  if a.shape[1] != b.shape[1]:
    raise ValueError(
      f"{names[0]} and {names[1]} must have the same feature dimension, got {a.shape[1]} and {b.shape[1]}"
    )
  return a, b


# ----------------------------------------------------------------------------
# Fréchet distance


def _psd_sqrt(sym: np.ndarray) -> np.ndarray:
  """Square root of a symmetric PSD matrix by eigendecomposition."""
  w, v = np.linalg.eigh(sym)
  w = np.clip(w, 0.0, None)  # tiny negative eigenvalues are round-off
  return (v * np.sqrt(w)) @ v.T


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance (float64, unbiased, ``N - 1``) of ``[N, D]`` features.

  Args:
    features: array ``[N, D]`` with ``N >= 2``.

  Returns:
    ``(mu [D], sigma [D, D])``, as used by :func:`frechet_distance_from_stats`
    (e.g. to cache the statistics of the real images once; with
    ``N <= D``, :func:`frechet_distance` on the features themselves is faster).
  """
  x = _check_features(features, "features")
  return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b) -> float:
  """Fréchet distance between two Gaussians ``N(mu_a, sigma_a)``, ``N(mu_b, sigma_b)``.

  ``||mu_a - mu_b||² + tr(S_a) + tr(S_b) - 2 tr((S_a^½ S_b S_a^½)^½)``.
  The cross term uses the symmetric form ``S_a^½ S_b S_a^½`` (PSD, so its
  square root comes from ``eigh``), which equals ``tr((S_a S_b)^½)`` of the
  usual formula but needs no complex ``sqrtm`` and no ``eps`` offset.

  Args:
    mu_a: mean ``[D]``.
    sigma_a: covariance ``[D, D]``.
    mu_b: mean ``[D]``.
    sigma_b: covariance ``[D, D]``.

  Returns:
    The distance as a Python float (>= 0 up to round-off; clipped at 0).
  """
  mu_a = np.asarray(mu_a, np.float64).reshape(-1)
  mu_b = np.asarray(mu_b, np.float64).reshape(-1)
  sigma_a = np.atleast_2d(np.asarray(sigma_a, np.float64))
  sigma_b = np.atleast_2d(np.asarray(sigma_b, np.float64))
  d = mu_a.shape[0]
  if mu_b.shape != (d,) or sigma_a.shape != (d, d) or sigma_b.shape != (d, d):
    raise ValueError(
      f"inconsistent statistics shapes: mu_a {mu_a.shape}, sigma_a "
      f"{sigma_a.shape}, mu_b {mu_b.shape}, sigma_b {sigma_b.shape}"
    )
  sqrt_a = _psd_sqrt(0.5 * (sigma_a + sigma_a.T))
  m = sqrt_a @ (0.5 * (sigma_b + sigma_b.T)) @ sqrt_a
  eig = np.clip(np.linalg.eigvalsh(0.5 * (m + m.T)), 0.0, None)
  diff = mu_a - mu_b
  fd = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.sqrt(eig).sum()
  return float(max(fd, 0.0))


def _cov_factor(x: np.ndarray) -> np.ndarray:
  """A matrix ``F`` with ``F.T @ F == cov(x)``: the fewer of N-1 or D rows.

  ``N <= D``: the centred data over ``sqrt(N - 1)`` (``[N, D]``, exact, no
  decomposition); otherwise the symmetric square root of the covariance.
  """
  n, d = x.shape
  if n <= d:
    return (x - x.mean(axis=0)) / np.sqrt(n - 1)
  return _psd_sqrt(np.cov(x, rowvar=False).reshape(d, d))


def frechet_distance(features_a, features_b) -> float:
  """Fréchet distance between Gaussians fitted to two feature sets (FID-style).

  Public contract (docs/design.md §5): ``eval/fid@<extractor>`` is this function of
  the extractor's features of generated and clean real images.

  ``||mu_a - mu_b||² + tr(S_a) + tr(S_b) - 2 tr((S_a^½ S_b S_a^½)^½)``, in
  float64. With factors ``S = F.T @ F`` the cross term is the nuclear norm
  (sum of singular values) of ``F_a @ F_b.T``: the eigenvalues of
  ``S_a^½ S_b S_a^½`` are those of ``(F_a F_b^T)(F_a F_b^T)^T``. With the
  centred data as factor when ``N <= D`` (the usual case for 2048-d features)
  this is one ``[N_a, N_b]`` SVD instead of ``D x D`` matrix square roots,
  exact, and free of the complex ``sqrtm`` and ``eps`` offsets of the usual
  code; it agrees with ``scipy.linalg.sqrtm``-based FID to round-off.

  Args:
    features_a: array ``[N_a, D]``, ``N_a >= 2``.
    features_b: array ``[N_b, D]``, ``N_b >= 2``.

  Returns:
    The Fréchet distance as a Python float (clipped at 0); 0 (up to ~1e-6
    relative) for identical sets.

  Raises:
    ValueError: on non-2-D inputs, mismatched ``D``, fewer than 2 rows, or
      non-finite values.
  """
  a, b = _check_pair(features_a, features_b)
  fa, fb = _cov_factor(a), _cov_factor(b)
  cross = np.linalg.svd(fa @ fb.T, compute_uv=False).sum()
  diff = a.mean(axis=0) - b.mean(axis=0)
  fd = diff @ diff + np.sum(fa * fa) + np.sum(fb * fb) - 2.0 * cross
  return float(max(fd, 0.0))


# ----------------------------------------------------------------------------
# Kernel Inception Distance


def _mmd2_from_kernels(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray) -> float:
  m = k_xx.shape[0]
  sum_xx = k_xx.sum() - np.trace(k_xx)
  sum_yy = k_yy.sum() - np.trace(k_yy)
  return float((sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  return (x @ y.T / x.shape[1] + 1.0) ** 3


# Up to this many rows per set, KID computes the full kernel matrices once and
# slices subsets out of them (3 big matmuls instead of 3 per subset).
_KID_FULL_KERNEL_MAX_ROWS = 4096


def kid(features_a, features_b, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
  """Kernel Inception Distance: unbiased MMD² with ``k(x, y) = (x·y/d + 1)³``.

  As in the reference implementations (Bińkowski et al.'s code,
  torch-fidelity, StyleGAN2-ADA): ``num_subsets`` times, draw ``m`` rows
  without replacement from each set, compute the unbiased MMD² estimate on
  those two subsets, and report mean and standard deviation over subsets.
  ``m = min(subset_size, N_a, N_b)`` (torch-fidelity raises instead when a set
  is smaller than ``subset_size``; we shrink the subsets, as StyleGAN2-ADA does).

  Args:
    features_a: array ``[N_a, D]``.
    features_b: array ``[N_b, D]``.
    num_subsets: number of subset pairs (>= 1).
    subset_size: rows per subset (>= 2), clipped to the smaller set size.
    seed: seed of the subset sampling (NumPy ``default_rng``).

  Returns:
    ``(mean, std)`` of the per-subset MMD² estimates (can be slightly
    negative: the estimator is unbiased). Often reported ×1e3.
  """
  a, b = _check_pair(features_a, features_b)
  if num_subsets < 1:
    raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
  if subset_size < 2:
    raise ValueError(f"subset_size must be >= 2, got {subset_size}")
  m = min(subset_size, a.shape[0], b.shape[0])
  rng = np.random.default_rng(seed)
  full = max(a.shape[0], b.shape[0]) <= _KID_FULL_KERNEL_MAX_ROWS
  if full:
    k_aa, k_bb, k_ab = _poly_kernel(a, a), _poly_kernel(b, b), _poly_kernel(a, b)
  vals = np.empty(num_subsets)
  for i in range(num_subsets):
    ia = rng.choice(a.shape[0], m, replace=False)
    ib = rng.choice(b.shape[0], m, replace=False)
    if full:
      vals[i] = _mmd2_from_kernels(k_aa[np.ix_(ia, ia)], k_bb[np.ix_(ib, ib)], k_ab[np.ix_(ia, ib)])
    else:
      x, y = a[ia], b[ib]
      vals[i] = _mmd2_from_kernels(_poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y))
  return float(vals.mean()), float(vals.std())


# ----------------------------------------------------------------------------
# Improved precision / recall


def _kth_nn_radii(x: np.ndarray, k: int, block: int) -> np.ndarray:
  """Distance of each row of ``x`` to its k-th nearest other row."""
  radii = np.empty(x.shape[0])
  sq = (x * x).sum(1)
  for s in range(0, x.shape[0], block):
    d2 = sq[s : s + block, None] + sq[None, :] - 2.0 * x[s : s + block] @ x.T
    # Column 0 after partition is the point itself (distance 0).
    radii[s : s + block] = np.partition(np.maximum(d2, 0.0), k, axis=1)[:, k]
  return np.sqrt(radii)


def _coverage(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray, block: int) -> float:
  """Fraction of ``queries`` inside at least one ball (manifold_i, radii_i)."""
  inside = np.zeros(queries.shape[0], dtype=bool)
  sq_m = (manifold * manifold).sum(1)
  sq_q = (queries * queries).sum(1)
  r2 = radii**2
  for s in range(0, queries.shape[0], block):
    d2 = sq_q[s : s + block, None] + sq_m[None, :] - 2.0 * queries[s : s + block] @ manifold.T
    inside[s : s + block] = np.any(d2 <= r2[None, :], axis=1)
  return float(inside.mean())


def precision_recall(real_feats, fake_feats, k: int = 3, block_size: int = 1024) -> tuple[float, float]:
  """Improved precision and recall (k-NN manifold estimate).

  The manifold of a set is the union of balls centred on its samples with
  radius the distance to the sample's ``k``-th nearest neighbour in the same
  set. Precision = fraction of fake samples inside the real manifold; recall
  = fraction of real samples inside the fake manifold (Kynkäänniemi et al.
  2019; their default ``k = 3``).

  Args:
    real_feats: array ``[N_r, D]``, ``N_r > k``.
    fake_feats: array ``[N_f, D]``, ``N_f > k``.
    k: neighbourhood size.
    block_size: rows per block of the pairwise-distance computation (memory).

  Returns:
    ``(precision, recall)`` in [0, 1].
  """
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  real, fake = _check_pair(real_feats, fake_feats, ("real_feats", "fake_feats"), min_rows=k + 1)
  r_real = _kth_nn_radii(real, k, block_size)
  r_fake = _kth_nn_radii(fake, k, block_size)
  precision = _coverage(real, r_real, fake, block_size)
  recall = _coverage(fake, r_fake, real, block_size)
  return precision, recall
