"""K independent seeds of one config as ONE program: a leading replica axis.

``replicate(program)`` vmaps ``init`` and ``round`` over the replica axis;
replica ``k`` uses ``seed + k`` for everything (its own data partition and
poisoning, init, round keys), so it is exactly the single run with that seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedgan_jax.data import triggers
from fedgan_jax.federated.state import Program, RoundData, RoundState

PyTree = Any


class ReplicatedProgram(NamedTuple):
  """``Program`` functions over a leading replica axis K (one seed per replica).

  Attributes:
    init: ``keys [K] -> RoundState`` (every leaf ``[K, ...]``).
    round: ``(states [K], data [K], keys [K]) -> (states [K], metrics [K, ...])``.
    sample: ``(g_vars [K], z, labels=None) -> images [K, N, R, R, ch]`` (same ``z`` and labels for every replica).
  """

  init: Callable[[jax.Array], RoundState]
  round: Callable[..., tuple[RoundState, dict]]
  sample: Callable[..., jax.Array]


def replicate(program: Program) -> ReplicatedProgram:
  """Lifts a program over a leading replica axis with ``jax.vmap`` (not jitted).

  Args:
    program: from ``program.build``.

  Returns:
    A ``ReplicatedProgram``; jit its ``round`` (``sharding.jit_round(...,
    replicas=True)`` also shards clients).
  """

  def sample(g_vars, z, labels=None):
    if labels is None:  # As Program.sample: no labels argument for unconditional models.
      return jax.vmap(program.sample, in_axes=(0, None))(g_vars, z)
    return jax.vmap(program.sample, in_axes=(0, None, None))(g_vars, z, labels)

  return ReplicatedProgram(init=jax.vmap(program.init), round=jax.vmap(program.round), sample=sample)


def replica_seeds(seed: int, num_replicas: int) -> list[int]:
  """The seeds of the K replicas: ``seed, seed + 1, ..., seed + K - 1``.

  Raises:
    ValueError: if ``num_replicas`` < 1.
  """
  if not isinstance(num_replicas, int) or num_replicas < 1:
    raise ValueError(f"num_replicas={num_replicas!r} must be a positive integer.")
  return [seed + k for k in range(num_replicas)]


def run_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(k_init, k_rounds, k_eval)`` of the run with ``seed``: round ``r``'s key is ``fold_in(k_rounds, r)``."""
  k_init, k_rounds, k_eval = jax.random.split(jax.random.key(seed), 3)
  return k_init, k_rounds, k_eval


def member_keys(seeds: Sequence[int]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``run_keys`` of each seed stacked, each ``[K]``: member ``k`` of a stacked program gets its own run's keys."""
  keys = jnp.stack([jnp.stack(run_keys(s)) for s in seeds])
  return keys[:, 0], keys[:, 1], keys[:, 2]


def replica_keys(seed: int, num_replicas: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-replica ``run_keys``, each ``[K]``: replica ``k`` gets those of ``seed + k``."""
  return member_keys(replica_seeds(seed, num_replicas))


def round_keys(k_rounds: jax.Array, r: int | jax.Array) -> jax.Array:
  """This round's key for every replica: ``fold_in(k_rounds[k], r)``."""
  return jax.vmap(lambda k: jax.random.fold_in(k, r))(k_rounds)


def stack_replicas(datas: Sequence[RoundData]) -> RoundData:
  """Stacks per-replica (or per packed sweep point) ``RoundData`` on a new leading axis.

  Client shards may have different ``n_max`` across seeds (non-iid
  partitions): shorter ones are padded with zero images (and labels) that
  are never drawn (batches index below ``counts``) and never poisoned.
  Triggers of different sides (packed points at fixed trigger locations;
  ``pack.py`` keeps random locations of different sides apart) are put in a
  window of the largest side that pastes the same pixels
  (``triggers.pad_window``); ``assemble.own_trigger`` gives a member's back.

  Raises:
    ValueError: the replicas differ in anything but ``n_max`` and the trigger side (e.g. C or R).
  """
  n_max = max(d.images.shape[1] for d in datas)
  side = max(d.trigger.shape[0] for d in datas)
  padded = []
  for k, d in enumerate(datas):
    pad = n_max - d.images.shape[1]
    if d.images.shape[0] != datas[0].images.shape[0] or d.images.shape[2:] != datas[0].images.shape[2:]:
      raise ValueError(
        f"replica {k}: images {d.images.shape} do not match replica 0's "
        f"{datas[0].images.shape} (the members of one program may differ only in array inputs)."
      )
    if pad:
      d = d._replace(
        images=jnp.pad(d.images, ((0, 0), (0, pad)) + ((0, 0),) * 3),
        poison_flags=jnp.pad(d.poison_flags, ((0, 0), (0, pad))),
        labels=None if d.labels is None else jnp.pad(d.labels, ((0, 0), (0, pad))),
      )
    if d.trigger.shape[0] != side:
      trigger, part, loc = triggers.pad_window(d.trigger, d.trigger_part, d.trigger_loc, side, d.images.shape[2:4])
      d = d._replace(trigger=jnp.asarray(trigger), trigger_part=jnp.asarray(part), trigger_loc=jnp.asarray(loc))
    padded.append(d)
  return jax.tree.map(lambda *xs: jnp.stack(xs), *padded)


def unstack(tree: PyTree, k: int) -> PyTree:
  """Replica ``k`` of a replicated pytree (host or device arrays)."""
  return jax.tree.map(lambda x: x[k], tree)
