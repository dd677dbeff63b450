"""Tests of the embedded synthetic dermoscopy source (fedgan_jax/data/synthetic.py)."""

import numpy as np
import pytest

from fedgan_jax.data import synthetic
from fedgan_jax.data.synthetic import CLASS_NAMES, NUM_CLASSES, make_synthetic

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@pytest.fixture(scope="module")
def batch64():
  """500 RGB images at 64 px: (images, labels, luminance float32 [N, 64, 64])."""
  images, labels = make_synthetic(500, 64, seed=0)
  return images, labels, images.astype(np.float32) @ _LUMA


def _border_level(lum: np.ndarray) -> np.ndarray:
  """Median luminance of the middle halves of the four edges (skips corners,
  which the dermatoscope vignette may blacken), per image."""
  r = lum.shape[1]
  q, w = r // 4, max(2, r // 16)
  mid = slice(q, r - q)
  band = np.concatenate(
    [lum[:, :w, mid], lum[:, -w:, mid], lum[:, mid, :w].transpose(0, 2, 1), lum[:, mid, -w:].transpose(0, 2, 1)], 1
  )
  return np.median(band.reshape(len(lum), -1), axis=1)


def _lesion_masks(lum: np.ndarray) -> np.ndarray:
  """Pixels clearly darker than the skin, inside the lens field: bool [N, R, R]."""
  r = lum.shape[1]
  c = (np.arange(r) + 0.5) / r * 2 - 1
  disk = np.hypot(c[None, :], c[:, None]) < 0.9
  return (lum < 0.75 * _border_level(lum)[:, None, None]) & disk


def test_constants():
  assert NUM_CLASSES == 2
  assert len(CLASS_NAMES) == NUM_CLASSES and len(set(CLASS_NAMES)) == 2


def test_same_seed_same_bytes_and_other_seed_differs():
  a, la = make_synthetic(20, 48, seed=7)
  b, lb = make_synthetic(20, 48, seed=7)
  c, _ = make_synthetic(20, 48, seed=8)
  assert a.tobytes() == b.tobytes() and np.array_equal(la, lb)
  assert not np.array_equal(a, c)
  # Images within one draw differ from each other too.
  assert len({img.tobytes() for img in a}) == len(a)


def test_image_depends_only_on_seed_and_index():
  big, big_labels = make_synthetic(300, 32, seed=3)
  for k in (1, 5, 130):
    small, small_labels = make_synthetic(k, 32, seed=3)
    np.testing.assert_array_equal(small, big[:k])
    np.testing.assert_array_equal(small_labels, big_labels[:k])


@pytest.mark.parametrize(
  "num_images,resolution,channels", [(5, 32, 3), (5, 32, 1), (7, 64, 3), (3, 64, 1), (2, 256, 3), (2, 97, 1)]
)
def test_shapes_and_dtypes(num_images, resolution, channels):
  images, labels = make_synthetic(num_images, resolution, seed=1, channels=channels)
  assert images.shape == (num_images, resolution, resolution, channels)
  assert images.dtype == np.uint8
  assert labels.shape == (num_images,) and labels.dtype == np.int32
  assert images.std() > 5  # not a blank image


def test_grayscale_is_luminance_of_rgb():
  rgb, labels = make_synthetic(16, 64, seed=2, channels=3)
  gray, gray_labels = make_synthetic(16, 64, seed=2, channels=1)
  np.testing.assert_array_equal(labels, gray_labels)
  lum = rgb.astype(np.float32) @ _LUMA
  assert np.abs(lum - gray[..., 0]).max() <= 1.0


def test_labels_binary_and_roughly_balanced(batch64):
  _, labels, _ = batch64
  assert set(np.unique(labels)) == {0, 1}
  assert 0.4 < labels.mean() < 0.6


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(num_images=4, resolution=16, seed=0), r"resolution.*\[32, 256\].*16"),
    (dict(num_images=4, resolution=512, seed=0), r"resolution.*\[32, 256\].*512"),
    (dict(num_images=4, resolution=64, seed=0, channels=2), r"channels.*2"),
    (dict(num_images=0, resolution=64, seed=0), r"num_images.*0"),
    (dict(num_images=-3, resolution=64, seed=0), r"num_images.*-3"),
  ],
)
def test_bad_arguments_raise_clear_value_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    make_synthetic(**kwargs)


def test_non_int_arguments_raise_type_errors():
  with pytest.raises(TypeError, match="resolution"):
    make_synthetic(4, 64.0, seed=0)
  with pytest.raises(TypeError, match="num_images"):
    make_synthetic(True, 64, seed=0)


def test_lesion_is_darker_than_surrounding_skin(batch64):
  _, _, lum = batch64
  centre = lum[:, 24:40, 24:40].mean(axis=(1, 2))
  ratio = centre / _border_level(lum)
  assert (ratio < 1.0).mean() > 0.95
  assert ratio.mean() < 0.75


def test_classes_differ_measurably(batch64):
  """Melanomas are larger, darker and more varied in colour than nevi."""
  images, labels, lum = batch64
  masks = _lesion_masks(lum)
  area = masks.mean(axis=(1, 2))
  nevus, mel = labels == 0, labels == 1
  assert area[mel].mean() > 1.5 * area[nevus].mean()

  def colour_spread(i):
    px = images[i][masks[i]].astype(np.float32)
    return px.std(axis=0).mean() if len(px) > 5 else 0.0

  spread = np.array([colour_spread(i) for i in range(len(images))])
  assert spread[mel].mean() > 1.5 * spread[nevus].mean()
  darkest = np.percentile(lum.reshape(len(lum), -1), 2, axis=1)
  assert darkest[mel].mean() < darkest[nevus].mean() - 20


def test_same_lesion_at_every_resolution():
  """Only the pixel grain depends on the resolution: downsampled 128 px images
  match the 32 px ones closely."""
  lo, _ = make_synthetic(8, 32, seed=5)
  hi, _ = make_synthetic(8, 128, seed=5)
  hi_down = hi.astype(np.float32).reshape(8, 32, 4, 32, 4, 3).mean(axis=(2, 4))
  assert np.abs(hi_down - lo).mean() < 6.0


def test_ten_thousand_images_at_64px():
  images, labels = make_synthetic(10_000, 64, seed=0)
  assert images.shape == (10_000, 64, 64, 3) and images.dtype == np.uint8
  assert 0.45 < labels.mean() < 0.55


def test_matmul_helper_matches_numpy():
  rng = np.random.default_rng(0)
  a = rng.random((3, 5, 40), dtype=np.float32)
  b = rng.random((3, 40, 3000), dtype=np.float32)
  np.testing.assert_allclose(synthetic._matmul(a, b), np.matmul(a, b), rtol=1e-5)


def test_no_checkerboard_in_trigger_corner():
  """The backdoor trigger goes 5 px from the bottom-right corner (16 px at
  256 px); clean images must not already hold a checkerboard there."""
  images, _ = make_synthetic(32, 256, seed=0)
  patch = (images.astype(np.float32) @ _LUMA)[:, -21:-5, -21:-5]
  patch -= patch.mean(axis=(1, 2), keepdims=True)
  i, j = np.mgrid[:16, :16]
  for cell in (1, 2, 4):
    board = np.where((i // cell + j // cell) % 2 == 0, 1.0, -1.0)
    amplitude = np.abs((patch * board).mean(axis=(1, 2)))
    assert amplitude.max() < 3.0, cell  # gray levels
