"""One federated round as one jitted program (DESIGN §2).

Local training is written for ONE client (``local_train``) and lifted over the
client axis with ``jax.vmap`` (in chunks of ``train.client_chunk`` clients that
run in turn, see ``client_chunk``); the local steps run under ``lax.scan``; the
server aggregation is a pure function over the client axis. Everything that
differs between attack settings (who is malicious, which images are poisoned,
the trigger pixels) is an array input, so one compiled program serves them all.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedgan_jax import aggregation
from fedgan_jax.aggregation import stats as agg_stats
from fedgan_jax.aggregation.base import Aggregator, masked_median
from fedgan_jax.data import triggers
from fedgan_jax.train import losses

PyTree = Any


class RoundData(NamedTuple):
  """Device-resident inputs of every round (never donated, never copied per round).

  Attributes:
    images: uint8 ``[C, n_max, H, W, ch]`` client shards.
    counts: int32 ``[C]`` real images per client.
    is_malicious: bool ``[C]`` ground truth (used by the simulated clients only;
      the aggregator never sees it).
    poison_flags: bool ``[C, n_max]`` images that carry the trigger.
    trigger: f32 ``[s, s, ch]`` in [-1, 1].
    trigger_loc: int32 ``[2]`` (top, left) for the bottom-right location.
    mimic: bool scalar: malicious clients report the honest clients' median
      losses instead of their own (``attack.report_losses='mimic'``).
  """

  images: jax.Array
  counts: jax.Array
  is_malicious: jax.Array
  poison_flags: jax.Array
  trigger: jax.Array
  trigger_loc: jax.Array
  mimic: jax.Array


class ClientState(NamedTuple):
  """What a client keeps between rounds (leading axis C when stacked).

  The client's generator is not stored: it is replaced by the global one at the
  start of every round. Its discriminator persists unless discriminators are
  averaged; optimizer states persist, as in the paper's code.
  """

  d_vars: PyTree
  g_opt: PyTree
  d_opt: PyTree


class RoundState(NamedTuple):
  """Everything a run carries from round to round (and checkpoints)."""

  round: jax.Array          # int32 scalar: rounds completed.
  g_global: PyTree          # Global generator variables {'params', 'batch_stats'}.
  d_global: PyTree          # Global discriminator variables (used if averaged).
  g_agg: PyTree             # Aggregator state for generators.
  d_agg: PyTree             # Aggregator state for discriminators.
  clients: ClientState      # Stacked over clients.


class Program(NamedTuple):
  """The pure functions of a run; ``round`` is not jitted here (callers do)."""

  init: Callable[[jax.Array], RoundState]
  local_train: Callable[..., tuple[ClientState, PyTree, PyTree, dict]]
  round: Callable[[RoundState, RoundData, jax.Array], tuple[RoundState, dict]]
  sample: Callable[[PyTree, jax.Array], jax.Array]
  # ``round`` in its two pieces (client sharding in ``parallel``, the loop benchmark):
  # local_round(state, data, client_keys [C]) -> LocalOut: the vmapped local_train;
  # server_round(state, data, local_out, key) -> (state, metrics): the aggregation.
  local_round: Callable[..., "LocalOut"]
  server_round: Callable[..., tuple[RoundState, dict]]


class LocalOut(NamedTuple):
  """What local training returns for every client (leading axis C)."""

  clients: ClientState      # The clients' new states.
  client_g: PyTree          # Uploaded generator variables.
  client_d: PyTree          # Uploaded discriminator variables.
  stats: dict               # Client-reported stats ([C] arrays).


def client_keys(key: jax.Array, num_clients: int) -> jax.Array:
  """The per-client local-training keys ``[C]`` of the round whose key is ``key``."""
  return jax.random.split(jax.random.split(key, 3)[0], num_clients)


def _optimizer(config, lr: float) -> optax.GradientTransformation:
  t = config.train
  if t.optimizer == "adam":
    return optax.adam(lr, b1=t.b1, b2=t.b2)
  return optax.rmsprop(lr)


def scan_unroll(config):
  """``lax.scan``'s ``unroll`` for the local steps from ``train.unroll``."""
  u = str(config.train.unroll).lower()
  if u == "auto":
    # On XLA:CPU the unrolled steps run ~8 % faster than a rolled scan (which compiles ~2x faster).
    return True if jax.default_backend() == "cpu" else 1
  return True if u == "true" else 1


def client_chunk(config, num_clients: int) -> int:
  """How many clients ``local_round`` vmaps together (``train.client_chunk`` resolved).

  ``0`` (auto) is 1 on CPU and all clients elsewhere. On XLA:CPU a vmapped
  client is no faster than the next one (one client's step already fills the
  cores, and each conv is emitted per client anyway), while vmapping all of
  them makes every op stream C clients' activations through the cache: clients
  in turn inside the same program run ~18 % faster there (docs/benchmarks.md,
  section a). On accelerators the client axis is what fills the device.

  Args:
    config: the experiment config.
    num_clients: clients handled by this program (per device when sharded).
  """
  chunk = int(config.train.client_chunk)
  if chunk == 0:
    chunk = 1 if jax.default_backend() == "cpu" else num_clients
  return max(1, min(chunk, num_clients))


def _split_vars(variables):
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}
  return params, rest


def server_stats(global_vars: PyTree, client_vars: PyTree) -> dict[str, jax.Array]:
  """Stats the server computes itself from the uploaded parameters (not reported by clients).

  ``update_norm``, ``cosine_to_mean`` and ``dist_to_median`` (each ``[C]``) of
  the ``params`` collection (BatchNorm statistics are not updates).
  """
  return agg_stats.server_stats(global_vars["params"], client_vars["params"])


def build(config, generator, discriminator, g_aggregator: Aggregator,
          d_aggregator: Aggregator | None = None) -> Program:
  """Builds the pure functions of a run from a validated config.

  Args:
    config: the run config (``config_lib.validate``-d).
    generator: Flax generator module.
    discriminator: Flax discriminator module.
    g_aggregator: rule applied to generators every round.
    d_aggregator: rule for discriminators when
      ``aggregation.average_discriminator`` (defaults to ``g_aggregator``).

  Returns:
    A ``Program``.
  """
  C = config.num_clients
  B = config.train.batch_size
  L = config.train.local_steps
  nz = config.model.latent_dim
  R = config.resolution
  ch = config.data.channels
  loss_kind = config.train.loss
  reg = config.train.regularizers
  gp_w, r1_w, prox_w = float(reg.gradient_penalty), float(reg.r1), float(reg.proximal)
  avg_d = bool(config.aggregation.average_discriminator)
  random_loc = config.attack.trigger_location == "random"
  g_tx = _optimizer(config, config.train.g_lr)
  d_tx = _optimizer(config, config.train.d_lr)
  d_aggregator = d_aggregator or g_aggregator
  unroll = scan_unroll(config)

  def init(key: jax.Array) -> RoundState:
    kg, kd = jax.random.split(key)
    g_vars = dict(generator.init(kg, jnp.zeros((2, nz)), train=False))
    d_vars = dict(discriminator.init(kd, jnp.zeros((2, R, R, ch)), train=False))
    g_opt = g_tx.init(g_vars["params"])
    d_opt = d_tx.init(d_vars["params"])
    stack = lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x, (C,) + x.shape), t)
    clients = ClientState(d_vars=stack(d_vars), g_opt=stack(g_opt), d_opt=stack(d_opt))
    return RoundState(
        round=jnp.zeros((), jnp.int32), g_global=g_vars, d_global=d_vars,
        g_agg=g_aggregator.init(g_vars), d_agg=d_aggregator.init(d_vars), clients=clients)

  def d_apply(d_params, d_rest, x):
    out, new_rest = discriminator.apply({"params": d_params, **d_rest}, x, train=True,
                                        mutable=list(d_rest.keys()))
    return out, dict(new_rest)

  def g_apply(g_params, g_rest, z):
    out, new_rest = generator.apply({"params": g_params, **g_rest}, z, train=True,
                                    mutable=list(g_rest.keys()))
    return out, dict(new_rest)

  def local_train(client: ClientState, g_global: PyTree, d_global: PyTree, images: jax.Array,
                  count: jax.Array, is_mal: jax.Array, flags: jax.Array, trigger: jax.Array,
                  trigger_loc: jax.Array, key: jax.Array):
    """L local (D, G) steps of ONE client; returns its state, uploads and stats."""
    g_params, g_rest = _split_vars(g_global)
    d_params, d_rest = _split_vars(d_global if avg_d else client.d_vars)
    g_anchor, d_anchor = g_params, d_params

    def step(carry, k):
      g_params, g_rest, d_params, d_rest, g_opt, d_opt = carry
      k_idx, k_zd, k_zg, k_gp, k_loc = jax.random.split(k, 5)
      idx = jax.random.randint(k_idx, (B,), 0, count)
      real = images[idx].astype(jnp.float32) / 127.5 - 1.0
      if random_loc:
        loc = triggers.random_locations(k_loc, B, trigger.shape[0], R)
      else:
        loc = trigger_loc
      real = triggers.paste(real, trigger, loc, is_mal & flags[idx])

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
    g_vars = {"params": g_params, **g_rest}
    d_vars = {"params": d_params, **d_rest}
    stats = {
        "g_loss": jnp.mean(g_losses), "d_loss": jnp.mean(d_losses),
        "g_loss_last": g_losses[-1], "d_loss_last": d_losses[-1],
    }
    return ClientState(d_vars=d_vars, g_opt=g_opt, d_opt=d_opt), g_vars, d_vars, stats

  def local_round(state: RoundState, data: RoundData, keys: jax.Array) -> LocalOut:
    """Local training of all clients; ``keys`` is ``[C]``.

    Clients are vmapped in chunks of ``client_chunk(config, C)``; with fewer
    than C per chunk, ``lax.map`` runs the chunks in turn (a remainder chunk
    is vmapped on its own). Every choice computes the same round.
    """
    def one(xs):
      client, images, count, is_mal, flags, key = xs
      return local_train(client, state.g_global, state.d_global, images, count, is_mal, flags,
                         data.trigger, data.trigger_loc, key)

    per_client = (state.clients, data.images, data.counts, data.is_malicious, data.poison_flags, keys)
    num = keys.shape[0]
    chunk = client_chunk(config, num)
    if chunk >= num:
      return LocalOut(*jax.vmap(one)(per_client))
    return LocalOut(*jax.lax.map(one, per_client, batch_size=chunk if chunk > 1 else None))

  def round_fn(state: RoundState, data: RoundData, key: jax.Array):
    """Local training of all clients (vmapped) + aggregation; ``key`` is this round's key."""
    return server_round(state, data, local_round(state, data, client_keys(key, C)), key)

  def server_round(state: RoundState, data: RoundData, local: LocalOut, key: jax.Array):
    """The server's part of the round whose key is ``key``: aggregation of the uploads."""
    _, k_gagg, k_dagg = jax.random.split(key, 3)
    clients, client_g, client_d, stats = local
    true_stats = dict(stats)
    # A defense-aware attacker reports the honest clients' median losses instead of its own;
    # it cannot fake the stats the server computes from the uploaded parameters.
    liars = data.is_malicious & data.mimic
    stats = {k: jnp.where(liars, masked_median(v, ~data.is_malicious)[0], v) for k, v in stats.items()}
    reported = {**stats, "num_examples": data.counts.astype(jnp.float32)}
    g_stats = {**reported, **server_stats(state.g_global, client_g)}
    g_global, g_agg, g_diag = g_aggregator.aggregate(state.g_agg, state.g_global, client_g, g_stats, k_gagg)
    d_global, d_agg, d_diag = state.d_global, state.d_agg, {}
    if avg_d:
      d_stats = {**reported, **server_stats(state.d_global, client_d)}
      d_global, d_agg, d_diag = d_aggregator.aggregate(state.d_agg, state.d_global, client_d, d_stats, k_dagg)
      clients = clients._replace(d_vars=client_d)
    metrics = {f"train/{k}": v for k, v in true_stats.items()}
    metrics.update({f"train/{k}": g_stats[k] for k in ("update_norm", "cosine_to_mean", "dist_to_median")})
    metrics.update({f"train/reported_{k}": stats[k] for k in ("g_loss", "d_loss")})
    metrics.update({f"agg/{k}": v for k, v in g_diag.items()})
    metrics.update({f"agg_d/{k}": v for k, v in d_diag.items()})
    metrics["train/global_finite"] = jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(g_global)]))
    new_state = RoundState(round=state.round + 1, g_global=g_global, d_global=d_global,
                           g_agg=g_agg, d_agg=d_agg, clients=clients)
    return new_state, metrics

  def sample(g_vars: PyTree, z: jax.Array) -> jax.Array:
    """Global generator images for latents ``z`` (running BatchNorm statistics)."""
    return generator.apply(g_vars, z, train=False)

  return Program(init=init, local_train=local_train, round=round_fn, sample=sample,
                 local_round=local_round, server_round=server_round)


def build_from_config(config) -> tuple[Program, Any, Any]:
  """Models + aggregator + program for a validated config.

  One aggregator serves generators and (when averaged) discriminators: its
  functions are pure, and each model keeps its own aggregator state.
  """
  from fedgan_jax import models
  g, d = models.build(config)
  agg = aggregation.get(config.aggregation.name, num_clients=config.num_clients,
                        **config.aggregation.kwargs.to_dict())
  return build(config, g, d, agg), g, d
