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

from fedgan_jax.federated import attack, dp_sgd, latent_trigger, losses, upload_attacks
from fedgan_jax.federated.state import ClientState

PyTree = Any

# RoundData.hyper's names: local-training values a packed sweep point may hold as a traced f32 scalar of its own.
TRACED_HYPER = ("g_lr", "d_lr", "gradient_penalty", "r1", "proximal")


def optimizer(config, lr: float | jax.Array) -> optax.GradientTransformation:
  """The local optimizer of ``train.optimizer`` at learning rate ``lr``.

  ``lr`` may be a traced f32 scalar (a packed sweep point's own, ``RoundData.hyper``): optax scales the
  update by it at run time, and the optimizer's state has the same tree as with a constant (checkpoints
  of packed points and of single runs are interchangeable).

  ``train.rmsprop='pytorch'`` is ``torch.optim.RMSprop``'s defaults (the
  paper's code): ``v = 0.99 v + 0.01 g^2``, step ``lr g / (sqrt(v) + 1e-8)``;
  ``'optax'`` is ``optax.rmsprop``'s (decay 0.9, eps inside the square root).
  """
  t = config.train
  if t.optimizer == "adam":
    return optax.adam(lr, b1=t.b1, b2=t.b2)
  if t.rmsprop == "pytorch":
    return optax.rmsprop(lr, decay=0.99, eps=1e-8, eps_in_sqrt=False)
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


def local_trainer(
  config, generator, discriminator, local_steps: int | None = None
) -> Callable[..., tuple[ClientState, PyTree, PyTree, dict]]:
  """The local training function of one client for ``config``.

  With ``train.local_steps = L > 0`` every client makes L steps on batches
  drawn uniformly (with replacement) from its images (with ``train.dp_sgd``:
  B distinct images, uniformly without replacement, so no image is counted
  twice in one step's sensitivity). With
  ``train.local_steps = 0`` every client makes one local epoch, as in the
  paper's code: its images in a fresh random order, ``count // batch_size``
  full batches (PyTorch's ``drop_last=True``); the program runs the largest
  client's number of steps and a client's extra steps leave it unchanged.

  Args:
    config: the validated run config.
    generator: Flax generator module.
    discriminator: Flax discriminator module.
    local_steps: the number of steps the program runs (static): L, or with
      ``train.local_steps = 0`` the largest client's ``count // batch_size``
      (``assemble.local_steps``).

  Returns:
    ``local_train(client, g_global, d_global, images, count, is_mal, flags,
    trigger, trigger_loc, key, upload=None, trigger_part=None, latent=None, labels=None, hyper=None) -> (client_state,
    g_vars, d_vars, stats)``: the client starts from the global generator (and the global discriminator when
    discriminators are averaged), trains L steps on its own shard, and returns
    its new state, the variables it uploads, and its true losses
    (``g_loss``/``d_loss``: mean over the steps; ``_last``: the last step).
    With ``latent`` (a ``latent_trigger.LatentTrigger``), an attacking client
    (``is_mal``) adds the latent backdoor's term to its G loss (``g_loss``
    stays the adversarial loss) and ``stats['latent_dist']`` is the uploaded
    generator's distance of ``G(z*)`` to ``x*`` (every client; with
    ``model.conditional``, ``z*`` paired with class ``latent_trigger.LATENT_CLASS``).
    With ``model.conditional``, ``labels`` (int32 ``[n_max]``, the shard's
    class ids) are required: each real image is seen with its own label
    (drawn by the same index), every fake batch gets labels drawn from the
    client's own labels (a uniform index below ``count``, so a label-skewed
    client fakes its own class mix), and the gradient penalty's interpolates
    and R1 take the real images' labels.
    With ``hyper`` (``RoundData.hyper``: f32 scalars by name of ``TRACED_HYPER``), those values replace
    ``train.g_lr`` / ``train.d_lr`` / the regularizer weights of ``config``; a regularizer is on or off
    by ``config`` (its term is traced only where the config's weight is nonzero).

    With ``train.dp_sgd.enabled`` the D step is DP-SGD (``federated.dp_sgd``):
    one example is one real image with its paired fake and its own
    gradient-penalty interpolate, each example's gradient clipped to
    ``clip_norm``, Gaussian noise of std ``noise_multiplier * clip_norm``
    added to their sum, divided by B; ``stats['dp_clip_frac']`` is the mean
    fraction of examples clipped. The G steps add no noise: G sees the private
    images only through the (private) D, so its updates are post-processing.
    Off, the program is the one without the feature.

  Raises:
    ValueError: (when traced) ``labels`` given without ``model.conditional``, or missing with it.
    ValueError: ``train.dp_sgd.enabled`` with a discriminator that has
      BatchNorm statistics (examples coupled, statistics released).
  """
  B = config.train.batch_size
  epoch = config.train.local_steps == 0
  L = local_steps or config.train.local_steps
  if not L:
    raise ValueError("train.local_steps=0 (one local epoch): pass local_steps, the largest client's count // batch.")
  nz = config.model.latent_dim
  loss_kind, bce_kind = config.train.loss, config.train.bce
  reg = config.train.regularizers
  gp_w0, r1_w0, prox_w0 = float(reg.gradient_penalty), float(reg.r1), float(reg.proximal)
  avg_d = bool(config.aggregation.average_discriminator)
  random_loc = config.attack.trigger_location == "random"
  g_tx0 = optimizer(config, config.train.g_lr)
  d_tx0 = optimizer(config, config.train.d_lr)
  unroll = scan_unroll(config)
  conditional = bool(config.model.conditional)
  dp = config.train.dp_sgd
  dp_on = bool(dp.enabled)
  clip_norm, noise_multiplier = float(dp.clip_norm), float(dp.noise_multiplier)

  # Labels are passed only to conditional models (y None: the unconditional call, unchanged).
  cond = lambda y: {} if y is None else {"labels": y}

  def d_apply(d_params, d_rest, x, y=None):
    out, new_rest = discriminator.apply(
      {"params": d_params, **d_rest}, x, train=True, mutable=list(d_rest.keys()), **cond(y)
    )
    return out, dict(new_rest)

  def g_apply(g_params, g_rest, z, key, y=None):
    # ``key`` feeds per-call noise inputs (StyleGAN2's noise_mode='random'); DCGAN draws none.
    out, new_rest = generator.apply(
      {"params": g_params, **g_rest}, z, train=True, mutable=list(g_rest.keys()), rngs={"noise": key}, **cond(y)
    )
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
    upload=None,
    trigger_part=None,
    latent=None,
    labels=None,
    hyper=None,
  ):
    if conditional != (labels is not None):
      raise ValueError(
        f"model.conditional={conditional}: local training needs the clients' labels (RoundData.labels) exactly "
        "when the models are class-conditional; assemble.round_data builds them from the config."
      )
    g_params, g_rest = split_vars(g_global)
    d_params, d_rest = split_vars(d_global if avg_d else client.d_vars)
    g_anchor, d_anchor = g_params, d_params
    # Packed sweep points: their own learning rates and regularizer weights (a term's on/off stays the config's).
    hyper = hyper or {}
    if dp_on and set(hyper) & {"gradient_penalty", "r1"}:
      raise ValueError("train.dp_sgd.enabled: the gradient penalty and R1 weights are constants (RoundData.hyper).")
    g_tx = optimizer(config, hyper["g_lr"]) if "g_lr" in hyper else g_tx0
    d_tx = optimizer(config, hyper["d_lr"]) if "d_lr" in hyper else d_tx0
    gp_w = hyper.get("gradient_penalty", gp_w0) if gp_w0 else 0.0
    r1_w = hyper.get("r1", r1_w0) if r1_w0 else 0.0
    prox_w = hyper.get("proximal", prox_w0) if prox_w0 else 0.0
    if dp_on and d_rest:
      raise ValueError(
        f"config.train.dp_sgd.enabled=True needs a discriminator without BatchNorm statistics, got {sorted(d_rest)}: "
        "BatchNorm couples the examples of a batch and its running statistics are released without noise; "
        "use model.d_norm='instance' or 'none'."
      )

    def latent_dist(g_params, g_rest):
      # Inference mode (running statistics, nothing updated), as the global generator is sampled and evaluated.
      y = jnp.full((1,), latent_trigger.LATENT_CLASS, jnp.int32) if conditional else None
      out = generator.apply({"params": g_params, **g_rest}, latent.z[None], train=False, **cond(y))
      return latent_trigger.distance(out, latent.target)[0]

    if epoch:  # A random order of the client's own images (padding sorted last); batch i is its slice i.
      key, k_perm = jax.random.split(key)
      order = jnp.argsort(
        jnp.where(jnp.arange(images.shape[0]) < count, jax.random.uniform(k_perm, images.shape[:1]), 2.0)
      )
      n_steps = count // B

    def fake_labels(k):
      # A uniform index below count: the client's own label distribution (padding is never drawn).
      return labels[jax.random.randint(k, (B,), 0, count)]

    def step(carry, xs):
      k, i = xs
      g_params, g_rest, d_params, d_rest, g_opt, d_opt = carry
      if dp_on:  # One more key, the noise's (the program without DP-SGD keeps its five).
        k_idx, k_zd, k_zg, k_gp, k_loc, k_noise = jax.random.split(k, 6)
      else:
        k_idx, k_zd, k_zg, k_gp, k_loc = jax.random.split(k, 5)
      if epoch:
        idx = jax.lax.dynamic_slice(order, (i * B,), (B,))
      elif dp_on:  # B distinct images: no image counted twice in one step's sensitivity.
        idx = dp_sgd.distinct_indices(k_idx, count, images.shape[0], B)
      else:
        idx = jax.random.randint(k_idx, (B,), 0, count)
      real = images[idx].astype(jnp.float32) / 127.5 - 1.0
      real = attack.poison_batch(real, is_mal & flags[idx], trigger, trigger_loc, k_loc, random_loc, trigger_part)
      # Conditional: real labels by the images' index; fake labels a uniform draw from this client's own labels
      # (keys folded off the fake's: the unconditional draws are unchanged). None when unconditional.
      y_real = labels[idx] if conditional else None
      y_fake = fake_labels(jax.random.fold_in(k_zd, 2)) if conditional else None

      # (1) D step on a real batch and a fake batch (separate BatchNorm passes, as in PyTorch).
      fake, _ = g_apply(g_params, g_rest, jax.random.normal(k_zd, (B, nz)), jax.random.fold_in(k_zd, 1), y_fake)
      fake = jax.lax.stop_gradient(fake)

      def d_loss_fn(dp):
        real_logits, rest1 = d_apply(dp, d_rest, real, y_real)
        fake_logits, rest2 = d_apply(dp, rest1, fake, y_fake)
        loss = losses.d_adversarial(loss_kind, real_logits, fake_logits, bce_kind)
        # The penalties see the real labels: an interpolate of a real and a fake image is judged as the real one's
        # class (the fake's label is drawn independently of the real's, so no pair shares one in general).
        d_fn = lambda x: d_apply(dp, rest2, x, y_real)[0]
        if gp_w0:
          loss = loss + gp_w * losses.gradient_penalty(d_fn, real, fake, k_gp, config.train.gp_interpolation)
        if r1_w0:
          loss = loss + r1_w * losses.r1_penalty(d_fn, real)
        if prox_w0 and avg_d:
          loss = loss + prox_w * losses.proximal(dp, d_anchor)
        return loss, rest2

      if dp_on:
        if conditional:
          d_fn = lambda dp, x, y: d_apply(dp, d_rest, x, y)[0]
        else:
          d_fn = lambda dp, x: d_apply(dp, d_rest, x)[0]
        d_example_loss = dp_sgd.example_loss(d_fn, loss_kind, bce_kind, gp_w, r1_w)
        eps = (
          losses.interpolation_coefficients(k_gp, real, config.train.gp_interpolation)
          if gp_w0
          else jnp.zeros((B,) + (1,) * (real.ndim - 1), real.dtype)
        )
        d_loss, d_grads, clip_frac = dp_sgd.private_value_and_grad(
          d_example_loss,
          d_params,
          (real, fake, eps) + ((y_real, y_fake) if conditional else ()),
          clip_norm,
          noise_multiplier,
          k_noise,
        )
        if prox_w0 and avg_d:  # Reads no data: added after the noise, unclipped.
          p_loss, p_grads = jax.value_and_grad(lambda dp: prox_w * losses.proximal(dp, d_anchor))(d_params)
          d_loss, d_grads = d_loss + p_loss, jax.tree.map(jnp.add, d_grads, p_grads)
      else:
        (d_loss, d_rest), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(d_params)
      d_upd, d_opt = d_tx.update(d_grads, d_opt, d_params)
      d_params = optax.apply_updates(d_params, d_upd)

      # (2) gen_steps G steps through the updated D (D's statistics are not updated here).
      g_loss = jnp.zeros(())
      for j in range(config.train.gen_steps):
        kz = jax.random.fold_in(k_zg, j)
        y_gen = fake_labels(jax.random.fold_in(kz, 2)) if conditional else None

        def g_loss_fn(gp):
          fake, new_g_rest = g_apply(gp, g_rest, jax.random.normal(kz, (B, nz)), jax.random.fold_in(kz, 1), y_gen)
          logits, _ = d_apply(d_params, d_rest, fake, y_gen)
          loss = losses.g_adversarial(loss_kind, logits, bce_kind)
          if prox_w0:
            loss = loss + prox_w * losses.proximal(gp, g_anchor)
          if latent is None:
            return loss, new_g_rest
          # The latent backdoor (attackers only, in the window): G(z*) as the model is sampled, pulled to x*.
          dist = latent_dist(gp, g_rest)
          return loss + latent_trigger.loss_term(is_mal, latent.weight, dist), (new_g_rest, loss)

        if latent is None:
          (g_loss, g_rest), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(g_params)
        else:
          (_, (g_rest, g_loss)), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(g_params)
        g_upd, g_opt = g_tx.update(g_grads, g_opt, g_params)
        g_params = optax.apply_updates(g_params, g_upd)
        if upload is not None:  # A pgd attacker stays in its norm ball (no-op for every other client).
          g_params = upload_attacks.project(g_params, g_anchor, is_mal, upload)
      new = (g_params, g_rest, d_params, d_rest, g_opt, d_opt)
      if epoch:  # Past this client's epoch: the step changes nothing.
        new = jax.tree.map(lambda a, b: jnp.where(i < n_steps, a, b), new, carry)
      return new, (g_loss, d_loss) + ((clip_frac,) if dp_on else ())

    carry = (g_params, g_rest, d_params, d_rest, client.g_opt, client.d_opt)
    carry, (g_losses, d_losses, *clip_fracs) = jax.lax.scan(
      step, carry, (jax.random.split(key, L), jnp.arange(L)), unroll=unroll
    )
    g_params, g_rest, d_params, d_rest, g_opt, d_opt = carry
    if epoch:
      used = jnp.arange(L) < n_steps
      last = jnp.maximum(n_steps - 1, 0)
      stats = {
        "g_loss": jnp.sum(jnp.where(used, g_losses, 0.0)) / jnp.maximum(n_steps, 1),
        "d_loss": jnp.sum(jnp.where(used, d_losses, 0.0)) / jnp.maximum(n_steps, 1),
        "g_loss_last": g_losses[last],
        "d_loss_last": d_losses[last],
      }
    else:
      stats = {
        "g_loss": jnp.mean(g_losses),
        "d_loss": jnp.mean(d_losses),
        "g_loss_last": g_losses[-1],
        "d_loss_last": d_losses[-1],
      }
    if dp_on:
      used = (jnp.arange(L) < n_steps) if epoch else jnp.ones((L,), bool)
      stats["dp_clip_frac"] = jnp.sum(jnp.where(used, clip_fracs[0], 0.0)) / jnp.maximum(jnp.sum(used), 1)
    if latent is not None:
      stats["latent_dist"] = latent_dist(g_params, g_rest)
    new_client = ClientState(d_vars={"params": d_params, **d_rest}, g_opt=g_opt, d_opt=d_opt)
    return new_client, {"params": g_params, **g_rest}, {"params": d_params, **d_rest}, stats

  return local_train
