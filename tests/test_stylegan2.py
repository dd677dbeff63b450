"""The paper's StyleGAN2 generator: shapes, modulation, FIR resampling, lr multiplier, lowering, size."""

from __future__ import annotations

import math

import jax
import jax.extend  # noqa: F401  (jax.extend.core: Jaxpr types)
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from conftest import tiny_config
from fedgan_jax import flops, models
from fedgan_jax.models import stylegan2 as sg2

_DN = ("NHWC", "HWIO", "NHWC")
_FIR = np.array([1.0, 3.0, 3.0, 1.0])


def _tiny(resolution=32, **kw):
  kw = {"channel_base": 16 * resolution, "channel_max": 16, "w_dim": 16, "mapping_layers": 2, **kw}
  return sg2.Generator(resolution=resolution, **kw)


def _init(g, nz=8):
  return g.init(jax.random.key(0), jnp.zeros((2, nz)), train=False)


def _set_noise_strength(variables, value):
  """Noise strengths start at 0 (no effect); tests that look at noise need them on."""
  params = jax.tree_util.tree_map_with_path(
    lambda p, v: jnp.full_like(v, value) if p[-1].key == "noise_strength" else v, variables["params"]
  )
  return {**variables, "params": params}


@pytest.mark.parametrize("resolution", [32, 64])
def test_shapes_finite_and_w_avg_update(resolution):
  g = _tiny(resolution)
  v = _init(g)
  z = jax.random.normal(jax.random.key(1), (3, 8))
  img, new = g.apply(v, z, train=True, mutable=["buffers"])
  assert img.shape == (3, resolution, resolution, 3) and img.dtype == jnp.float32
  assert np.isfinite(np.asarray(img)).all() and float(jnp.std(img)) > 0
  # w_avg <- beta * w_avg + (1 - beta) * mean(w), from zero; in eval mode it stays.
  mapping = {"params": v["params"]["mapping"], "buffers": v["buffers"]["mapping"]}
  w = sg2.MappingNetwork(16, 2, 0.01, 0.998).apply(mapping, z, train=False)
  np.testing.assert_allclose(new["buffers"]["mapping"]["w_avg"], 0.002 * np.mean(w, 0), rtol=1e-4, atol=1e-7)
  _, same = g.apply(v, z, train=False, mutable=["buffers"])
  np.testing.assert_array_equal(same["buffers"]["mapping"]["w_avg"], v["buffers"]["mapping"]["w_avg"])


@pytest.mark.slow
def test_256px_forward_once():
  """256 px with reduced channels (4..32), batch 1, one forward: shape and finite values."""
  g = sg2.Generator(resolution=256, channel_base=1024, channel_max=32, w_dim=32, mapping_layers=2)
  v = _init(g, nz=16)
  assert g.block_channels() == {4: 32, 8: 32, 16: 32, 32: 32, 64: 16, 128: 8, 256: 4}
  img = jax.jit(lambda v, z: g.apply(v, z, train=False))(v, jax.random.normal(jax.random.key(1), (1, 16)))
  assert img.shape == (1, 256, 256, 3) and np.isfinite(np.asarray(img)).all()


def test_demodulation_gives_unit_variance():
  """Unit-variance inputs -> unit-variance outputs per output channel, for random styles."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 24, 24, 64)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(3, 3, 64, 32)).astype(np.float32))
  s = jnp.asarray(rng.lognormal(0.0, 0.7, size=(8, 64)).astype(np.float32))
  out = np.asarray(sg2.modulated_conv2d(x, w, s, demodulate=True))[:, 1:-1, 1:-1]  # Interior: full windows.
  var = out.var(axis=(0, 1, 2))
  assert np.all(np.abs(var - 1) < 0.2) and abs(var.mean() - 1) < 0.05, var
  raw = np.asarray(sg2.modulated_conv2d(x, w, s, demodulate=False))[:, 1:-1, 1:-1].var(axis=(0, 1, 2))
  assert raw.mean() > 10  # Without demodulation the scale follows the styles and weights.


def _grouped_reference(x, weight, styles, demodulate, up):
  """The original's fused form: per-sample modulated weights, one grouped conv over the batch.

  Up: a stride-2 transposed conv (zero-inserted input, flipped kernel, 2H + 1 outputs), then
  the 2-D [1, 3, 3, 1] filter (gain 4) as a depthwise conv with padding 1 (upfirdn2d).
  """
  b, h, wd, cin = x.shape
  k, cout = weight.shape[0], weight.shape[-1]
  wn = weight[None] * styles[:, None, None, :, None]
  if demodulate:
    wn = wn * lax.rsqrt(jnp.sum(wn**2, axis=(1, 2, 3)) + 1e-8)[:, None, None, None, :]
  xg = x.transpose(1, 2, 0, 3).reshape(1, h, wd, b * cin)
  wg = wn.transpose(1, 2, 3, 0, 4).reshape(k, k, cin, b * cout)
  if up == 1:
    p = k // 2
    y = lax.conv_general_dilated(xg, wg, (1, 1), ((p, p), (p, p)), dimension_numbers=_DN, feature_group_count=b)
  else:
    full = lax.conv_general_dilated(
      xg, wg[::-1, ::-1], (1, 1), ((k - 1, k - 1),) * 2, lhs_dilation=(2, 2), dimension_numbers=_DN,
      feature_group_count=b,
    )  # fmt: skip
    f2 = jnp.asarray(np.outer(_FIR, _FIR) / 16, jnp.float32)
    fk = jnp.broadcast_to(f2[:, :, None, None], (4, 4, 1, b * cout))
    y = lax.conv_general_dilated(
      full, fk, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DN, feature_group_count=b * cout
    )
  return y.reshape(y.shape[1], y.shape[2], b, cout).transpose(2, 0, 1, 3)


@pytest.mark.parametrize("impl", ["xla", "fast_cpu", "gemm"])
@pytest.mark.parametrize("k,up,demodulate", [(3, 1, True), (3, 2, True), (1, 1, False), (3, 2, False)])
def test_activation_scaling_equals_grouped_conv(impl, k, up, demodulate):
  """x * s -> conv(x, w) -> * d equals the per-sample grouped conv, in values and gradients."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(3, 5, 6, 4)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(k, k, 4, 5)).astype(np.float32))
  s = jnp.asarray(rng.normal(size=(3, 4)).astype(np.float32))
  probe = jnp.asarray(rng.normal(size=(3, 5 * up, 6 * up, 5)).astype(np.float32))
  ours = lambda x, w, s: sg2.modulated_conv2d(x, w, s, demodulate=demodulate, up=up, impl=impl)
  ref = lambda x, w, s: _grouped_reference(x, w, s, demodulate, up)
  np.testing.assert_allclose(ours(x, w, s), ref(x, w, s), rtol=1e-4, atol=1e-4)
  loss = lambda f: lambda *a: jnp.sum(jnp.tanh(f(*a)) * probe)
  for a, b in zip(jax.grad(loss(ours), (0, 1, 2))(x, w, s), jax.grad(loss(ref), (0, 1, 2))(x, w, s)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_upsample2d_equals_upfirdn2d():
  """The polyphase skip upsampling equals upfirdn2d(up=2, [1, 3, 3, 1], gain 4): zeros inserted,
  padded 2 before and 1 after, filtered."""
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 7, 3)).astype(np.float32))
  f2 = jnp.asarray(np.outer(_FIR, _FIR) / 16, jnp.float32)
  fk = jnp.broadcast_to(f2[:, :, None, None], (4, 4, 1, 3))
  # lhs_dilation gives 2n - 1 samples (no trailing zero): pad 2 before and 2 after.
  ref = lax.conv_general_dilated(
    x, fk, (1, 1), ((2, 2), (2, 2)), lhs_dilation=(2, 2), dimension_numbers=_DN, feature_group_count=3
  )
  np.testing.assert_allclose(sg2.upsample2d(x), ref, rtol=1e-5, atol=1e-6)


def test_mapping_lr_multiplier():
  """The effective weights of a layer with lr_mult = 0.01 move 0.01x as far per Adam step as
  those of the same layer with lr_mult = 1 (the same effective weights, input and loss), in
  weight and in output space; under plain SGD the ratio is lr_mult**2 (the gradient is scaled too)."""
  rng = np.random.default_rng(3)
  fan_in, out = 16, 8
  x = jnp.asarray(rng.normal(size=(5, fan_in)).astype(np.float32))
  target = jnp.asarray(rng.normal(size=(5, out)).astype(np.float32))
  w_eff = jnp.asarray(rng.normal(size=(fan_in, out)).astype(np.float32)) / math.sqrt(fan_in)
  b_eff = jnp.asarray(rng.normal(size=(out,)).astype(np.float32))

  def step(lr_mult, tx):
    layer = sg2.EqualizedDense(out, lr_mult=lr_mult)
    gain = lr_mult / math.sqrt(fan_in)
    params = {"kernel": w_eff / gain, "bias": b_eff / lr_mult}  # Stored so that the effective weights agree.
    loss = lambda p: jnp.mean((layer.apply({"params": p}, x) - target) ** 2)
    upd, _ = tx.update(jax.grad(loss)(params), tx.init(params), params)
    # The layer is affine: the step's change of the output is the layer applied (without a
    # bias of its own) to the update; no difference of large stored weights, no rounding.
    return upd["kernel"] * gain, layer.apply({"params": upd}, x)

  dw, dy = step(0.01, optax.adam(1e-3, eps=0.0))
  dw1, dy1 = step(1.0, optax.adam(1e-3, eps=0.0))
  np.testing.assert_allclose(dw, 0.01 * dw1, rtol=1e-4)
  np.testing.assert_allclose(dy, 0.01 * dy1, rtol=1e-4, atol=1e-9)
  dw, _ = step(0.01, optax.sgd(1e-2))
  dw1, _ = step(1.0, optax.sgd(1e-2))
  np.testing.assert_allclose(dw, 1e-4 * dw1, rtol=1e-4)
  # The mapping network stores its kernels at N(0, 1) / lr_mult.
  v = _init(_tiny(mapping_lr_mult=0.01))
  assert 80 < float(jnp.std(v["params"]["mapping"]["fc1"]["kernel"])) < 120


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["fast_cpu", "gemm"])
def test_lowerings_equal_xla(impl):
  """The whole generator (values and parameter gradients) is the same in every lowering."""
  z = jax.random.normal(jax.random.key(1), (2, 8))
  v = _set_noise_strength(_init(_tiny()), 0.3)

  def run(g):
    loss = lambda p: jnp.mean(jnp.tanh(g.apply({**v, "params": p}, z, train=False)))
    return jax.value_and_grad(loss)(v["params"])

  (a, ga), (b, gb) = run(_tiny(impl=impl)), run(_tiny(impl="xla"))
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(x, y, rtol=2e-3, atol=1e-6)


def test_vmapped_gemm_forward_backward_has_no_convolution():
  """Two clients' generators (per-client parameters) under vmap, forward + backward, with the
  gemm lowering: no convolution at all; with fast_cpu: no grouped convolution."""
  for impl, key in (("gemm", "convolution"), ("fast_cpu", "grouped_convolution")):
    g = _tiny(impl=impl)
    v = jax.tree.map(lambda a: jnp.stack([a, a]), _init(g))

    def client(variables, z):
      params, rest = variables["params"], {k: x for k, x in variables.items() if k != "params"}
      loss = lambda p: jnp.mean(g.apply({"params": p, **rest}, z, train=True, mutable=list(rest))[0] ** 2)
      return jax.grad(loss)(params)

    lowered = jax.jit(jax.vmap(client)).lower(v, jnp.zeros((2, 4, 8)))
    counts = flops.hlo_op_counts(lowered)
    assert counts[key] == 0, counts
  assert counts["dot_general"] > 0


def test_noise_modes():
  z = jax.random.normal(jax.random.key(1), (2, 8))
  v = _set_noise_strength(_init(_tiny()), 0.5)
  const = _tiny().apply(v, z, train=False)
  g = _tiny(noise_mode="random")
  with pytest.raises(Exception, match="noise"):  # Training in 'random' mode without the rng.
    g.apply(v, z, train=True, mutable=["buffers"])
  draw = lambda k: g.apply(v, z, train=True, rngs={"noise": jax.random.key(k)}, mutable=["buffers"])[0]
  np.testing.assert_array_equal(draw(0), draw(0))
  assert float(jnp.max(jnp.abs(draw(0) - draw(1)))) > 1e-3
  np.testing.assert_array_equal(g.apply(v, z, train=False), const)  # Sampling without rng: the const maps.
  none = _tiny(noise_mode="none").apply(v, z, train=False)
  assert float(jnp.max(jnp.abs(none - const))) > 1e-3
  np.testing.assert_array_equal(none, _tiny().apply(_set_noise_strength(v, 0.0), z, train=False))


def _eqns(jaxpr):
  """Every equation of a jaxpr and of its sub-programs."""
  for e in jaxpr.eqns:
    yield e
    for p in e.params.values():
      for q in p if isinstance(p, (tuple, list)) else (p,):
        if isinstance(q, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
          yield from _eqns(getattr(q, "jaxpr", q))


def test_bf16_in_the_highest_resolutions_only():
  g32, v = _tiny(), _init(_tiny())
  z = jax.random.normal(jax.random.key(1), (2, 8))
  ref = g32.apply(v, z, train=False)
  # 16 and 32 px in bf16; 4 and 8 px in float32. fast_cpu: one conv per layer (xla's transposed
  # conv also traces a dead forward conv), inside custom_vjp sub-programs.
  g = _tiny(dtype=jnp.bfloat16, num_bf16_res=2, impl="fast_cpu")
  jaxpr = jax.make_jaxpr(lambda v, z: g.apply(v, z, train=False))(v, z)
  dtypes = sorted(str(e.invars[0].aval.dtype) for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "conv_general_dilated")
  assert dtypes == ["bfloat16"] * 6 + ["float32"] * 5, dtypes  # 3 convs per block; 2 at 4 px.
  out = g.apply(v, z, train=False)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=0.05 * float(jnp.max(jnp.abs(ref))))
  none = _tiny(dtype=jnp.bfloat16, num_bf16_res=0).apply(v, z, train=False)
  np.testing.assert_array_equal(none, ref)


def _original_param_count(z_dim, w_dim, res, channels, base, cmax, mapping_layers=8):
  """Trainable parameters of the original (networks_stylegan2.py) by its layer shapes."""
  fc = lambda i, o: i * o + o  # FullyConnectedLayer: weight [o, i], bias [o].
  n = fc(z_dim, w_dim) + (mapping_layers - 1) * fc(w_dim, w_dim)
  ch = {r: min(base // r, cmax) for r in (2**i for i in range(2, int(math.log2(res)) + 1))}
  layer = lambda ci, co: fc(w_dim, ci) + co * ci * 9 + 1 + co  # affine, weight, noise_strength, bias.
  torgb = lambda ci: fc(w_dim, ci) + channels * ci + channels
  for r, c in ch.items():
    n += (c * 16 if r == 4 else layer(ch[r // 2], c)) + layer(c, c) + torgb(c)
  return n


def test_paper_generator_size_and_flops():
  """The paper's G (z 64, w 128, 256 px, channel_base 32768, channel_max 512): parameter count
  equal to the original's, read off its layer shapes; FLOPs per image of the forward (stock
  convs: the model's arithmetic, docs/design.md §6)."""
  g = sg2.Generator(resolution=256)
  shapes = jax.eval_shape(lambda k: g.init(k, jnp.zeros((2, 64)), train=False), jax.random.key(0))
  n_params = sum(math.prod(a.shape) for a in jax.tree.leaves(shapes["params"]))
  n_buffers = sum(math.prod(a.shape) for a in jax.tree.leaves(shapes["buffers"]))
  assert n_params == _original_param_count(64, 128, 256, 3, 32768, 512) == 24_714_658
  assert n_buffers == 128 + 16 + 2 * sum(r * r for r in (8, 16, 32, 64, 128, 256))  # w_avg, noise_const.
  fwd = jax.jit(lambda v, z: g.apply(v, z, train=False))
  count = flops.count(fwd, shapes, jax.ShapeDtypeStruct((1, 64), jnp.float32))
  # Conv multiply-adds per image under flops' rule (pairs of real input element x kernel tap:
  # (3n - 2)^2 per n x n same-padded 3x3 conv); an up-conv's input is padded by one zero row
  # and column (3h + 2 per axis, where the original's full transposed conv has 3h).
  ch = g.block_channels()
  same = sum((3 * r - 2) ** 2 * c * c + r * r * c * 3 for r, c in ch.items())
  up = lambda extra: sum((3 * (r // 2) + extra) ** 2 * ch[r // 2] * c for r, c in ch.items() if r > 4)
  assert count.conv == 2 * (same + up(2)) == 89_854_427_136
  assert 2 * (same + up(0)) == 89_165_250_560  # The original's convs: ours is 0.77 % more.
  assert count.total < 1.01 * count.conv  # Mapping, styles, demodulation, FIR, noise, activations.


def test_build_dispatch_and_validation():
  config = tiny_config(**{"model.name": "stylegan2", "model.sg2.channel_base": 512, "model.sg2.channel_max": 16})
  g, d = models.build(config)
  assert isinstance(g, sg2.Generator) and isinstance(d, models.Discriminator)
  assert (g.resolution, g.channels, g.channel_base, g.channel_max, g.noise_mode) == (32, 3, 512, 16, "random")
  assert (g.w_dim, g.mapping_layers, g.mapping_lr_mult, g.conv_clamp) == (128, 8, 0.01, 256.0)
  dc, _ = models.build(tiny_config())
  assert isinstance(dc, models.Generator)
  bad = {
    "model.sg2.w_dim": 0,
    "model.sg2.mapping_lr_mult": 0.0,
    "model.sg2.w_avg_beta": 1.5,
    "model.sg2.conv_clamp": -1.0,
    "model.sg2.num_bf16_res": -1,
    "model.sg2.channel_max": 0,
  }
  for field, value in bad.items():
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
      tiny_config(**{field: value})
  with pytest.raises(ValueError, match=r"model\.sg2\.channel_base"):
    tiny_config(**{"model.name": "stylegan2", "model.sg2.channel_base": 16})
