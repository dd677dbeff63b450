"""Adversarial losses and local regularizers (the paper's defense 2).

Total loss = adversarial loss + sum(weight_i * regularizer_i). WGAN-GP
(Gulrajani et al. 2017) is the paper's local training regularization: gradient
penalty lambda = 10, a discriminator without BatchNorm and RMSprop.

BCE comes in two forms (``train.bce``): ``'stable'``, the softplus of the
logits, and ``'torch'``, the paper's ``nn.Sigmoid()`` + ``nn.BCELoss()`` in
float32 (``torch_bce``), whose saturation changes what the losses report and
how the players learn once D is confident.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

BCE_KINDS = ("stable", "torch")


def torch_bce(logits: jax.Array, label: float) -> jax.Array:
  """``nn.BCELoss()(nn.Sigmoid()(logits), label)`` in float32: value and gradient as PyTorch computes them.

  Forward: ``p = 1 / (1 + exp(-x))``; the mean over the batch of
  ``(y - 1) * max(log1p(-p), -100) - y * max(log(p), -100)`` (ATen's kernel).
  Backward (``custom_vjp``, ATen's formulas rather than the calculus):
  ``grad_p = (p - y) / max((1 - p) * p, 1e-12) / N``, then the sigmoid's
  ``grad_x = grad_p * (1 - p) * p`` from the float32 output. So for ``y = 1``
  the logit gradient is about -1/N down to x ≈ -27.6 and then collapses
  (the 1e-12 floor; -0.094/N at -30), and the loss stops at 100; for ``y = 0``,
  ``p`` rounds to 1 once x > ~16.6: the loss jumps to 100 and the gradient is 0.
  ``p`` is exactly 0, and ``log p`` clamped to -100, once ``exp(-x)`` overflows
  (x < ~-88.7).

  Args:
    logits: ``[N]`` discriminator logits (any float dtype; computed in float32).
    label: the target of every element, a Python float (1.0 real, 0.0 fake).

  Returns:
    The scalar mean loss (float32).
  """
  return _torch_bce(jnp.asarray(logits).astype(jnp.float32), float(label))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _torch_bce(x: jax.Array, label: float) -> jax.Array:
  return _torch_bce_fwd(x, label)[0]


def _torch_bce_fwd(x, label):
  # PyTorch's float32 sigmoid is 1 / (1 + exp(-x)) (jax.nn.sigmoid may lower to a formula that rounds elsewhere).
  e = jnp.exp(-x)
  p = 1.0 / (1.0 + e)
  # Where PyTorch's p is subnormal (-88.7 < x < -87.3) XLA:CPU flushes it to 0, whose log would clamp to -100
  # instead of ~-88: there 1 + e rounds to e, so log p = -log(e). Where e overflows PyTorch's p is 0: -inf, said
  # explicitly because XLA may rewrite -log(exp(-x)) as x.
  log_p = jnp.where(p > 0, jnp.log(p), jnp.where(jnp.isfinite(e), -jnp.log(e), -jnp.inf))
  y = jnp.float32(label)
  per = (y - 1.0) * jnp.maximum(jnp.log1p(-p), -100.0) - y * jnp.maximum(log_p, -100.0)
  return jnp.mean(per), p


def _torch_bce_bwd(label, p, g):
  y = jnp.float32(label)
  grad_p = g * (p - y) / jnp.maximum((1.0 - p) * p, 1e-12) / p.size  # binary_cross_entropy_backward, mean.
  return (grad_p * (1.0 - p) * p,)  # sigmoid_backward: grad * (1 - out) * out, from the float32 output.


_torch_bce.defvjp(_torch_bce_fwd, _torch_bce_bwd)


def _check_bce(bce: str) -> None:
  if bce not in BCE_KINDS:
    raise ValueError(f"train.bce={bce!r}: accepted {list(BCE_KINDS)}.")


def d_adversarial(kind: str, real_logits: jax.Array, fake_logits: jax.Array, bce: str = "stable") -> jax.Array:
  """Discriminator loss for ``train.loss=kind``.

  Args:
    kind: ``train.loss``: ``'bce'``, ``'wgan'`` or ``'hinge'``.
    real_logits: D's logits ``[B]`` on real images.
    fake_logits: D's logits ``[B]`` on generated images.
    bce: ``train.bce`` (read with ``kind='bce'``): ``'stable'`` or ``'torch'`` (``torch_bce``; real label 1,
      fake label 0, two batch means summed as the paper's ``errD_real + errD_fake``).

  Returns:
    The scalar loss.
  """
  if kind == "bce":
    _check_bce(bce)
    if bce == "torch":
      return torch_bce(real_logits, 1.0) + torch_bce(fake_logits, 0.0)
    return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))
  if kind == "wgan":
    return jnp.mean(fake_logits) - jnp.mean(real_logits)
  if kind == "hinge":
    return jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))
  raise ValueError(f"train.loss={kind!r}: accepted 'bce', 'wgan', 'hinge'.")


def g_adversarial(kind: str, fake_logits: jax.Array, bce: str = "stable") -> jax.Array:
  """Generator loss for ``train.loss=kind`` (non-saturating for bce).

  Args:
    kind: ``train.loss``.
    fake_logits: D's logits ``[B]`` on generated images.
    bce: ``train.bce`` (read with ``kind='bce'``); ``'torch'``: ``torch_bce`` with label 1.

  Returns:
    The scalar loss.
  """
  if kind == "bce":
    _check_bce(bce)
    if bce == "torch":
      return torch_bce(fake_logits, 1.0)
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
  return gradient_penalty_at(d_fn, real, fake, interpolation_coefficients(key, real, interpolation))


def interpolation_coefficients(key: jax.Array, real: jax.Array, interpolation: str = "uniform") -> jax.Array:
  """WGAN-GP's ``eps`` of each image, ``[B, 1, 1, 1]``: ``U[0, 1]`` or (``'normal'``) ``N(0, 1)``.

  Raises:
    ValueError: ``interpolation`` is neither ``'uniform'`` nor ``'normal'``.
  """
  shape = (real.shape[0],) + (1,) * (real.ndim - 1)
  if interpolation == "normal":
    return jax.random.normal(key, shape, real.dtype)
  if interpolation == "uniform":
    return jax.random.uniform(key, shape, real.dtype)
  raise ValueError(f"train.gp_interpolation={interpolation!r}: accepted 'uniform', 'normal'.")


def gradient_penalty_at(
  d_fn: Callable[[jax.Array], jax.Array], real: jax.Array, fake: jax.Array, eps: jax.Array
) -> jax.Array:
  """``gradient_penalty`` with given coefficients ``eps`` (``[B, 1, 1, 1]``): one image's term at ``B = 1``.

  DP-SGD (``federated.dp_sgd``) computes each real image's penalty on its own interpolate with this.
  """
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
