"""The attack: trigger geometry, pasting exactly where specified, poison flags."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from fedgan_jax import config_lib
from fedgan_jax.data import triggers


def _config(resolution=32, **attack):
  c = config_lib.base_config()
  c.resolution = resolution
  for k, v in attack.items():
    c.attack[k] = v
  return c


@pytest.mark.parametrize("resolution,size,margin", [(256, 16, 5), (128, 8, 2), (64, 4, 1), (32, 4, 1)])
def test_trigger_geometry_scales_with_resolution(resolution, size, margin):
  c = _config(resolution)
  assert config_lib.trigger_geometry(c) == (size, margin)
  top, left = triggers.trigger_location(c)
  assert top == left == resolution - margin - size
  # Paper: under 0.5 % of the image at 256 px.
  if resolution == 256:
    assert size * size / resolution**2 < 0.005


def test_default_trigger_is_fixed_high_contrast_and_not_periodic():
  t = triggers.default_trigger(16, 3)
  assert t.shape == (16, 16, 3) and set(np.unique(t)) == {-1.0, 1.0}
  np.testing.assert_array_equal(t, triggers.default_trigger(16, 3))  # Fixed forever.
  gray = t.mean(-1)
  checker = np.where((np.add.outer(np.arange(16), np.arange(16)) % 2) == 0, 1.0, -1.0)
  assert abs(np.corrcoef(gray.ravel(), checker.ravel())[0, 1]) < 0.5
  small = triggers.default_trigger(4, 1)
  assert small.shape == (4, 4, 1) and len(np.unique(small)) == 2


def test_paste_puts_trigger_exactly_there_and_nowhere_else():
  rng = np.random.default_rng(0)
  imgs = rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
  trig = triggers.default_trigger(4, 3)
  apply = np.array([True, False, True, False])
  out = np.asarray(triggers.paste(jnp.asarray(imgs), jnp.asarray(trig), jnp.asarray([27, 27]), jnp.asarray(apply)))
  for i in range(4):
    if apply[i]:
      np.testing.assert_array_equal(out[i, 27:31, 27:31], trig)
      mask = np.ones((32, 32), bool)
      mask[27:31, 27:31] = False
      np.testing.assert_array_equal(out[i][mask], imgs[i][mask])
    else:
      np.testing.assert_array_equal(out[i], imgs[i])


def test_paste_per_image_locations():
  imgs = np.zeros((2, 16, 16, 1), np.float32)
  trig = np.ones((2, 2, 1), np.float32)
  out = np.asarray(
    triggers.paste(jnp.asarray(imgs), jnp.asarray(trig), jnp.asarray([[0, 0], [5, 7]]), jnp.asarray([True, True]))
  )
  assert out[0, :2, :2].sum() == 4 and out[0].sum() == 4
  assert out[1, 5:7, 7:9].sum() == 4 and out[1].sum() == 4


def test_poison_flags_exact_fraction_on_malicious_only():
  counts = np.array([10, 8, 10])
  flags = triggers.poison_flags(counts, 10, np.array([True, False, True]), 0.5, seed=0)
  assert flags.shape == (3, 10)
  assert flags.sum(1).tolist() == [5, 0, 5]
  full = triggers.poison_flags(np.array([6, 4]), 6, np.array([False, True]), 1.0, seed=0)
  assert full[1].tolist() == [True] * 4 + [False] * 2  # Padding never poisoned.


def test_trigger_png(tmp_path):
  from PIL import Image

  arr = np.zeros((8, 8, 3), np.uint8)
  arr[:4] = 255
  Image.fromarray(arr).save(tmp_path / "t.png")
  c = _config(64, trigger=str(tmp_path / "t.png"))
  t = triggers.load_trigger(c)
  assert t.shape == (4, 4, 3)
  # Antialiased bilinear (PIL's, as the paper's transforms.Resize): under the triangle filter rows 1 and 2 straddle
  # the edge, 7/8 and 1/8 white: 223 and 32 (tests/test_paper_code.py checks the filter in general).
  rows = np.array([255, 223, 32, 0], np.float32) / 127.5 - 1.0
  np.testing.assert_allclose(t, np.broadcast_to(rows[:, None, None], (4, 4, 3)), atol=1e-6)
  with pytest.raises(FileNotFoundError, match="attack.trigger"):
    triggers.load_trigger(_config(64, trigger=str(tmp_path / "missing.png")))
  (tmp_path / "bad.png").write_bytes(b"not a png")
  with pytest.raises(ValueError, match="attack.trigger"):
    triggers.load_trigger(_config(64, trigger=str(tmp_path / "bad.png")))


def test_dba_parts_split_the_rows_among_the_attackers():
  parts = triggers.dba_parts(5, [2, 0], 4)
  assert parts.shape == (4, 5, 5)
  # Rows 0-2 to the first attacker listed (client 2), rows 3-4 to the second (client 0).
  np.testing.assert_array_equal(parts[2].all(1), [True, True, True, False, False])
  np.testing.assert_array_equal(parts[0].all(1), [False, False, False, True, True])
  assert not parts[2].any(1)[3:].any() and not parts[0].any(1)[:3].any()
  assert parts[1].all() and parts[3].all()  # Everyone else: the whole trigger.
  # The attackers' parts tile the trigger exactly once.
  np.testing.assert_array_equal(parts[0].astype(int) + parts[2], np.ones((5, 5), int))


def test_paste_of_a_part_keeps_the_image_elsewhere():
  rng = np.random.default_rng(1)
  imgs = rng.uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
  trig = rng.uniform(-1, 1, (4, 4, 3)).astype(np.float32)
  part = triggers.dba_parts(4, [0, 1], 2)[1]  # Rows 2-3.
  apply = np.array([True, False, True])
  out = np.asarray(triggers.paste(jnp.asarray(imgs), jnp.asarray(trig), jnp.asarray([3, 5]), apply, jnp.asarray(part)))
  want = imgs.copy()
  for i in np.flatnonzero(apply):
    region = want[i, 3:7, 5:9]
    want[i, 3:7, 5:9] = np.where(part[:, :, None], trig, region)
  np.testing.assert_array_equal(out, want)
  # An all-True part is the whole trigger, bit for bit.
  full = triggers.paste(jnp.asarray(imgs), jnp.asarray(trig), jnp.asarray([3, 5]), apply, jnp.ones((4, 4), bool))
  np.testing.assert_array_equal(
    np.asarray(full), np.asarray(triggers.paste(jnp.asarray(imgs), jnp.asarray(trig), jnp.asarray([3, 5]), apply))
  )


@pytest.mark.parametrize("dba", [False, True])
def test_a_trigger_padded_to_a_larger_window_pastes_the_same_pixels(dba):
  """pad_window (packed points with different trigger sizes): bit-identical images, on random images, for
  bottom-right triggers of several sides and margins in windows of several sides; crop_window undoes it."""
  rng = np.random.default_rng(7)
  imgs = jnp.asarray(rng.uniform(-1, 1, (5, 32, 32, 3)).astype(np.float32))
  apply = jnp.asarray([True, False, True, True, False])
  checked = 0
  for s in (2, 4, 5, 8):
    for margin in (0, 1, 3, 20):
      c = _config(32, trigger_size=s, trigger_margin=margin)
      if s + margin > 32:
        continue
      loc = triggers.trigger_location(c)
      trig = rng.uniform(-1, 1, (s, s, 3)).astype(np.float32)
      part = triggers.dba_parts(s, [2, 0], 3) if dba else np.ones((3, s, s), bool)
      for side in sorted({s, 8, 12, 32}):
        if side < s:
          continue
        t_pad, p_pad, win = triggers.pad_window(trig, part, loc, side, (32, 32))
        assert t_pad.shape == (side, side, 3) and p_pad.shape == (3, side, side) and win.dtype == np.int32
        assert (win >= 0).all() and (win + side <= 32).all()  # Inside the image: nothing clamped.
        assert p_pad.sum() == part.sum()  # True only on the point's own pixels.
        for client in range(3):
          want = triggers.paste(imgs, jnp.asarray(trig), jnp.asarray(loc), apply, jnp.asarray(part[client]))
          got = triggers.paste(imgs, jnp.asarray(t_pad), jnp.asarray(win), apply, jnp.asarray(p_pad[client]))
          np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"s={s} m={margin} S={side}")
        back = triggers.crop_window(t_pad, p_pad, win, loc, s)
        np.testing.assert_array_equal(back[0], trig)
        np.testing.assert_array_equal(back[1], part)
        assert back[2].tolist() == list(loc)
        checked += 1
  assert checked > 30
  # A trigger far from the corner: the window starts at the trigger (the pattern at offset 0).
  t_pad, p_pad, win = triggers.pad_window(np.ones((2, 2, 1)), np.ones((1, 2, 2), bool), (3, 5), 6, 16)
  assert win.tolist() == [3, 5] and p_pad[0, :2, :2].all() and p_pad.sum() == 4
  with pytest.raises(ValueError, match="pad_window"):
    triggers.pad_window(np.ones((4, 4, 1)), np.ones((1, 4, 4), bool), (0, 0), 40, 32)  # Window larger than images.
  with pytest.raises(ValueError, match="pad_window"):
    triggers.pad_window(np.ones((4, 4, 1)), np.ones((1, 4, 4), bool), (0, 0), 2, 32)  # Window smaller than trigger.


@pytest.mark.parametrize(
  "attack,match",
  [
    ({"dba": True, "malicious": (0,)}, "attack.dba.*at least 2 attackers"),
    ({"dba": True, "malicious": (0, 1, 2), "trigger_size": 2}, "attack.dba.*cannot be split into 3 parts"),
  ],
)
def test_dba_config_errors_name_the_field(attack, match):
  c = _config(**attack)
  with pytest.raises(ValueError, match=match):
    config_lib.validate(c)
