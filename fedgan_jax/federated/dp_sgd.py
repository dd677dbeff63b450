"""DP-SGD on a client's discriminator (``train.dp_sgd``): per-example clipping, Gaussian noise.

Abadi et al., "Deep Learning with Differential Privacy" (CCS 2016): each
example's gradient is clipped to L2 norm S, the clipped gradients are summed,
Gaussian noise N(0, sigma^2 S^2) is added to every coordinate and the sum is
divided by the batch size B; the optimizer then takes that gradient. Applied
to the discriminator of a GAN, the only network that reads private images,
as in DPGAN (Xie et al., "Differentially Private Generative Adversarial
Network", arXiv 1802.06739, 2018) and DP-CGAN (Torkzadehmahani, Kairouz &
Paten, CVPR Workshops 2019). The generator is trained only through the
discriminator's outputs on generated images, so its updates are
post-processing of the private discriminator and need no noise of their own
(Dwork & Roth 2014, Prop. 2.1); GS-WGAN (Chen, Orekondy & Fritz, NeurIPS 2020)
instead sanitizes the gradient that flows from D to G, which is not done here.

What one example is: ONE private real image x_i of the batch, with everything
the discriminator's loss computes from it, namely its real-logit term, the
term of the fake image f_i it is paired with in the batch, and, with the
gradient penalty, the penalty at its own interpolate eps_i x_i + (1 - eps_i) f_i
(and R1 at x_i). The fake term does not depend on x_i, and clipping it
separately would cost no privacy; it is clipped together with the real term
because that is what the standard treatment does: Opacus' DCGAN example
accumulates each sample's real and fake gradients before clipping, and when
the privacy charge of the fake pass was questioned (pytorch/opacus issue #418)
the fix compared (PR #494) found that clipping real and fake together trains,
while clipping them apart made the real gradients too small next to the fake
ones. The FedProx term (``train.regularizers.proximal``) reads no data and is
added after the noise, unclipped.

BatchNorm in D mixes the images of a batch (one example's gradient then
depends on the others) and its running statistics are an unclipped, un-noised
release of the data, so DP-SGD needs ``model.d_norm`` ``'instance'`` (per
image, WGAN-GP's critic) or ``'none'``; ``config_lib.validate`` says so.

The privacy accounting (``fedgan_jax.privacy.dp_sgd_block``) is per client:
every D step is a sampled Gaussian mechanism with noise multiplier sigma and
sampling probability q = B / n_c, composed over the run's D steps, by
``dp_accounting``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedgan_jax.federated import losses

PyTree = Any


def example_loss(
  d_fn: Callable[[PyTree, jax.Array], jax.Array],
  loss_kind: str,
  bce_kind: str = "stable",
  gp_weight: float = 0.0,
  r1_weight: float = 0.0,
) -> Callable[[PyTree, jax.Array, jax.Array, jax.Array], jax.Array]:
  """The discriminator's loss term of ONE example: ``(params, real, fake, eps) -> scalar``.

  The example is one real image ``real`` (``[H, W, C]``), the fake ``fake``
  paired with it and its gradient-penalty coefficient ``eps`` (``[1, 1, 1]``):
  ``losses.d_adversarial`` on the two logits, plus ``gp_weight`` times the
  penalty at ``eps * real + (1 - eps) * fake`` and ``r1_weight`` times R1 at
  ``real``. The mean of this term over a batch is the batch loss of
  ``client.local_trainer`` without DP-SGD (the same losses, per image).

  Args:
    d_fn: ``(params, images [N, ...]) -> logits [N]``, images independent (no BatchNorm); for a
      class-conditional D ``(params, images, labels [N]) -> logits``, and the per-example loss then takes
      ``(params, real, fake, eps, real_label, fake_label)``.
    loss_kind: ``train.loss``.
    bce_kind: ``train.bce``.
    gp_weight: ``train.regularizers.gradient_penalty``.
    r1_weight: ``train.regularizers.r1``.

  Returns:
    The per-example loss, to be vmapped over the batch.
  """

  def loss_fn(params, real, fake, eps, *labels):
    real, fake = real[None], fake[None]
    if labels:  # Class-conditional D: the real image's and its fake's labels; the penalties take the real one's.
      y_real, y_fake = labels[0][None], labels[1][None]
      d = lambda x: d_fn(params, x, y_real)
      fake_logits = d_fn(params, fake, y_fake)
    else:
      d = lambda x: d_fn(params, x)
      fake_logits = d(fake)
    loss = losses.d_adversarial(loss_kind, d(real), fake_logits, bce_kind)
    if gp_weight:
      loss = loss + gp_weight * losses.gradient_penalty_at(d, real, fake, eps[None])
    if r1_weight:
      loss = loss + r1_weight * losses.r1_penalty(d, real)
    return loss

  return loss_fn


def distinct_indices(key: jax.Array, count: jax.Array, size: int, batch: int) -> jax.Array:
  """``batch`` distinct indices drawn uniformly from ``0..count-1`` (a shard of ``size`` slots, padding last).

  The ``batch`` largest of ``size`` uniform draws, the padding slots' replaced by -1: every
  ``batch``-subset of the valid slots is equally likely. Needs ``count >= batch``
  (``assemble.local_steps`` checks it on the host).

  Args:
    key: PRNG key.
    count: the client's number of images (a traced scalar).
    size: the shard's slots (static).
    batch: B (static).

  Returns:
    ``int32[batch]``.
  """
  draws = jnp.where(jnp.arange(size) < count, jax.random.uniform(key, (size,)), -1.0)
  return jax.lax.top_k(draws, batch)[1]


def noisy_clipped_mean(
  per_example_grads: PyTree, clip_norm: float, noise_multiplier: float, key: jax.Array
) -> tuple[PyTree, jax.Array]:
  """``(sum_i clip_S(g_i) + N(0, sigma^2 S^2 I)) / B`` and the fraction of examples clipped.

  Each example's gradient is scaled by ``min(1, S / ||g_i||)`` with its norm
  over every leaf (``optax.per_example_global_norm_clip``), so no example moves
  the sum by more than S in L2.

  Args:
    per_example_grads: a pytree whose leaves have the batch axis ``B`` first.
    clip_norm: S > 0.
    noise_multiplier: sigma >= 0 (0: clipping only, no privacy).
    key: the noise's PRNG key (one independent draw per leaf).

  Returns:
    ``(gradient, clip_fraction)``: the gradient has the leaves' shapes without
    the batch axis; ``clip_fraction`` is the fraction of the B examples whose
    norm exceeded S.
  """
  leaves = jax.tree.leaves(per_example_grads)
  batch = leaves[0].shape[0]
  total, clipped = optax.per_example_global_norm_clip(per_example_grads, clip_norm)
  flat, treedef = jax.tree.flatten(total)
  keys = jax.random.split(key, len(flat))
  std = noise_multiplier * clip_norm
  noisy = [(g + std * jax.random.normal(k, g.shape, g.dtype)) / batch for g, k in zip(flat, keys)]
  return jax.tree.unflatten(treedef, noisy), clipped.astype(jnp.float32) / batch


def private_value_and_grad(
  example_loss: Callable[..., jax.Array],
  params: PyTree,
  examples: tuple[jax.Array, ...],
  clip_norm: float,
  noise_multiplier: float,
  key: jax.Array,
) -> tuple[jax.Array, PyTree, jax.Array]:
  """The DP-SGD gradient of ``mean_i example_loss(params, *example_i)``.

  Per-example gradients come from ``jax.vmap`` of ``jax.grad`` over the
  leading axis of every array of ``examples`` (``params`` shared), then
  ``noisy_clipped_mean``.

  Args:
    example_loss: ``(params, *one_example) -> scalar``: one example's loss
      (for the discriminator, ``client.local_trainer``'s term of one real image).
    params: the parameters differentiated.
    examples: arrays with the batch axis first (e.g. real images, their paired
      fakes, their interpolation coefficients).
    clip_norm: S > 0.
    noise_multiplier: sigma >= 0.
    key: the noise's PRNG key.

  Returns:
    ``(mean loss over the batch, private gradient, fraction of examples clipped)``.
  """
  in_axes = (None,) + (0,) * len(examples)
  values, grads = jax.vmap(jax.value_and_grad(example_loss), in_axes=in_axes)(params, *examples)
  grad, clip_fraction = noisy_clipped_mean(grads, clip_norm, noise_multiplier, key)
  return jnp.mean(values), grad, clip_fraction
