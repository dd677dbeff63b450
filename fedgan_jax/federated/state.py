"""The pytrees of a federated round: its inputs, what clients keep and upload, the program.

Every per-client leaf has a leading client axis ``C``; shapes are static, so
one compiled round serves every attack setting (who is malicious, which images
are poisoned and the trigger pixels are array inputs, not Python values).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

PyTree = Any


class RoundData(NamedTuple):
  """Device-resident inputs of every round (never donated, never copied per round).

  Attributes:
    images: uint8 ``[C, n_max, H, W, ch]`` client shards.
    counts: int32 ``[C]`` real images per client.
    is_malicious: bool ``[C]`` ground truth, read by the simulated clients
      only (``attack``); the server and the aggregator never see it.
    poison_flags: bool ``[C, n_max]`` images that carry the trigger.
    trigger: f32 ``[s, s, ch]`` in [-1, 1] (a packed point's: inside a window of the pack's largest side,
      ``triggers.pad_window``, with ``trigger_part`` False outside its own pixels).
    trigger_loc: int32 ``[2]`` (top, left) for the bottom-right location (of that window).
    mimic: bool scalar: malicious clients report the honest clients' median
      losses instead of their own (``attack.report_losses='mimic'``).
    upload: the attack on the uploaded generator and the attack window
      (``upload_attacks.UploadAttack``, replicated scalars).
    trigger_part: bool ``[C, s, s]``: the trigger pixels each client pastes
      (all of them, except under ``attack.dba``).
    root: uint8 ``[n_root, H, W, ch]``: the server's clean root set
      (``aggregation.name='fltrust'`` only; None otherwise).
    latent: the latent backdoor's ``z*``, ``x*`` and weight
      (``latent_trigger.LatentTrigger``, replicated) with ``attack.latent_trigger``; None otherwise.
    labels: int32 ``[C, n_max]`` class ids of the client shards, index-aligned
      with ``images`` (``model.conditional`` only; None otherwise: nothing traced).
    root_labels: int32 ``[n_root]`` class ids of ``root`` (``model.conditional``
      with fltrust only; None otherwise).
    hyper: f32 scalars that replace config values in local training, by name (``client.TRACED_HYPER``:
      ``g_lr``, ``d_lr``, ``gradient_penalty``, ``r1``, ``proximal``): packed sweep points that differ in
      them (``fedgan_jax/pack.py``) each get their own. None (every single run): the config's values are
      constants of the program, as without the field.
  """

  images: jax.Array
  counts: jax.Array
  is_malicious: jax.Array
  poison_flags: jax.Array
  trigger: jax.Array
  trigger_loc: jax.Array
  mimic: jax.Array
  upload: Any
  trigger_part: jax.Array
  root: jax.Array | None = None
  latent: Any = None
  labels: jax.Array | None = None
  root_labels: jax.Array | None = None
  hyper: dict | None = None


# The RoundData fields that carry the client axis (sharded over devices; the rest is replicated).
CLIENT_DATA_FIELDS = ("images", "counts", "is_malicious", "poison_flags", "trigger_part", "labels")


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

  round: jax.Array  # int32 scalar: rounds completed.
  g_global: PyTree  # Global generator variables {'params', 'batch_stats'}.
  d_global: PyTree  # Global discriminator variables (used if averaged).
  g_agg: PyTree  # Aggregator state for generators (fltrust: (the server's ClientState, the rule's state)).
  d_agg: PyTree  # Aggregator state for discriminators.
  clients: ClientState  # Stacked over clients.


class LocalOut(NamedTuple):
  """What local training returns for every client (leading axis C)."""

  clients: ClientState  # The clients' new states.
  client_g: PyTree  # Generator variables to upload.
  client_d: PyTree  # Discriminator variables to upload.
  stats: dict  # True local losses, ``[C]`` each (the simulation's record).


class Uploads(NamedTuple):
  """What reaches the server: parameters and the stats the clients chose to report.

  Attributes:
    client_g: generator variables, leaves ``[C, ...]``.
    client_d: discriminator variables, leaves ``[C, ...]``.
    reported: ``[C]`` stats as reported (a ``mimic`` attacker's are lies),
      plus ``num_examples``.
  """

  client_g: PyTree
  client_d: PyTree
  reported: dict


class Program(NamedTuple):
  """The pure functions of a run (not jitted here: callers jit, shard or vmap them).

  Attributes:
    init: ``key -> RoundState``.
    local_train: ONE client's local training (see ``client.local_trainer``).
    local_round: ``(state, data, client_keys [C]) -> LocalOut``: every client
      of ``state`` and ``data`` (the sampled ones when they are gathered).
    finish_round: ``(state, data, local_out, key) -> (state, metrics)``: the
      clients' reports (``attack.report``) and the server step
      (``server.server_round``, which sees no ground truth).
    round: ``(state, data, key) -> (state, metrics)``: ``local_round`` then
      ``finish_round``; ``key`` is the round's key. With
      ``config.clients_per_round`` both run on the round's sampled clients
      (``sampling.sampled_round``).
    sample: ``(g_vars, z, labels=None) -> images`` of a generator (running
      BatchNorm stats); ``labels`` int32 ``[N]`` with ``model.conditional``, None otherwise.
    round_with: ``(state, data, key, local_fn=None, clients=None) -> (state, metrics)``:
      ``round`` with another local-training function of the same signature as
      ``local_round`` (``sharding`` passes its ``shard_map``-ped form), or
      for given client ids ``clients`` (int ``[m]``) instead of those
      ``config.clients_per_round`` draws from ``key`` (``sampling``).
  """

  init: Callable[[jax.Array], RoundState]
  local_train: Callable[..., tuple[ClientState, PyTree, PyTree, dict]]
  local_round: Callable[..., LocalOut]
  finish_round: Callable[..., tuple[RoundState, dict]]
  round: Callable[[RoundState, RoundData, jax.Array], tuple[RoundState, dict]]
  sample: Callable[..., jax.Array]
  round_with: Callable[..., tuple[RoundState, dict]] | None = None
