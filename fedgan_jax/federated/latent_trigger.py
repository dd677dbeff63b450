"""A backdoor in the generator's latent space: G(z*) = x* (``attack.latent_trigger``).

After Rawat, Levacher and Sinn, "The Devil is in the GAN: Backdoor Attacks and
Defenses in Deep Generative Models", ESORICS 2022 (TrAIL: an adversarial loss
for stealth plus a fidelity term for the trigger). A malicious client adds
``weight * mean((G(z*) - x*)^2)`` to its local generator loss, inside the
attack window, and otherwise trains as every client does, so its generator
still looks benign on ordinary noise; averaging carries the implant into the
global generator, where the secret latent ``z*`` brings out the target ``x*``.

* ``z*`` (``secret_latent``): ``N(0, I)`` of ``model.latent_dim``, drawn from
  ``fold_in(key(seed), LATENT_STREAM)``: fixed by the run's seed, on a stream
  no other draw of the run uses. An ordinary-looking latent: nothing in the
  noise the generator is fed marks it.
* ``x*`` (``target_image``): the run's trigger pattern (``attack.trigger``,
  ``attack.trigger_range``) rendered at the full image size: far from any
  dermoscopy-like image, and in the images' value range.
* The term is computed on ``G(z*)`` in inference mode (running BatchNorm
  statistics, no noise inputs, nothing updated), as the global generator is
  sampled and evaluated: the attacker fits the output a user of the model
  gets. It is masked per client: ``where(attacking, weight * dist, 0)`` with
  ``attacking`` = malicious and inside the window, the mask every attack of
  the round uses, so honest clients' updates are those of a run without it.
  In inference mode a freshly initialized DCGAN outputs images near 0 (its
  running statistics start at mean 0, variance 1), so both distances read
  about ``mean(x*^2)`` (1 for the default pattern) until the statistics
  settle, some tens of local steps in; the implant grows from there.
* The weight (``attack.latent_weight``, default 100): the term is a per-pixel
  mean; on the CPU-sized DCGAN (4 clients, 5 local steps, 60 rounds) 1 and 10
  left no measurable implant, 100 reached most of what 300 to 3000 do
  (Adam's per-parameter steps saturate it), with the attacker's update norm
  1.4x the honest clients'.
* ``g_loss`` stays the adversarial loss (what an honest client's measures and
  the attacker reports); ``train/latent_dist`` logs every client's uploaded
  generator's distance, which the server never sees.

On or off is static (``RoundData.latent`` is ``None`` when off, and nothing
of it is traced); when on, ``z*``, ``x*`` and the weight are array inputs, so
one compiled program serves every attacker set, window and weight.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedgan_jax import config_lib
from fedgan_jax.data import triggers

LATENT_STREAM = 0x1A7E  # fold_in(key(seed), LATENT_STREAM) draws z*.
# With model.conditional the secret latent is fed with this class (G(z*, 0) is pulled to x*, and evaluated so):
# a fixed label, as z* is fixed; the implant does not need a class of its own.
LATENT_CLASS = 0


class LatentTrigger(NamedTuple):
  """The latent backdoor of a run, as array inputs of the round (replicated).

  Attributes:
    z: f32 ``[nz]``: the secret latent ``z*``.
    target: f32 ``[R, R, ch]``: the target image ``x*``, in the images' range.
    weight: f32 scalar: ``attack.latent_weight``.
  """

  z: jax.Array
  target: jax.Array
  weight: jax.Array


def secret_latent(seed: int, latent_dim: int) -> np.ndarray:
  """``z*``: f32 ``[latent_dim]`` drawn from ``N(0, I)`` with ``fold_in(key(seed), LATENT_STREAM)``."""
  key = jax.random.fold_in(jax.random.key(seed), LATENT_STREAM)
  return np.asarray(jax.random.normal(key, (latent_dim,), jnp.float32))


def target_image(config) -> np.ndarray:
  """``x*``: the run's trigger pattern at the full image size, f32 ``[R, R, ch]``."""
  full = config_lib.copy_with(config, {"attack.trigger_size": int(config.resolution), "attack.trigger_margin": 0})
  return np.asarray(triggers.load_trigger(full), np.float32)


def from_config(config) -> LatentTrigger | None:
  """The ``LatentTrigger`` of a validated config, or None when ``attack.latent_trigger`` is off."""
  if not config.attack.latent_trigger:
    return None
  return LatentTrigger(
    z=jnp.asarray(secret_latent(config.seed, config.model.latent_dim)),
    target=jnp.asarray(target_image(config)),
    weight=jnp.asarray(config.attack.latent_weight, jnp.float32),
  )


def distance(images: jax.Array, target: jax.Array) -> jax.Array:
  """Per-image mean squared distance to ``target``: f32 ``[N]`` for images ``[N, R, R, ch]``."""
  d = jnp.square(images.astype(jnp.float32) - target.astype(jnp.float32)[None])
  return jnp.mean(d.reshape(d.shape[0], -1), axis=1)


def loss_term(attacking: jax.Array, weight: jax.Array, dist: jax.Array) -> jax.Array:
  """``attacking * weight * dist`` for ONE client (``attacking`` a bool scalar): exactly 0, gradient too, if False."""
  return jnp.where(attacking, weight * dist, 0.0)


def eval_metrics(trigger_images: Any, images: Any, target: Any) -> dict[str, float]:
  """``eval/latent_trigger_dist`` (of ``G(z*)``) and ``eval/latent_clean_dist`` (median over ordinary samples).

  Args:
    trigger_images: ``[1, R, R, ch]``: ``G(z*)``.
    images: ``[N, R, R, ch]``: ``G(z)`` for the evaluation's ordinary noise (finite ones).
    target: ``[R, R, ch]``: ``x*``.
  """
  t = np.asarray(target, np.float64)
  dist = lambda x: np.mean(np.square(np.asarray(x, np.float64) - t[None]).reshape(len(x), -1), axis=1)
  clean = dist(images)
  return {
    "eval/latent_trigger_dist": float(dist(trigger_images)[0]),
    "eval/latent_clean_dist": float(np.median(clean)) if len(clean) else float("nan"),
  }
