"""Fidelity metrics: FD, KID, precision/recall, SWD (golden checks vs references)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage

from fedgan_jax import metrics
from fedgan_jax.metrics import swd


def _random_features(n, d, seed, scale=1.0, shift=0.0):
  rng = np.random.default_rng(seed)
  mix = rng.standard_normal((d, d)) * scale / np.sqrt(d)  # correlated features
  return rng.standard_normal((n, d)) @ mix + shift


# ---------------------------------------------------------------- Fréchet


def _fd_scipy(a, b):
  mu1, mu2 = a.mean(0), b.mean(0)
  s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * covmean))


@pytest.mark.parametrize("n,d,seed", [(200, 8, 0), (500, 32, 1), (64, 16, 2)])
def test_frechet_matches_scipy_sqrtm_formula(n, d, seed):
  a = _random_features(n, d, seed)
  b = _random_features(n + 7, d, seed + 100, scale=1.5, shift=0.3)
  ref = _fd_scipy(a, b)
  got = metrics.frechet_distance(a, b)
  assert isinstance(got, float)
  np.testing.assert_allclose(got, ref, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("n_a,n_b", [(40, 300), (300, 40), (30, 20)])
def test_frechet_factor_paths_agree_with_stats_path(n_a, n_b):
  # N <= D uses the centred data as covariance factor, N > D a matrix sqrt.
  a = _random_features(n_a, 48, 7)
  b = _random_features(n_b, 48, 8, scale=0.7, shift=0.2)
  want = metrics.frechet_distance_from_stats(*metrics.feature_stats(a), *metrics.feature_stats(b))
  np.testing.assert_allclose(metrics.frechet_distance(a, b), want, rtol=1e-6)
  np.testing.assert_allclose(want, _fd_scipy(a, b), rtol=1e-6)


def test_frechet_identical_sets_is_zero_and_symmetric():
  for n in (300, 40):  # both factor paths
    a = _random_features(n, 64, 3, scale=10.0)
    assert abs(metrics.frechet_distance(a, a)) < 1e-6 * np.trace(np.cov(a, rowvar=False))
  a = _random_features(300, 64, 3, scale=10.0)
  b = _random_features(300, 64, 4)
  np.testing.assert_allclose(metrics.frechet_distance(a, b), metrics.frechet_distance(b, a), rtol=1e-9)


def test_frechet_rank_deficient_covariances():
  # N < D: singular covariances; the eigh-based sqrt must stay finite and match scipy.
  a = _random_features(20, 64, 5)
  b = _random_features(25, 64, 6) + 0.5
  got = metrics.frechet_distance(a, b)
  assert np.isfinite(got) and got > 0
  np.testing.assert_allclose(got, _fd_scipy(a, b), rtol=1e-5)


def test_frechet_gaussian_closed_form():
  # Diagonal covariances: FD = |mu1-mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2.
  mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
  v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
  got = metrics.frechet_distance_from_stats(mu1, np.diag(v1), mu2, np.diag(v2))
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  np.testing.assert_allclose(got, want, rtol=1e-12)


def test_frechet_errors_name_the_argument():
  a = np.zeros((10, 4))
  with pytest.raises(ValueError, match="features_b"):
    metrics.frechet_distance(a, np.zeros(10))
  with pytest.raises(ValueError, match="same feature dimension"):
    metrics.frechet_distance(a, np.zeros((10, 5)))
  with pytest.raises(ValueError, match="at least 2"):
    metrics.frechet_distance(a, np.zeros((1, 4)))
  with pytest.raises(ValueError, match="NaN"):
    metrics.frechet_distance(a, np.full((10, 4), np.nan))


# ---------------------------------------------------------------- KID


def _mmd2_loops(x, y):
  """Unbiased MMD² with k(a, b) = (a·b/d + 1)^3, written as explicit sums."""
  m, d = x.shape
  k = lambda u, v: (u @ v / d + 1.0) ** 3
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
  return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / (m * m)


def test_kid_full_subset_equals_direct_mmd():
  a = _random_features(12, 5, 0)
  b = _random_features(12, 5, 1, shift=0.4)
  mean, std = metrics.kid(a, b, num_subsets=3, subset_size=12)
  np.testing.assert_allclose(mean, _mmd2_loops(a, b), rtol=1e-10)
  assert std < 1e-12  # every subset is a permutation of the full sets


def test_kid_matches_stylegan2_ada_reference_loop():
  # StyleGAN2-ADA metrics/kernel_inception_distance.py, same subset draws.
  a = _random_features(80, 16, 2)
  b = _random_features(60, 16, 3, shift=0.2)
  num_subsets, m, seed = 7, 30, 11
  rng = np.random.default_rng(seed)
  n = a.shape[1]
  t, vals = 0.0, []
  for _ in range(num_subsets):
    x = a[rng.choice(a.shape[0], m, replace=False)]
    y = b[rng.choice(b.shape[0], m, replace=False)]
    aa = (x @ x.T / n + 1) ** 3 + (y @ y.T / n + 1) ** 3
    bb = (x @ y.T / n + 1) ** 3
    val = (aa.sum() - np.diag(aa).sum()) / (m - 1) - bb.sum() * 2 / m
    t += val
    vals.append(val / m)
  mean, std = metrics.kid(a, b, num_subsets=num_subsets, subset_size=m, seed=seed)
  np.testing.assert_allclose(mean, t / num_subsets / m, rtol=1e-10)
  np.testing.assert_allclose(std, np.std(vals), rtol=1e-8)


def test_kid_near_zero_for_same_distribution_and_positive_for_shift():
  rng = np.random.default_rng(4)
  a, same, shifted = rng.standard_normal((3, 400, 32))
  mean_s, std_s = metrics.kid(a, same, num_subsets=10, subset_size=200)
  mean_c, _ = metrics.kid(a, shifted + 0.5, num_subsets=10, subset_size=200)
  assert abs(mean_s) < 3 * std_s + 1e-3
  assert mean_c > 10 * abs(mean_s)


def test_kid_subset_size_clipped_and_seeded():
  a, b = _random_features(50, 8, 0), _random_features(40, 8, 1)
  assert metrics.kid(a, b, subset_size=1000) == metrics.kid(a, b, subset_size=40)
  assert metrics.kid(a, b, num_subsets=5, seed=1) == metrics.kid(a, b, num_subsets=5, seed=1)
  with pytest.raises(ValueError, match="num_subsets"):
    metrics.kid(a, b, num_subsets=0)


# ---------------------------------------------------------------- precision/recall


def _pr_reference(real, fake, k):
  from scipy.spatial.distance import cdist

  def radii(x):
    return np.sort(cdist(x, x), axis=1)[:, k]

  rr, rf = radii(real), radii(fake)
  precision = np.mean((cdist(fake, real) <= rr[None, :]).any(1))
  recall = np.mean((cdist(real, fake) <= rf[None, :]).any(1))
  return precision, recall


def test_precision_recall_matches_brute_force():
  real = _random_features(150, 6, 0)
  fake = _random_features(120, 6, 1, scale=1.6, shift=0.5)
  got = metrics.precision_recall(real, fake, k=3, block_size=32)  # several blocks
  np.testing.assert_allclose(got, _pr_reference(real, fake, 3), atol=1e-12)


def test_precision_recall_extremes():
  real = _random_features(100, 4, 0)
  assert metrics.precision_recall(real, real.copy()) == (1.0, 1.0)
  far = real + 1e3
  assert metrics.precision_recall(real, far) == (0.0, 0.0)
  # Mode collapse: fakes on a small part of the real support -> high P, low R.
  collapsed = real[:1] + 1e-3 * np.random.default_rng(1).standard_normal((20, 4))
  p, r = metrics.precision_recall(real, collapsed, k=3)
  assert p == 1.0 and r <= 0.05


# ---------------------------------------------------------------- SWD


def _pggan_pyramid(x_nchw, levels):
  """PGGAN's generate_laplacian_pyramid (scipy 'mirror' convolution), NCHW."""
  g = np.float32([[1, 4, 6, 4, 1], [4, 16, 24, 16, 4], [6, 24, 36, 24, 6], [4, 16, 24, 16, 4], [1, 4, 6, 4, 1]]) / 256.0
  down = lambda m: scipy.ndimage.convolve(m, g[None, None], mode="mirror")[:, :, ::2, ::2]

  def up(m):
    res = np.zeros(m.shape[:2] + (m.shape[2] * 2, m.shape[3] * 2), m.dtype)
    res[:, :, ::2, ::2] = m
    return scipy.ndimage.convolve(res, g[None, None] * 4.0, mode="mirror")

  pyr = [np.float64(x_nchw)]
  for _ in range(1, levels):
    pyr.append(down(pyr[-1]))
    pyr[-2] -= up(pyr[-1])
  return pyr


def test_laplacian_pyramid_matches_pggan():
  x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3))
  ours = swd._laplacian_pyramid(x, 3)
  ref = _pggan_pyramid(x.transpose(0, 3, 1, 2), 3)
  for o, r in zip(ours, ref):
    np.testing.assert_allclose(o.transpose(0, 3, 1, 2), r, atol=1e-6)


def _smooth_images(n, size, seed, channels=3):
  rng = np.random.default_rng(seed)
  x = scipy.ndimage.gaussian_filter(rng.standard_normal((n, size, size, channels)), sigma=(0, 1.5, 1.5, 0))
  return np.tanh(2.0 * x / x.std())


def test_swd_of_set_with_itself_is_zero():
  x = _smooth_images(16, 32, 0)
  res = metrics.sliced_wasserstein(x, x.copy())
  assert res.resolutions == (32, 16)
  assert len(res.per_level) == 2
  assert res.mean == 0.0


def test_swd_grows_with_noise():
  x = _smooth_images(32, 32, 1)
  y = _smooth_images(32, 32, 2)  # same distribution, different draws
  noise = np.random.default_rng(3).standard_normal(x.shape)
  base = metrics.sliced_wasserstein(x, y).mean
  values = [metrics.sliced_wasserstein(x, y + s * noise).mean for s in (0.1, 0.3, 0.6, 1.0)]
  assert base < values[0]
  assert all(a < b for a, b in zip(values, values[1:])), values


def test_swd_grayscale_unequal_sizes_and_seed():
  x = _smooth_images(10, 64, 4, channels=1)
  y = _smooth_images(14, 64, 5, channels=1)
  r1 = metrics.sliced_wasserstein(x, y, seed=3)
  assert r1.resolutions == (64, 32, 16)
  assert r1 == metrics.sliced_wasserstein(x, y, seed=3)
  assert r1 != metrics.sliced_wasserstein(x, y, seed=4)
  assert all(v > 0 for v in r1.per_level)
  with pytest.raises(ValueError, match="share H, W, C"):
    metrics.sliced_wasserstein(x, _smooth_images(4, 32, 6, channels=1))


# ---------------------------------------------------------------- SWD: cached reference, jax path


def _swd_before_cache(
  images_a, images_b, patch_size=7, patches_per_image=128, dir_repeats=4, dirs_per_repeat=128, min_resolution=16, seed=0
):
  """``sliced_wasserstein`` as it was before the reusable reference (frozen copy)."""
  a, b = np.asarray(images_a, np.float32), np.asarray(images_b, np.float32)
  _, h, w, _ = a.shape
  resolutions, res = [], min(h, w)
  while res >= min_resolution:
    resolutions.append(res)
    res //= 2
  n = min(a.shape[0], b.shape[0])
  order_rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))

  def image_index(num):
    chosen = np.arange(num) if num == n else np.sort(order_rng.permutation(num)[:n])
    return np.repeat(chosen, patches_per_image)

  def patches(level, img_idx, rng):
    _, lh, lw, _ = level.shape
    half = patch_size // 2
    ys = rng.integers(half, lh - half, size=img_idx.shape[0])
    xs = rng.integers(half, lw - half, size=img_idx.shape[0])
    off = np.arange(-half, half + 1)
    rows = (ys[:, None] + off[None, :])[:, :, None]
    cols = (xs[:, None] + off[None, :])[:, None, :]
    return level[img_idx[:, None, None], rows, cols]

  def finalize(desc):
    desc = desc - desc.mean(axis=(0, 1, 2), keepdims=True)
    std = desc.std(axis=(0, 1, 2), keepdims=True)
    desc = desc / np.where(std > 0, std, 1.0)
    return desc.reshape(desc.shape[0], -1).astype(np.float32)

  def distance(da, db, rng):
    results = []
    for _ in range(dir_repeats):
      d = rng.standard_normal((da.shape[1], dirs_per_repeat))
      d /= np.sqrt((d * d).sum(axis=0, keepdims=True))
      d = d.astype(np.float32).T
      pa, pb = np.sort(d @ da.T, axis=1), np.sort(d @ db.T, axis=1)
      results.append(np.abs(pa - pb).mean())
    return float(np.mean(results))

  idx_a, idx_b = image_index(a.shape[0]), image_index(b.shape[0])
  pyr_a = swd._laplacian_pyramid(a.astype(np.float64), len(resolutions))
  pyr_b = swd._laplacian_pyramid(b.astype(np.float64), len(resolutions))
  per_level = []
  for lvl in range(len(resolutions)):
    pos_seed = np.random.SeedSequence([seed, 1, lvl])
    da = finalize(patches(pyr_a[lvl], idx_a, np.random.default_rng(pos_seed)))
    db = finalize(patches(pyr_b[lvl], idx_b, np.random.default_rng(pos_seed)))
    dir_rng = np.random.default_rng(np.random.SeedSequence([seed, 2, lvl]))
    per_level.append(1e3 * distance(da, db, dir_rng))
  return swd.SlicedWasserstein(tuple(resolutions), tuple(per_level), float(np.mean(per_level)))


def _uniform_images(n, h, w, c, seed):
  return np.random.default_rng(seed).uniform(-1, 1, (n, h, w, c)).astype(np.float32)


@pytest.mark.parametrize(
  "n_a,n_b,hwc,kwargs",
  [
    (24, 24, (32, 32, 3), {}),
    (20, 13, (32, 32, 3), {"seed": 5}),
    (9, 17, (64, 64, 1), {"patches_per_image": 32}),
    (12, 8, (40, 33, 2), {"patch_size": 5, "dir_repeats": 2, "dirs_per_repeat": 64}),
  ],
)
def test_swd_reference_reuse_is_bit_identical(n_a, n_b, hwc, kwargs):
  h, w, c = hwc
  a = _smooth_images(n_a, h, 10, channels=c) if h == w else _uniform_images(n_a, h, w, c, 10)
  b = _uniform_images(n_b, *hwc, 11)
  want = _swd_before_cache(a, b, **kwargs)
  assert metrics.sliced_wasserstein(a, b, **kwargs) == want
  ref = swd.swd_reference(a, num_other=n_b, **kwargs)
  assert ref.distance(b) == want
  assert ref.distance(b) == want  # reused
  assert swd.sliced_wasserstein(ref, b) == want
  assert swd.sliced_wasserstein(ref, b, **kwargs) == want  # matching settings are accepted
  # Another size: the reference side is redone for it (positions depend on min(N_a, N_b)).
  for m in (n_a + 3, max(1, n_a - 4), n_b):
    c = _uniform_images(m, *hwc, 12 + m)
    assert ref.distance(c) == _swd_before_cache(a, c, **kwargs), m


def test_swd_reference_settings_and_errors():
  x = _uniform_images(6, 32, 32, 3, 0)
  ref = swd.swd_reference(x, seed=2)
  assert swd.sliced_wasserstein(ref, x, seed=2).mean == 0.0
  with pytest.raises(ValueError, match="differ"):
    swd.sliced_wasserstein(ref, x, seed=3)
  with pytest.raises(ValueError, match="share H, W, C"):
    ref.distance(_uniform_images(6, 32, 32, 1, 0))
  with pytest.raises(ValueError, match="backend"):
    ref.distance(x, backend="torch")
  with pytest.raises(ValueError, match="non-empty"):
    swd.sliced_wasserstein(x, x[:0])


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_swd_of_set_with_itself_is_zero_on_both_backends(backend):
  x = _smooth_images(12, 32, 7)
  assert metrics.sliced_wasserstein(x, x.copy(), backend=backend).mean == 0.0
  ref = swd.swd_reference(x, backend=backend)
  assert ref.distance(x, backend=backend).mean == 0.0


@pytest.mark.parametrize("case", ["random", "noisy", "sizes"])
def test_swd_jax_path_agrees_with_numpy(case):
  if case == "random":  # two draws of the same distribution: the smallest values
    a, b = _smooth_images(48, 32, 20), _smooth_images(48, 32, 21)
  elif case == "noisy":
    a = _smooth_images(48, 32, 22)
    b = np.clip(a + 0.1 * np.random.default_rng(23).standard_normal(a.shape), -1, 1)
  else:  # unequal sizes, grayscale, three levels
    a, b = _smooth_images(20, 64, 24, channels=1), _smooth_images(28, 64, 25, channels=1)
  want = metrics.sliced_wasserstein(a, b)
  got = metrics.sliced_wasserstein(a, b, backend="jax")
  assert got.resolutions == want.resolutions
  np.testing.assert_allclose(got.per_level, want.per_level, rtol=1e-4)
  np.testing.assert_allclose(got.mean, want.mean, rtol=1e-4)
  # A device array as the other set, through a cached reference.
  import jax.numpy as jnp

  ref = swd.swd_reference(a, num_other=len(b), backend="jax")
  np.testing.assert_allclose(ref.distance(jnp.asarray(b), backend="jax").mean, want.mean, rtol=1e-4)


def test_evaluator_swd_uses_cached_reference(tmp_path):
  import types

  import jax
  import jax.numpy as jnp

  from conftest import tiny_config, tiny_evaluator

  config = tiny_config(**{"eval.extractor": "none"})
  r, nz = config.resolution, config.model.latent_dim
  rng = np.random.default_rng(0)
  mix = jnp.asarray(rng.standard_normal((nz, r * r * 3)) / np.sqrt(nz), jnp.float32)
  sample_fn = lambda g_vars, z: jnp.tanh(z @ (g_vars * mix)).reshape(len(z), r, r, 3)
  heldout = types.SimpleNamespace(images=rng.integers(0, 256, (24, r, r, 3), dtype=np.uint8))
  ev = tiny_evaluator(config, sample_fn, heldout, tmp_path)
  assert ev.swd_backend == ("numpy" if jax.default_backend() == "cpu" else "jax")
  g_vars = jnp.float32(1.0)
  fake = ev.samples(g_vars, ev.z_eval)
  want = _swd_before_cache(ev.real, fake).mean
  out = ev(g_vars, 1)
  if ev.swd_backend == "numpy":
    assert out["eval/swd"] == want
  np.testing.assert_allclose(out["eval/swd"], want, rtol=1e-4)
  # The device path on whatever backend this is.
  ev.swd_backend = "jax"
  np.testing.assert_allclose(ev(g_vars, 2)["eval/swd"], want, rtol=1e-4)
