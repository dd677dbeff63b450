"""Adversarial losses and regularizers against hand-computed values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedgan_jax.federated import losses


def test_bce_losses_at_zero_logits_are_log2():
  z = jnp.zeros(4)
  assert np.isclose(float(losses.d_adversarial("bce", z, z)), 2 * np.log(2))
  assert np.isclose(float(losses.g_adversarial("bce", z)), np.log(2))


def test_wgan_and_hinge_losses():
  real, fake = jnp.asarray([2.0, 0.0]), jnp.asarray([-1.0, 3.0])
  assert float(losses.d_adversarial("wgan", real, fake)) == pytest.approx(1.0 - 1.0)
  # hinge: mean(relu(1-[2,0])) + mean(relu(1+[-1,3])) = 0.5 + 2.0
  assert float(losses.d_adversarial("hinge", real, fake)) == pytest.approx(2.5)
  assert float(losses.g_adversarial("hinge", fake)) == pytest.approx(-1.0)


def test_gradient_penalty_on_linear_discriminator_is_hand_value():
  """D(x) = w.x: grad_x D = w everywhere, so GP = (|w| - 1)^2 = (5 - 1)^2 = 16."""
  w = jnp.asarray([3.0, 4.0])
  d_fn = lambda x: x.reshape(x.shape[0], -1) @ w
  real = jnp.asarray([[1.0, 2.0], [0.0, -1.0]])
  fake = jnp.asarray([[5.0, 5.0], [2.0, 2.0]])
  assert float(losses.gradient_penalty(d_fn, real, fake, jax.random.key(0))) == pytest.approx(16.0)


def test_gradient_penalty_interpolates_with_uniform_eps():
  """D(x) = 0.5|x|^2: grad at x_hat is x_hat, so GP depends on eps; check against numpy."""
  d_fn = lambda x: 0.5 * jnp.sum(x.reshape(x.shape[0], -1) ** 2, axis=1)
  real = jnp.asarray([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
  fake = jnp.asarray([[0.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
  key = jax.random.key(3)
  eps = np.asarray(jax.random.uniform(key, (3, 1)))
  assert np.all((eps >= 0) & (eps <= 1))
  x_hat = eps * np.asarray(real) + (1 - eps) * np.asarray(fake)
  expected = np.mean((np.linalg.norm(x_hat, axis=1) - 1) ** 2)
  assert float(losses.gradient_penalty(d_fn, real, fake, key)) == pytest.approx(expected, rel=1e-5)


def test_r1_and_proximal():
  w = jnp.asarray([3.0, 4.0])
  d_fn = lambda x: x @ w
  assert float(losses.r1_penalty(d_fn, jnp.ones((2, 2)))) == pytest.approx(12.5)
  p = {"a": jnp.asarray([1.0, 2.0]), "b": jnp.asarray(3.0)}
  a = {"a": jnp.asarray([0.0, 0.0]), "b": jnp.asarray(1.0)}
  assert float(losses.proximal(p, a)) == pytest.approx(0.5 * (1 + 4 + 4))
  g = jax.grad(losses.proximal)(p, a)
  np.testing.assert_allclose(g["a"], [1.0, 2.0])
