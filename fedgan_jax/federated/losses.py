"""Adversarial losses and local regularizers (the paper's defense 2).

Total loss = adversarial loss + sum(weight_i * regularizer_i). WGAN-GP
(Gulrajani et al. 2017) is the paper's local training regularization: gradient
penalty lambda = 10, a discriminator without BatchNorm and RMSprop.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def d_adversarial(kind: str, real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
  """Discriminator loss for ``train.loss=kind``."""
  if kind == "bce":
    return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))
  if kind == "wgan":
    return jnp.mean(fake_logits) - jnp.mean(real_logits)
  if kind == "hinge":
    return jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))
  raise ValueError(f"train.loss={kind!r}: accepted 'bce', 'wgan', 'hinge'.")


def g_adversarial(kind: str, fake_logits: jax.Array) -> jax.Array:
  """Generator loss for ``train.loss=kind`` (non-saturating for bce)."""
  if kind == "bce":
    return jnp.mean(jax.nn.softplus(-fake_logits))
  if kind in ("wgan", "hinge"):
    return -jnp.mean(fake_logits)
  raise ValueError(f"train.loss={kind!r}: accepted 'bce', 'wgan', 'hinge'.")


def gradient_penalty(
  d_fn: Callable[[jax.Array], jax.Array],
  real: jax.Array,
  fake: jax.Array,
  key: jax.Array,
  interpolation: str = "uniform",
) -> jax.Array:
  """WGAN-GP: mean over the batch of (||grad_x D(x_hat)||_2 - 1)^2.

  ``x_hat = eps * real + (1 - eps) * fake`` with one ``eps`` per image, drawn
  from ``U[0, 1]`` (Gulrajani et al. 2017) or, with ``interpolation='normal'``,
  from ``N(0, 1)`` as the paper's code does (``torch.randn``; points beyond
  the segment between real and fake).

  Args:
    d_fn: images ``[B, ...]`` -> logits ``[B]`` (per-image independent).
    real: real images.
    fake: generated images (no gradient to G is needed here).
    key: PRNG key for eps.
    interpolation: ``'uniform'`` or ``'normal'`` (``train.gp_interpolation``).

  Returns:
    The penalty (unweighted scalar).
  """
  shape = (real.shape[0],) + (1,) * (real.ndim - 1)
  if interpolation == "normal":
    eps = jax.random.normal(key, shape, real.dtype)
  elif interpolation == "uniform":
    eps = jax.random.uniform(key, shape, real.dtype)
  else:
    raise ValueError(f"train.gp_interpolation={interpolation!r}: accepted 'uniform', 'normal'.")
  x_hat = eps * real + (1.0 - eps) * fake
  grads = jax.grad(lambda x: jnp.sum(d_fn(x)))(x_hat)
  norms = jnp.sqrt(jnp.sum(grads.reshape(grads.shape[0], -1) ** 2, axis=1) + 1e-12)
  return jnp.mean((norms - 1.0) ** 2)


def r1_penalty(d_fn: Callable[[jax.Array], jax.Array], real: jax.Array) -> jax.Array:
  """R1 (Mescheder et al. 2018): 0.5 * mean ||grad_x D(real)||^2 (times gamma outside)."""
  grads = jax.grad(lambda x: jnp.sum(d_fn(x)))(real)
  return 0.5 * jnp.mean(jnp.sum(grads.reshape(grads.shape[0], -1) ** 2, axis=1))


def proximal(params, anchor) -> jax.Array:
  """FedProx term 0.5 * ||params - anchor||^2 (times mu outside)."""
  sq = jax.tree.map(lambda p, a: jnp.sum((p - jax.lax.stop_gradient(a)) ** 2), params, anchor)
  return 0.5 * sum(jax.tree.leaves(sq))
