"""The paper code's D, loss and trigger (configs/paper_full.py): d_init, d_norm_first, bce, bands, PNG resize.

Each option against a reference written here: PyTorch's float32 BCE formulas in numpy, PyTorch's default init
bounds, PIL's antialiased bilinear filter in numpy. No round is compiled.
"""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from fedgan_jax import config_lib, presets
from fedgan_jax.data import triggers
from fedgan_jax.federated import losses
from fedgan_jax.models import dcgan

# ---------------------------------------------------------------- train.bce='torch'

# -120..40 with the saturation points: exp(-x) overflows at -88.72 (p = 0), the 1e-12 floor of BCELoss's backward
# at -27.63, 1 + exp(-x) rounds to 1 at 16.64 (p = 1).
_LOGITS = np.array(
  [-120, -100, -90, -88.8, -88.7, -88, -87.5, -87, -60, -35, -30, -27.7, -27.6, -27, -20, -10, -3, -1, -0.25, 0]
  + [0.5, 2, 9, 12, 15, 16.5, 16.6, 16.7, 17, 20, 30, 40],
  np.float32,
)


def _torch_bce_np(x: np.ndarray, y: float) -> tuple[np.float32, np.ndarray]:
  """PyTorch's Sigmoid + BCELoss (mean) in float32: the loss and its gradient w.r.t. the logits (ATen's formulas)."""
  x, y, n = x.astype(np.float32), np.float32(y), np.float32(x.size)
  with np.errstate(over="ignore", divide="ignore"):
    p = np.float32(1) / (np.float32(1) + np.exp(-x))
    per = (y - 1) * np.maximum(np.log1p(-p), np.float32(-100)) - y * np.maximum(np.log(p), np.float32(-100))
  grad_p = (p - y) / np.maximum((1 - p) * p, np.float32(1e-12)) / n
  return np.float32(per.astype(np.float64).mean()), grad_p * (1 - p) * p


def _per_element(y: float):
  """Value and logit gradient of torch_bce on each logit alone (batch of 1), jitted and vmapped."""
  return jax.jit(jax.vmap(jax.value_and_grad(lambda x: losses.torch_bce(x[None], y))))


@pytest.mark.parametrize("label", [1.0, 0.0])
def test_torch_bce_value_and_gradient_match_pytorchs_float32_formulas(label):
  values, grads = (np.asarray(a) for a in _per_element(label)(jnp.asarray(_LOGITS)))
  ref = [_torch_bce_np(x[None], label) for x in _LOGITS]
  np.testing.assert_allclose(values, [v for v, _ in ref], rtol=2e-6, atol=1e-30)
  # atol: PyTorch's gradient is ~1e-26 where p is subnormal (-88.7 < x < -87.3), which XLA:CPU flushes to 0.
  np.testing.assert_allclose(grads, [g[0] for _, g in ref], rtol=2e-6, atol=1e-25)
  at = {float(x): (float(v), float(g)) for x, v, g in zip(_LOGITS.astype(np.float64).round(4), values, grads)}
  if label == 1.0:
    assert at[-27.0][1] == pytest.approx(-1.0, abs=1e-6)  # Still the full gradient ...
    assert at[-30.0][1] == pytest.approx(-0.0936, rel=1e-2) and at[-35.0][1] == pytest.approx(-6.3e-4, rel=1e-2)
    assert at[-88.0][0] == pytest.approx(88.0, abs=1e-3) and at[-90.0][0] == at[-120.0][0] == 100.0  # Capped.
  else:
    assert at[16.6][0] == pytest.approx(15.94, abs=0.01) and at[16.6][1] > 0.99
    assert at[16.7][0] == at[40.0][0] == 100.0 and at[16.7][1] == at[40.0][1] == 0.0  # 1 - p == 0 in float32.


def test_torch_bce_batch_mean_and_the_adversarial_losses():
  rng = np.random.default_rng(0)
  real = np.concatenate([rng.normal(0, 5, 13), [-40.0, 30.0, -100.0]]).astype(np.float32)
  fake = np.concatenate([rng.normal(2, 6, 13), [17.0, -30.0, 50.0]]).astype(np.float32)
  v1, g1 = _torch_bce_np(real, 1.0)
  v0, g0 = _torch_bce_np(fake, 0.0)
  d_loss, (g_real, g_fake) = jax.value_and_grad(lambda r, f: losses.d_adversarial("bce", r, f, "torch"), (0, 1))(
    jnp.asarray(real), jnp.asarray(fake)
  )
  np.testing.assert_allclose(d_loss, v1 + v0, rtol=1e-6)  # errD_real + errD_fake.
  np.testing.assert_allclose(g_real, g1, rtol=2e-6, atol=1e-30)
  np.testing.assert_allclose(g_fake, g0, rtol=2e-6, atol=1e-30)
  vg, gg = _torch_bce_np(fake, 1.0)
  g_loss, g_grad = jax.value_and_grad(lambda f: losses.g_adversarial("bce", f, "torch"))(jnp.asarray(fake))
  np.testing.assert_allclose(g_loss, vg, rtol=1e-6)
  np.testing.assert_allclose(g_grad, gg, rtol=2e-6, atol=1e-30)
  # Under vmap over clients and jit, as in a round: each row its own batch mean.
  both = np.stack([real, fake])
  rows = jax.jit(jax.vmap(jax.grad(lambda x: losses.g_adversarial("bce", x, "torch"))))(jnp.asarray(both))
  np.testing.assert_allclose(rows, np.stack([_torch_bce_np(r, 1.0)[1] for r in both]), rtol=2e-6, atol=1e-30)
  with pytest.raises(ValueError, match="train.bce='clamped'"):
    losses.g_adversarial("bce", jnp.zeros(2), "clamped")


@pytest.mark.parametrize("label", [1.0, 0.0])
def test_torch_bce_equals_stable_bce_where_nothing_saturates(label):
  x = np.linspace(-9.9, 9.9, 199).astype(np.float32)
  values, grads = (np.asarray(a) for a in _per_element(label)(jnp.asarray(x)))
  stable = jax.vmap(
    jax.value_and_grad(
      lambda v: losses.g_adversarial("bce", -v[None]) if label == 0.0 else losses.g_adversarial("bce", v[None])
    )
  )
  s_values, s_grads = (np.asarray(a) for a in stable(jnp.asarray(x)))
  p = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
  # Within 1e-5 but for PyTorch's own float32 rounding of p = 1 / (1 + e) near 1: two roundings, < 2^-23 in all
  # (measured <= 1.33 * 2^-24), so log1p(-p) (label 0) is off by up to 2^-23 / (1 - p), 6e-4 at x = 9.9 (within
  # 1e-5 while 1 - p >= 1.2 %, x <= 4.4), and the label-1 gradient, -(1 - p), by 2^-23 absolute.
  tol = 1e-5 + (2.0**-23 / (1.0 - p) if label == 0.0 else 0.0)
  assert np.all(np.abs(values - s_values) <= tol)
  assert np.all(np.abs(values - s_values)[x <= 4.4] <= 1e-5)
  assert np.all(np.abs(grads - s_grads) <= 1e-5 * np.abs(s_grads) + 2.0**-23)


# ---------------------------------------------------------------- model.d_init, model.d_norm_first


def _d_config(**overrides):
  c = config_lib.base_config()
  c.model.d_width = 8
  for dotted, value in overrides.items():
    config_lib.set_field(c, dotted, value)
  return config_lib.validate(c)


def _d_vars(config, seed=0, batch=2):
  _, d = dcgan.build(config)
  x = jnp.zeros((batch, config.resolution, config.resolution, config.data.channels))
  return d, d.init(jax.random.key(seed), x)


def _kernels(params):
  """{layer: kernel} for the convs and the logit, with fan_in = k * k * in (the conv's) or the Dense's input size."""
  return {name: np.asarray(layer["kernel"]) for name, layer in params.items() if "kernel" in layer}


@pytest.mark.parametrize("impl", ["xla", "fast_cpu", "gemm"])
def test_torch_init_is_pytorchs_default_with_every_conv_impl(impl):
  config = _d_config(**{"model.d_init": "torch", "model.conv_impl": impl})
  d, variables = _d_vars(config)
  kernels = _kernels(variables["params"])
  assert sorted(kernels) == ["down0", "down1", "in", "logit"]
  for name, w in kernels.items():
    fan_in = int(np.prod(w.shape[:-1]))  # [4, 4, in, out] -> 16 * in; the logit's [4 * 4 * ch, 1] -> 16 * ch.
    bound = 1.0 / np.sqrt(fan_in)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound, name  # >= 384 draws: max near the bound.
    assert np.std(w) == pytest.approx(bound / np.sqrt(3.0), rel=0.1), name  # <= 2.3 % sampling error.
    assert abs(np.mean(w)) < 0.15 * bound, name
  for layer in variables["params"].values():  # BatchNorm2d's defaults (d_norm 'batch' here).
    if "scale" in layer:
      np.testing.assert_array_equal(layer["scale"], 1.0)
      np.testing.assert_array_equal(layer["bias"], 0.0)
  assert any("scale" in layer for layer in variables["params"].values())
  # The same draws whatever the lowering, and the same function.
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  out = jax.jit(lambda v, x: d.apply(v, x, train=True, mutable=["batch_stats"])[0])(variables, x)
  ref_d, ref_vars = _d_vars(_d_config(**{"model.d_init": "torch", "model.conv_impl": "xla"}))
  jax.tree.map(np.testing.assert_array_equal, variables, ref_vars)
  ref = ref_d.apply(ref_vars, x, train=True, mutable=["batch_stats"])[0]
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_dcgan_init_is_unchanged():
  _, variables = _d_vars(_d_config())
  for name, w in _kernels(variables["params"]).items():
    assert np.std(w) == pytest.approx(0.02, rel=0.1), name
  scales = np.concatenate([np.ravel(l["scale"]) for l in variables["params"].values() if "scale" in l])
  assert 0.005 < np.std(scales) < 0.04 and abs(np.mean(scales) - 1.0) < 0.01  # BatchNorm scale N(1, 0.02).
  with pytest.raises(ValueError, match="model.d_init='xavier'"):
    dcgan.Discriminator(32, 8, weight_init="xavier").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_norm_first_adds_a_norm_after_the_first_conv_only_when_set(norm):
  without = _d_vars(_d_config(**{"model.d_norm": norm}))[1]
  with_first = _d_vars(_d_config(**{"model.d_norm": norm, "model.d_norm_first": True}))[1]
  assert "norm_in" not in without["params"]
  assert set(with_first["params"]) - set(without["params"]) == {"norm_in"}
  assert with_first["params"]["norm_in"]["scale"].shape == (8,)  # d_width channels of the first conv.
  if norm == "batch":
    assert "norm_in" in with_first["batch_stats"] and "norm_in" not in without["batch_stats"]
  presets_cfg = presets.apply(_d_config(), presets.GRADIENT_PENALTY)
  assert presets_cfg.model.d_norm_first is True and presets_cfg.model.d_norm == "instance"


# Measured (3 data seeds x 10 init seeds, 8 zero-mean N(0, 1) images of 32 px, width 8), max |D(0.5x) - D(x)| over
# the batch relative to std D(x). dcgan init: with the first norm <= 8.3e-4, without >= 9.3e-3 (max 6.5e-2).
# torch init: with <= 4.2e-5, without 1.2e-4 .. 4.9e-4. Without the first norm D is not far from invariant
# either: its convs have no bias and LeakyReLU is positively homogeneous, so the scale reaches the first norm
# (after the second conv) intact and that norm removes it; what is left is eps = 1e-5 against the variance the
# first norm sees: larger right after the first conv.
@pytest.mark.parametrize("init,with_max,without_min", [("dcgan", 1e-3, 5e-3), ("torch", 8e-5, 1e-4)])
def test_instance_norm_after_the_first_conv_makes_d_nearly_invariant_to_contrast(init, with_max, without_min):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((8, 32, 32, 3)).astype(np.float32)
  x = jnp.asarray(x - x.mean(axis=(1, 2, 3), keepdims=True))
  dev = {}
  for first in (False, True):
    d, v = _d_vars(_d_config(**{"model.d_norm": "instance", "model.d_init": init, "model.d_norm_first": first}), 3)
    f = jax.jit(lambda a: d.apply(v, a, train=True))
    out = f(x)
    dev[first] = float(jnp.max(jnp.abs(f(0.5 * x) - out)) / jnp.std(out))
  assert dev[True] < with_max, dev
  assert dev[False] > without_min and dev[False] > 2.0 * dev[True], dev


# ---------------------------------------------------------------- attack.trigger='bands'


def _low_frequency_fraction(img: np.ndarray, k: int = 2) -> float:
  """Per channel, the mean-free spectral energy at frequencies <= k cycles per side, as a fraction; averaged."""
  fracs = []
  for c in range(img.shape[-1]):
    g = img[..., c] - img[..., c].mean()
    power = np.abs(np.fft.fft2(g)) ** 2
    f = np.abs(np.fft.fftfreq(g.shape[0]) * g.shape[0])
    fracs.append(power[np.maximum(f[:, None], f[None, :]) <= k].sum() / power.sum())
  return float(np.mean(fracs))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [2, 4, 16])
def test_bands_trigger_shape_range_fixed_and_not_constant(size, channels):
  t = triggers.bands_trigger(size, channels)
  assert t.shape == (size, size, channels) and t.dtype == np.float32
  assert t.min() >= -1.0 and t.max() <= 1.0
  np.testing.assert_array_equal(t, triggers.bands_trigger(size, channels))
  assert np.ptp(t) > 0.2 and np.std(t) > 0.05


def test_bands_trigger_is_low_frequency_and_saturated():
  bands, default = triggers.bands_trigger(16, 3), triggers.default_trigger(16, 3)
  # Measured: 0.92 of the energy within 2 cycles per side for the bands, 0.08 for the default pattern.
  assert _low_frequency_fraction(bands) > 0.8 and _low_frequency_fraction(default) < 0.3
  assert _low_frequency_fraction(triggers.bands_trigger(16, 1)) > 0.8
  assert (np.abs(bands) > 0.95).mean() > 0.3  # Saturated colour blocks, not a grey blur.
  config = config_lib.base_config()
  config.resolution, config.attack.trigger, config.attack.trigger_range = 256, "bands", "unit"
  np.testing.assert_allclose(triggers.load_trigger(config), (bands + 1.0) / 2.0)


# ---------------------------------------------------------------- PNG triggers: antialiased bilinear


def _pil_bilinear_np(img: np.ndarray, out: int) -> np.ndarray:
  """PIL's BILINEAR resize in float: a triangle filter whose support widens by the downscale factor, per axis."""

  def weights(n):
    scale = n / out
    support = max(scale, 1.0)  # Triangle of radius 1 input px, stretched by the factor when downscaling.
    w = np.zeros((out, n))
    for i in range(out):
      centre = (i + 0.5) * scale
      j = np.arange(n)
      w[i] = np.clip(1.0 - np.abs((j + 0.5 - centre) / support), 0.0, None)
      w[i] /= w[i].sum()
    return w

  wy, wx = weights(img.shape[0]), weights(img.shape[1])
  return np.einsum("yi,xj,ijc->yxc", wy, wx, img.astype(np.float64))


@pytest.mark.parametrize("channels,src", [(3, 20), (1, 23), (3, 64)])
def test_png_trigger_is_resized_with_antialiased_bilinear(tmp_path, channels, src):
  from PIL import Image

  rng = np.random.default_rng(channels + src)
  img = rng.integers(0, 256, (src, src, channels), dtype=np.uint8)
  img[: src // 2] = np.clip(img[: src // 2].astype(int) + 60, 0, 255)  # Some large-scale structure too.
  Image.fromarray(img[..., 0] if channels == 1 else img, "L" if channels == 1 else "RGB").save(tmp_path / "t.png")
  config = config_lib.base_config()
  config.resolution, config.data.channels = 64, channels
  config.attack.trigger, config.attack.trigger_size = str(tmp_path / "t.png"), 6
  got = (triggers.load_trigger(config) + 1.0) * 127.5  # Grey levels.
  ref = _pil_bilinear_np(img, 6)
  assert got.shape == (6, 6, channels)
  assert np.abs(got - ref).max() <= 1.0 + 1e-4  # PIL rounds to 8 bits after each of its two passes.
  nearest = img[(np.arange(6) * src) // 6][:, (np.arange(6) * src) // 6]
  assert np.abs(nearest - ref).max() > 10  # The test tells the old nearest-neighbour resize apart.


def test_trigger_errors_name_the_accepted_values(tmp_path):
  config = config_lib.base_config()
  config.attack.trigger = str(tmp_path / "missing.png")
  with pytest.raises(FileNotFoundError, match=r"attack.trigger=.*accepted: 'default', 'bands' or a PNG path"):
    triggers.load_trigger(config)


# ---------------------------------------------------------------- config fields and configs/paper_full.py


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("model.d_init", "xavier", r"config.model.d_init='xavier' is invalid: accepted values are \['dcgan', 'torch'\]"),
    ("model.d_norm_first", None, r"config.model.d_norm_first=None is invalid: accepted values are False, True"),
    ("train.bce", "logits", r"config.train.bce='logits' is invalid: accepted values are \['stable', 'torch'\]"),
  ],
)
def test_new_fields_validate(field, value, match):
  c = config_lib.base_config()
  node, last = config_lib._field(c, field)
  node[last] = value
  with pytest.raises(ValueError, match=match):
    config_lib.validate(c)


def test_d_norm_first_takes_only_booleans_from_the_command_line():
  with pytest.raises(ValueError, match=r"config.model.d_norm_first='yes': wrong type"):
    config_lib.parse_override(config_lib.base_config(), "model.d_norm_first", "yes")
  c = config_lib.base_config()
  config_lib.parse_override(c, "model.d_norm_first", "True")
  assert config_lib.validate(c).model.d_norm_first is True


def _paper_full():
  spec = importlib.util.spec_from_file_location("paper_full", os.path.join(ROOT, "configs", "paper_full.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize("setting", ["clean", "attack", "detect", "gp", "both"])
def test_paper_full_runs_the_codes_d_loss_and_trigger(setting):
  c = config_lib.validate(_paper_full().get_config(setting))
  gp = setting in ("gp", "both")
  assert (c.model.d_init, c.train.bce, c.attack.trigger) == ("torch", "torch", "bands")
  assert c.model.d_norm_first is gp and c.train.loss == ("wgan" if gp else "bce")
  base = config_lib.base_config()
  assert (base.model.d_init, base.train.bce, base.model.d_norm_first, base.attack.trigger) == (
    "dcgan",
    "stable",
    False,
    "default",
  )
