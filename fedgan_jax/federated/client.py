"""Local training of ONE client: L steps of (a D step, then ``gen_steps`` G steps).

Written for a single client and lifted over the client axis by
``program.build`` (``jax.vmap``, or ``lax.map`` over chunks of clients). The
local steps run under ``lax.scan``; batches are drawn inside the jitted step
by index from the client's device-resident shard.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedgan_jax.federated import attack, losses
from fedgan_jax.federated.state import ClientState

PyTree = Any


def optimizer(config, lr: float) -> optax.GradientTransformation:
  """The local optimizer of ``train.optimizer`` at learning rate ``lr``."""
  t = config.train
  if t.optimizer == "adam":
    return optax.adam(lr, b1=t.b1, b2=t.b2)
  return optax.rmsprop(lr)


def scan_unroll(config) -> int | bool:
  """``lax.scan``'s ``unroll`` for the local steps from ``train.unroll``."""
  u = str(config.train.unroll).lower()
  if u == "auto":
    # On XLA:CPU the unrolled steps run ~8 % faster than a rolled scan (which compiles ~2x faster).
    return True if jax.default_backend() == "cpu" else 1
  return True if u == "true" else 1


def split_vars(variables: PyTree) -> tuple[PyTree, dict]:
  """``(params, the other collections)`` of Flax variables."""
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}
  return params, rest


def local_trainer(config, generator, discriminator) -> Callable[..., tuple[ClientState, PyTree, PyTree, dict]]:
  """The local training function of one client for ``config``.

  Args:
    config: the validated run config.
    generator: Flax generator module.
    discriminator: Flax discriminator module.

  Returns:
    ``local_train(client, g_global, d_global, images, count, is_mal, flags,
    trigger, trigger_loc, key) -> (client_state, g_vars, d_vars, stats)``: the
    client starts from the global generator (and the global discriminator when
    discriminators are averaged), trains L steps on its own shard, and returns
    its new state, the variables it uploads, and its true losses
    (``g_loss``/``d_loss``: mean over the steps; ``_last``: the last step).
  """
  B = config.train.batch_size
  L = config.train.local_steps
  nz = config.model.latent_dim
  loss_kind = config.train.loss
  reg = config.train.regularizers
  gp_w, r1_w, prox_w = float(reg.gradient_penalty), float(reg.r1), float(reg.proximal)
  avg_d = bool(config.aggregation.average_discriminator)
  random_loc = config.attack.trigger_location == "random"
  g_tx = optimizer(config, config.train.g_lr)
  d_tx = optimizer(config, config.train.d_lr)
  unroll = scan_unroll(config)

  def d_apply(d_params, d_rest, x):
    out, new_rest = discriminator.apply({"params": d_params, **d_rest}, x, train=True, mutable=list(d_rest.keys()))
    return out, dict(new_rest)

  def g_apply(g_params, g_rest, z):
    out, new_rest = generator.apply({"params": g_params, **g_rest}, z, train=True, mutable=list(g_rest.keys()))
    return out, dict(new_rest)

  def local_train(
    client: ClientState,
    g_global: PyTree,
    d_global: PyTree,
    images: jax.Array,
    count: jax.Array,
    is_mal: jax.Array,
    flags: jax.Array,
    trigger: jax.Array,
    trigger_loc: jax.Array,
    key: jax.Array,
  ):
    g_params, g_rest = split_vars(g_global)
    d_params, d_rest = split_vars(d_global if avg_d else client.d_vars)
    g_anchor, d_anchor = g_params, d_params

    def step(carry, k):
      g_params, g_rest, d_params, d_rest, g_opt, d_opt = carry
      k_idx, k_zd, k_zg, k_gp, k_loc = jax.random.split(k, 5)
      idx = jax.random.randint(k_idx, (B,), 0, count)
      real = images[idx].astype(jnp.float32) / 127.5 - 1.0
      real = attack.poison_batch(real, is_mal & flags[idx], trigger, trigger_loc, k_loc, random_loc)

      # (1) D step on a real batch and a fake batch (separate BatchNorm passes, as in PyTorch).
      fake, _ = g_apply(g_params, g_rest, jax.random.normal(k_zd, (B, nz)))
      fake = jax.lax.stop_gradient(fake)

      def d_loss_fn(dp):
        real_logits, rest1 = d_apply(dp, d_rest, real)
        fake_logits, rest2 = d_apply(dp, rest1, fake)
        loss = losses.d_adversarial(loss_kind, real_logits, fake_logits)
        d_fn = lambda x: d_apply(dp, rest2, x)[0]
        if gp_w:
          loss = loss + gp_w * losses.gradient_penalty(d_fn, real, fake, k_gp)
        if r1_w:
          loss = loss + r1_w * losses.r1_penalty(d_fn, real)
        if prox_w and avg_d:
          loss = loss + prox_w * losses.proximal(dp, d_anchor)
        return loss, rest2

      (d_loss, d_rest), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(d_params)
      d_upd, d_opt = d_tx.update(d_grads, d_opt, d_params)
      d_params = optax.apply_updates(d_params, d_upd)

      # (2) gen_steps G steps through the updated D (D's statistics are not updated here).
      g_loss = jnp.zeros(())
      for j in range(config.train.gen_steps):
        kz = jax.random.fold_in(k_zg, j)

        def g_loss_fn(gp):
          fake, new_g_rest = g_apply(gp, g_rest, jax.random.normal(kz, (B, nz)))
          logits, _ = d_apply(d_params, d_rest, fake)
          loss = losses.g_adversarial(loss_kind, logits)
          if prox_w:
            loss = loss + prox_w * losses.proximal(gp, g_anchor)
          return loss, new_g_rest

        (g_loss, g_rest), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(g_params)
        g_upd, g_opt = g_tx.update(g_grads, g_opt, g_params)
        g_params = optax.apply_updates(g_params, g_upd)
      return (g_params, g_rest, d_params, d_rest, g_opt, d_opt), (g_loss, d_loss)

    carry = (g_params, g_rest, d_params, d_rest, client.g_opt, client.d_opt)
    carry, (g_losses, d_losses) = jax.lax.scan(step, carry, jax.random.split(key, L), unroll=unroll)
    g_params, g_rest, d_params, d_rest, g_opt, d_opt = carry
    stats = {
      "g_loss": jnp.mean(g_losses),
      "d_loss": jnp.mean(d_losses),
      "g_loss_last": g_losses[-1],
      "d_loss_last": d_losses[-1],
    }
    new_client = ClientState(d_vars={"params": d_params, **d_rest}, g_opt=g_opt, d_opt=d_opt)
    return new_client, {"params": g_params, **g_rest}, {"params": d_params, **d_rest}, stats

  return local_train
