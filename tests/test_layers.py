"""Convolution lowerings: fast_cpu and gemm equal stock XLA in values and 1st/2nd-order gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedgan_jax.models import layers


def _np_conv_transpose(y, w, stride, pad):
  """Reference: PyTorch ConvTranspose2d semantics by explicit scatter. w: [k, k, out, in]."""
  n, h, wd, cin = y.shape
  k, _, cout, _ = w.shape
  full = np.zeros((n, (h - 1) * stride + k, (wd - 1) * stride + k, cout))
  for i in range(h):
    for j in range(wd):
      full[:, i * stride : i * stride + k, j * stride : j * stride + k, :] += np.einsum("nc,abxc->nabx", y[:, i, j], w)
  return full[:, pad : pad + h * stride, pad : pad + wd * stride]


@pytest.mark.parametrize("impl", ["xla", "fast_cpu", "gemm"])
def test_transposed_conv_matches_reference(impl):
  rng = np.random.default_rng(0)
  y = rng.normal(size=(2, 3, 3, 5)).astype(np.float32)
  w = rng.normal(size=(4, 4, 2, 5)).astype(np.float32)
  out = np.asarray(layers.conv2d_transpose(jnp.asarray(y), jnp.asarray(w), 2, 1, impl))
  np.testing.assert_allclose(out, _np_conv_transpose(y, w, 2, 1), rtol=1e-4, atol=1e-4)


def _loss(impl):
  def f(w1, w2, x):
    h = jax.nn.leaky_relu(layers.conv2d(x, w1, 2, 1, impl), 0.2)
    out = layers.conv2d_transpose(h, w2, 2, 1, impl)
    # A gradient-penalty-like term: a gradient w.r.t. the input inside the loss.
    gx = jax.grad(lambda xx: jnp.sum(jnp.tanh(layers.conv2d(xx, w1, 2, 1, impl))))(x)
    return jnp.sum(out**2) + jnp.sum(gx**2)

  return f


@pytest.mark.parametrize("impl", ["fast_cpu", "gemm"])
def test_lowering_equals_xla_vmapped_first_and_second_order(impl):
  rng = np.random.default_rng(1)
  C = 3
  w1 = jnp.asarray(rng.normal(size=(C, 4, 4, 3, 4)).astype(np.float32) * 0.3)
  w2 = jnp.asarray(rng.normal(size=(C, 4, 4, 3, 4)).astype(np.float32) * 0.3)
  x = jnp.asarray(rng.normal(size=(C, 2, 8, 8, 3)).astype(np.float32))
  results = {}
  for name in ("xla", impl):
    f = _loss(name)
    val = jax.vmap(f)(w1, w2, x)
    grads = jax.vmap(jax.grad(f, argnums=(0, 1, 2)))(w1, w2, x)
    results[name] = (val, grads)
  np.testing.assert_allclose(results[impl][0], results["xla"][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(results[impl][1]), jax.tree.leaves(results["xla"][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


# Odd and even sizes, both strides and the paddings the models use (4x4 s2 p1), and others.
_GEOMETRIES = [(7, 4, 2, 1), (8, 4, 2, 1), (5, 3, 1, 1), (9, 3, 2, 0), (6, 1, 1, 0), (4, 4, 1, 0)]


@pytest.mark.parametrize("hw,k,stride,pad", _GEOMETRIES)
def test_gemm_conv_and_transpose_equal_xla_per_layer_under_vmap(hw, k, stride, pad):
  """Per layer, clients vmapped with their own weights: values, first-order gradients and a
  gradient-penalty-style second-order gradient (d/dw of ||d/dx D(x)||^2) equal stock XLA."""
  rng = np.random.default_rng(5)
  C, cin, cout = 3, 3, 5
  x = jnp.asarray(rng.normal(size=(C, 2, hw, hw + 2, cin)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(C, k, k, cin, cout)).astype(np.float32) * 0.3)
  y_shape = layers._conv(x[0], w[0], stride, pad).shape
  y = jnp.asarray(rng.normal(size=(C,) + y_shape).astype(np.float32))

  def transpose(impl, yy, ww):
    if impl == "gemm":
      return layers._gemm_conv_transpose(yy, ww, stride, pad, x.shape[2:4])
    return jax.vjp(lambda a: layers._conv(a, ww, stride, pad), x[0])[1](yy)[0]

  def losses(impl):
    def conv_loss(xx, ww):
      return jnp.sum(jnp.sin(layers.conv2d(xx, ww, stride, pad, impl)))

    def t_loss(yy, ww):
      return jnp.sum(jnp.sin(transpose(impl, yy, ww)))

    def gp(xx, ww):  # Second order: a gradient w.r.t. the input inside the loss.
      gx = jax.grad(lambda a: jnp.sum(jnp.tanh(layers.conv2d(a, ww, stride, pad, impl))))(xx)
      return jnp.sum(gx**2)

    return conv_loss, t_loss, gp

  got, want = losses("gemm"), losses("xla")
  for g, r, args in zip(got, want, ((x, w), (y, w), (x, w))):
    np.testing.assert_allclose(jax.vmap(g)(*args), jax.vmap(r)(*args), rtol=1e-4, atol=1e-4)
    for a, b in zip(jax.vmap(jax.grad(g, argnums=(0, 1)))(*args), jax.vmap(jax.grad(r, argnums=(0, 1)))(*args)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_gemm_under_vmap_is_batched_matmuls_only():
  """With per-client weights, the gemm lowering of a conv, a transposed conv and their first
  and second-order gradients holds no convolution at all: only dot_generals with the client
  axis as a batch dimension."""
  C = 3
  w1 = jnp.zeros((C, 4, 4, 3, 4))
  w2 = jnp.zeros((C, 4, 4, 3, 4))
  x = jnp.zeros((C, 2, 8, 8, 3))
  f = jax.vmap(jax.grad(_loss("gemm"), argnums=(0, 1, 2)))
  text = jax.jit(f).lower(w1, w2, x).as_text()
  assert "stablehlo.convolution" not in text
  dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
  assert dots and all("batching_dims = [0] x [0]" in line for line in dots), dots[:3]


def test_weights_shared_across_clients_fold_into_the_batch():
  """vmap over activations only (shared weights) gives the unbatched result per client."""
  rng = np.random.default_rng(2)
  w = jnp.asarray(rng.normal(size=(4, 4, 3, 2)).astype(np.float32))
  x = jnp.asarray(rng.normal(size=(2, 3, 8, 8, 3)).astype(np.float32))
  out = jax.vmap(lambda xx: layers.conv2d(xx, w, 2, 1, "fast_cpu"))(x)
  for c in range(2):
    np.testing.assert_allclose(out[c], layers.conv2d(x[c], w, 2, 1, "xla"), rtol=1e-5, atol=1e-5)


def test_resolve_impl():
  assert layers.resolve_impl("auto", "cpu") == "fast_cpu"
  assert layers.resolve_impl("auto", "gpu") == layers.resolve_impl("auto", "tpu") == "gemm"
  assert layers.resolve_impl("auto") == layers.AUTO_IMPL[jax.default_backend()]
  assert layers.resolve_impl("gemm", "cpu") == "gemm"
  with pytest.raises(ValueError, match=r"model.conv_impl='cudnn': accepted \['auto', 'xla', 'fast_cpu', 'gemm'\]"):
    layers.resolve_impl("cudnn")


@pytest.mark.parametrize("hw,k,stride,pad", [(7, 4, 2, 1), (6, 3, 1, 1), (9, 3, 2, 0), (8, 4, 2, 1)])
def test_input_and_weight_transposes_equal_autodiff(hw, k, stride, pad):
  """The written-out transposes (``_conv_input_t``, ``_conv_weight_t``) equal the VJP of a stock conv."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, hw, hw + 1, 3)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(k, k, 3, 5)).astype(np.float32))
  y, vjp = jax.vjp(lambda a, b: layers._conv(a, b, stride, pad), x, w)
  g = jnp.asarray(rng.normal(size=y.shape).astype(np.float32))
  dx, dw = vjp(g)
  np.testing.assert_allclose(layers._conv_input_t(g, w, stride, pad, x.shape[1:3]), dx, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(layers._conv_weight_t(x, g, w.shape, stride, pad), dw, rtol=1e-4, atol=1e-4)


def test_convs_in_a_rolled_loop_stay_canonical():
  """Inside a rolled scan every conv of a fast_cpu step (forward, both gradients) keeps the
  canonical NHWC/HWIO layout XLA:CPU runs through its library kernels; a folded transpose
  (e.g. ``f01b_i01o->01bf``) falls to a path ~40x slower (benchmarks doc)."""
  rng = np.random.default_rng(4)
  w = jnp.asarray(rng.normal(size=(4, 4, 3, 4)).astype(np.float32))
  w2 = jnp.asarray(rng.normal(size=(4, 4, 2, 4)).astype(np.float32))
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)).astype(np.float32))

  def step(ws, _):
    a, b = ws
    f = lambda a, b: jnp.sum(layers.conv2d_transpose(layers.conv2d(x, a, 2, 1, "fast_cpu"), b, 2, 1, "fast_cpu") ** 2)
    ga, gb = jax.grad(f, argnums=(0, 1))(a, b)
    return (a - 1e-3 * ga, b - 1e-3 * gb), None

  hlo = jax.jit(lambda ws: jax.lax.scan(step, ws, None, length=3)[0]).lower((w, w2)).compile().as_text()
  labels = [line.split("dim_labels=")[1].split(",")[0] for line in hlo.splitlines() if " convolution(" in line]
  assert len(labels) >= 5 and "while" in hlo
  assert set(labels) == {"b01f_01io->b01f"}, labels
