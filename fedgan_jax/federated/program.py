"""One federated round as one jittable program: local training, the clients' reports, the server.

Local training is written for ONE client (``client.local_trainer``) and lifted
over the client axis with ``jax.vmap`` (in chunks of ``train.client_chunk``
clients that run in turn, see ``client_chunk``); the clients' reports are the
attack simulation's (``attack.report``); the server's aggregation is a pure
function over the client axis (``server.server_round``). Everything that
differs between attack settings is an array input, so one compiled program
serves them all. With ``config.clients_per_round = m`` only m clients, drawn
from the round's key, train and upload (``sampling``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fedgan_jax import config_lib
from fedgan_jax.aggregation.base import Aggregator, check_client_axes
from fedgan_jax.aggregation.fltrust import root_size_of
from fedgan_jax.federated import attack, sampling, upload_attacks
from fedgan_jax.federated import client as client_lib
from fedgan_jax.federated import server as server_lib
from fedgan_jax.federated.state import ClientState, LocalOut, Program, RoundData, RoundState

PyTree = Any
SERVER_STREAM = 0x5E7  # fold_in(round key, SERVER_STREAM): the key of the server's own training (fltrust).


def client_keys(key: jax.Array, num_clients: int) -> jax.Array:
  """The per-client local-training keys ``[C]`` of the round whose key is ``key``."""
  return jax.random.split(jax.random.split(key, 3)[0], num_clients)


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


def build(
  config,
  generator,
  discriminator,
  g_aggregator: Aggregator,
  d_aggregator: Aggregator | None = None,
  local_steps: int | None = None,
  rule_for: Callable[[dict | None], Aggregator] | None = None,
) -> Program:
  """Builds the pure functions of a run from a validated config.

  Args:
    config: the run config (``config_lib.validate``-d).
    generator: Flax generator module.
    discriminator: Flax discriminator module.
    g_aggregator: rule applied to generators every round.
    d_aggregator: rule for discriminators when
      ``aggregation.average_discriminator`` (defaults to ``g_aggregator``: its
      functions are pure, and each model keeps its own aggregator state).
    local_steps: the steps every client's scan runs; required with
      ``train.local_steps = 0`` (one local epoch: ``assemble.local_steps``).
    rule_for: packed sweep points of several rules or traced rule hyperparameters: ``RoundData.hyper ->
      Aggregator`` (``aggregation/choice.PointRules.build``), called in the trace; ``g_aggregator`` then gives
      the aggregator state's structure (``init``, ``client_axes``).

  Returns:
    A ``Program``.
  """
  C = config.num_clients
  nz = config.model.latent_dim
  conditional = bool(config.model.conditional)
  # Class-conditional models are built and called with labels; unconditional ones exactly as without the option.
  init_labels = {"labels": jnp.zeros((2,), jnp.int32)} if conditional else {}
  R = config.resolution
  ch = config.data.channels
  d_aggregator = d_aggregator or g_aggregator
  local_train = client_lib.local_trainer(config, generator, discriminator, local_steps)
  server_round = server_lib.server_round(
    g_aggregator,
    d_aggregator,
    bool(config.aggregation.average_discriminator),
    config.aggregation.weighting,
    rule_for,
  )
  m = sampling.clients_per_round(config)  # None: every client, every round.
  # fltrust: the server trains on its root set as an honest client would (same steps, losses and optimizers,
  # its own discriminator kept in g_agg); with one local epoch, the largest client's steps (batches drawn).
  root_n = root_size_of(config.aggregation.name, config.aggregation.kwargs)
  # Per-client parts of RoundState.g_agg / d_agg (aggregation.base: client_axes); under fltrust g_agg is
  # (the server's ClientState, the rule's state) and the server's part has no client axis.
  agg_axes = ((False, g_aggregator.client_axes) if root_n else g_aggregator.client_axes, d_aggregator.client_axes)
  if root_n:
    steps = local_steps or config.train.local_steps
    server_config = config if config.train.local_steps else config_lib.copy_with(config, {"train.local_steps": steps})
    server_train = client_lib.local_trainer(server_config, generator, discriminator, steps)

  def init(key: jax.Array) -> RoundState:
    kg, kd = jax.random.split(key)
    g_vars = dict(generator.init(kg, jnp.zeros((2, nz)), train=False, **init_labels))
    d_vars = dict(discriminator.init(kd, jnp.zeros((2, R, R, ch)), train=False, **init_labels))
    g_opt = client_lib.optimizer(config, config.train.g_lr).init(g_vars["params"])
    d_opt = client_lib.optimizer(config, config.train.d_lr).init(d_vars["params"])
    stack = lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x, (C,) + x.shape), t)
    clients = ClientState(d_vars=stack(d_vars), g_opt=stack(g_opt), d_opt=stack(d_opt))
    g_agg = g_aggregator.init(g_vars)
    if m is not None:  # Sampled clients: the per-client state must have a row per client (gathered each round).
      check_client_axes(g_agg, g_aggregator.client_axes, C, f"aggregation.name={config.aggregation.name!r}")
    if root_n:  # The server starts as every client does.
      g_agg = (ClientState(d_vars=d_vars, g_opt=g_opt, d_opt=d_opt), g_agg)
    return RoundState(
      round=jnp.zeros((), jnp.int32),
      g_global=g_vars,
      d_global=d_vars,
      g_agg=g_agg,
      d_agg=d_aggregator.init(d_vars),
      clients=clients,
    )

  def local_round(state: RoundState, data: RoundData, keys: jax.Array) -> LocalOut:
    """Local training of all clients; ``keys`` is ``[C]``.

    Clients are vmapped in chunks of ``client_chunk(config, C)``; with fewer
    than C per chunk, ``lax.map`` runs the chunks in turn (a remainder chunk
    is vmapped on its own). Every choice computes the same round.
    """

    def one(xs):
      client, images, count, is_mal, flags, part, key, labels = xs
      return local_train(
        client,
        state.g_global,
        state.d_global,
        images,
        count,
        is_mal,
        flags,
        data.trigger,
        data.trigger_loc,
        key,
        data.upload,
        part,
        data.latent,  # The latent backdoor (attack.latent_trigger): None = off, nothing traced.
        labels,  # The shard's class ids (model.conditional): None = off, nothing traced.
        data.hyper,  # Per-point learning rates / regularizer weights (packed sweep points): None = the config's.
      )

    # Outside the attack window the malicious clients train on clean images, as honest ones.
    attacking = data.is_malicious & upload_attacks.in_window(data.upload, state.round)
    per_client = (
      state.clients,
      data.images,
      data.counts,
      attacking,
      data.poison_flags,
      data.trigger_part,
      keys,
      data.labels,
    )
    num = keys.shape[0]
    chunk = client_chunk(config, num)
    if chunk >= num:
      return LocalOut(*jax.vmap(one)(per_client))
    return LocalOut(*jax.lax.map(one, per_client, batch_size=chunk if chunk > 1 else None))

  def round_fn(state: RoundState, data: RoundData, key: jax.Array):
    """Local training of the round's clients, their reports, the server; ``key`` is this round's key."""
    return round_with(state, data, key)

  def round_with(state: RoundState, data: RoundData, key: jax.Array, local_fn=None, clients=None):
    """The round with local training by ``local_fn`` (default ``local_round``) for ``clients``.

    ``clients``: int ``[m]`` distinct client ids that take part (``sampling.sampled_round``); None:
    those drawn from ``key`` with ``clients_per_round``, else every client (the unsampled round).
    """
    local_fn = local_fn or local_round
    keys = client_keys(key, C)
    if clients is None and m is None:
      return finish_round(state, data, local_fn(state, data, keys), key)
    clients = sampling.sampled_clients(key, C, m) if clients is None else jnp.asarray(clients, jnp.int32)
    return sampling.sampled_round(
      state, data, key, clients, client_keys=keys, local_fn=local_fn, finish_fn=finish_round, agg_axes=agg_axes
    )

  def finish_round(state: RoundState, data: RoundData, local: LocalOut, key: jax.Array):
    """The clients' reports and the server step after local training (the true losses are logged).

    The attackers of the round (``data.is_malicious`` inside the attack window) tamper with their
    uploaded generators (``upload_attacks.tamper``) and, with ``mimic``, lie about their losses.
    """
    attackers = data.is_malicious & upload_attacks.in_window(data.upload, state.round)
    # G(z*)'s distance to x* (attack.latent_trigger) and DP-SGD's clipped fraction (train.dp_sgd) are the
    # simulation's records, never reported to the server; the noise multiplier is logged with every round so that
    # privacy.dp_sgd_block accounts a resumed run by what each round ran with.
    stats = dict(local.stats)
    logged = {f"train/{k}": stats.pop(k) for k in ("latent_dist", "dp_clip_frac") if k in stats}
    if config.train.dp_sgd.enabled:
      logged["train/dp_noise_multiplier"] = jnp.float32(config.train.dp_sgd.noise_multiplier)
    local = local._replace(stats=stats)
    local = local._replace(client_g=upload_attacks.tamper(state.g_global, local.client_g, attackers, data.upload))
    uploads = attack.report(local, data, attackers)
    if root_n:
      new_state, metrics = fltrust_server(state, data, local.clients, uploads, key)
    else:
      new_state, metrics = server_round(state, local.clients, uploads, key, hyper=data.hyper)
    return new_state, {**{f"train/{k}": v for k, v in local.stats.items()}, **logged, **metrics}

  def fltrust_server(state: RoundState, data: RoundData, clients: ClientState, uploads, key: jax.Array):
    """The server's own training on its root set (never poisoned), then the server step with its models.

    With ``model.conditional`` the server trains as a conditional client on its root images and their labels
    (``RoundData.root_labels``).
    """
    if data.root is None or data.root.shape[0] != root_n:
      raise ValueError(
        f"aggregation.name='fltrust' with root_size={root_n} needs RoundData.root of {root_n} images, got "
        f"{None if data.root is None else data.root.shape}; assemble.round_data(..., root=...) builds it."
      )
    if conditional and (data.root_labels is None or data.root_labels.shape != (root_n,)):
      raise ValueError(
        f"aggregation.name='fltrust' with model.conditional=True needs RoundData.root_labels of {root_n} class ids, "
        f"got {None if data.root_labels is None else data.root_labels.shape}; assemble.round_data(..., "
        "root_labels=...) builds it."
      )
    server, rule_state = state.g_agg
    server, server_g, server_d, stats = server_train(
      server,
      state.g_global,
      state.d_global,
      data.root,
      jnp.int32(root_n),
      jnp.bool_(False),
      jnp.zeros((root_n,), bool),
      data.trigger,
      data.trigger_loc,
      jax.random.fold_in(key, SERVER_STREAM),
      labels=data.root_labels if conditional else None,
      hyper=data.hyper,
    )
    new_state, metrics = server_round(
      state._replace(g_agg=rule_state), clients, uploads, key, server_models=(server_g, server_d)
    )
    metrics.update({f"agg/server_{k}": stats[k] for k in ("g_loss", "d_loss")})
    return new_state._replace(g_agg=(server, new_state.g_agg)), metrics

  def sample(g_vars: PyTree, z: jax.Array, labels: jax.Array | None = None) -> jax.Array:
    """Global generator images for latents ``z`` (running BatchNorm statistics).

    Args:
      g_vars: generator variables.
      z: f32 ``[N, latent_dim]``.
      labels: int32 ``[N]`` class ids, required with ``model.conditional`` (None otherwise).

    Raises:
      ValueError: ``labels`` missing with ``model.conditional``, given without it, or not ``[N]``.
    """
    if conditional != (labels is not None):
      raise ValueError(
        f"model.conditional={conditional}: Program.sample(g_vars, z, labels) "
        + ("needs labels, int32 [N] class ids (one per latent)." if conditional else "takes no labels.")
      )
    if labels is None:
      return generator.apply(g_vars, z, train=False)
    labels = jnp.asarray(labels, jnp.int32)
    if labels.shape != z.shape[:1]:
      raise ValueError(
        f"Program.sample: labels of shape {labels.shape} for {z.shape[0]} latents; expected ({z.shape[0]},)."
      )
    return generator.apply(g_vars, z, train=False, labels=labels)

  return Program(
    init=init,
    local_train=local_train,
    local_round=local_round,
    finish_round=finish_round,
    round=round_fn,
    sample=sample,
    round_with=round_with,
  )
