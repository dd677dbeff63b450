"""Attacks on the uploaded generator (model poisoning), and the attack window.

The paper's attacker poisons its *data*; the attackers here also, or instead,
tamper with the generator they *upload*, as in the backdoor and Byzantine
literature. Everything is an array input of the round (``UploadAttack`` in
``RoundData``), so one compiled program serves every attack, window and
strength; the ground-truth mask ``is_malicious`` is read on the client side
only (here and in ``attack``), never by the server.

Kinds (``attack.upload``), on the generator's ``params`` (its BatchNorm
statistics are uploaded as trained), with ``d = G_local - G_global``:

* ``scale``: model replacement, Bagdasaryan et al., "How To Backdoor
  Federated Learning", AISTATS 2020: upload ``G_global + gamma d``; ``gamma``
  defaults to C (the number of clients, uniform FedAvg weights 1 / C), which
  replaces the global model by the attacker's when the others' updates cancel.
* ``sign_flip``: upload ``G_global - s d`` (s defaults to 1): the classic
  Byzantine sign-flipping update.
* ``alie``: "A Little Is Enough", Baruch et al., NeurIPS 2019: every attacker
  uploads ``G_global + mu - z sigma`` with the coordinate-wise mean and
  standard deviation of the honest updates of the round (an omniscient
  attacker, as in the paper's evaluation); ``z`` defaults to the paper's
  ``z_max = Phi^-1((n - s) / n)`` with ``s = floor(n / 2 + 1) - m`` (n clients,
  m attackers), clamped at 0.
* ``ipm``: inner-product manipulation, Xie et al., "Fall of Empires", UAI
  2019: upload ``G_global - eps mean(honest updates)``; ``eps`` defaults to 0.1
  (the value that defeats the median and Krum in that paper).
* ``pgd``: norm-bounded projected gradient descent (Sun et al., "Can You
  Really Backdoor Federated Learning?", 2019; Wang et al., "Attack of the
  Tails", NeurIPS 2020): after every local step the attacker projects its
  generator's ``params`` back into the L2 ball of radius ``strength`` around
  the round's global ones (``project``, in the client's local training), so
  its update passes norm clipping at that bound; the strength (the bound) has
  no default and must be set.
* ``pgd_scale``: constrain-and-scale (Bagdasaryan et al., "How To Backdoor
  Federated Learning", AISTATS 2020, with Sun et al.'s bound): ``pgd``'s
  projected local training, then the update scaled up to the bound,
  ``u S / ||u||``, the largest upload that still passes clipping at ``S``.

The window (``attack.start_round``, ``attack.end_round``, ``attack.every``, in
the 1-based round numbers the console and ``metrics.jsonl`` print): the
malicious clients attack (poisoned data, lying reports, tampered uploads) in
rounds ``start <= n <= end`` with ``(n - start) % every == 0`` and behave as
honest clients otherwise; ``end = 0`` means until the last round.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats as scipy_stats

PyTree = Any

# The names of ``attack.upload``; the index is the ``UploadAttack.kind`` code (config_lib.UPLOAD_ATTACKS).
KINDS = ("none", "scale", "sign_flip", "alie", "ipm", "pgd", "pgd_scale")
PGD = KINDS.index("pgd")
PGD_SCALE = KINDS.index("pgd_scale")


class UploadAttack(NamedTuple):
  """The upload attack and window of a run, as array inputs of the round (scalars, replicated).

  Attributes:
    kind: int32: index into ``KINDS``.
    strength: f32: ``gamma`` (scale), ``s`` (sign_flip), ``z`` (alie), ``eps`` (ipm) or the L2 bound (pgd).
    start: int32: first round number (1-based) of the window.
    end: int32: last round number of the window (inclusive); 0 = no end.
    every: int32: attack every ``every``-th round of the window.
  """

  kind: jax.Array
  strength: jax.Array
  start: jax.Array
  end: jax.Array
  every: jax.Array


def alie_z(num_clients: int, num_malicious: int) -> float:
  """ALIE's ``z_max`` (Baruch et al. 2019, §3): ``Phi^-1((n - s) / n)``, ``s = floor(n / 2 + 1) - m``, at least 0."""
  n, m = num_clients, num_malicious
  s = math.floor(n / 2 + 1) - m
  p = (n - s) / n
  if p <= 0.5:
    return 0.0
  return float(scipy_stats.norm.ppf(min(p, 1.0 - 1e-12)))


def default_strength(kind: str, num_clients: int, num_malicious: int) -> float:
  """The strength each kind uses when ``attack.upload_strength`` is 0 (module docstring)."""
  return {
    "none": 0.0,
    "scale": float(num_clients),
    "sign_flip": 1.0,
    "alie": alie_z(num_clients, num_malicious),
    "ipm": 0.1,
    "pgd": 0.0,  # No default: config_lib asks for attack.upload_strength.
    "pgd_scale": 0.0,
  }[kind]


def from_config(config) -> UploadAttack:
  """The ``UploadAttack`` of a validated config (``attack.upload``, ``attack.upload_strength``, the window)."""
  a = config.attack
  strength = float(a.upload_strength) or default_strength(a.upload, config.num_clients, len(a.malicious))
  return UploadAttack(
    kind=jnp.asarray(KINDS.index(a.upload), jnp.int32),
    strength=jnp.asarray(strength, jnp.float32),
    start=jnp.asarray(a.start_round, jnp.int32),
    end=jnp.asarray(a.end_round, jnp.int32),
    every=jnp.asarray(a.every, jnp.int32),
  )


def in_window(ua: UploadAttack, rounds_done: jax.Array) -> jax.Array:
  """bool scalar: the attackers attack in the round after ``rounds_done`` completed ones (round ``rounds_done + 1``)."""
  n = rounds_done.astype(jnp.int32) + 1
  after = n >= ua.start
  before = (ua.end <= 0) | (n <= ua.end)
  return after & before & ((n - ua.start) % jnp.maximum(ua.every, 1) == 0)


def window_rounds(start: int, end: int, every: int, num_rounds: int) -> np.ndarray:
  """The round numbers (1-based) in which the attackers attack, on the host (for summaries and tests)."""
  n = np.arange(1, num_rounds + 1)
  return n[(n >= start) & ((end <= 0) | (n <= end)) & ((n - start) % max(every, 1) == 0)]


def tamper(g_global: PyTree, client_g: PyTree, attackers: jax.Array, ua: UploadAttack) -> PyTree:
  """The generators as uploaded: the attackers' ``params`` replaced by the attack's (``KINDS``).

  Args:
    g_global: the round's global generator variables ``{'params', ...}``.
    client_g: the clients' trained generator variables, leaves ``[C, ...]``.
    attackers: ``bool[C]``: malicious clients that attack this round (mask and window applied).
    ua: the attack.

  Returns:
    ``client_g`` with the attackers' ``params`` tampered (honest clients' and
    every client's other collections unchanged). With no attacker, or kind
    ``none``, it equals ``client_g``.
  """
  honest = ~attackers
  n_honest = jnp.maximum(jnp.sum(honest), 1).astype(jnp.float32)
  # pgd_scale: every client's update norm over all leaves of ``params`` (as clipping measures it).
  sq = sum(
    jnp.sum(jnp.square(x.astype(jnp.float32) - g.astype(jnp.float32)[None]).reshape(x.shape[0], -1), axis=1)
    for x, g in zip(*map(jax.tree.leaves, (client_g["params"], g_global["params"])))
  )
  to_bound = ua.strength / jnp.maximum(jnp.sqrt(sq), 1e-30)

  def leaf(x, g):
    d = x.astype(jnp.float32) - g.astype(jnp.float32)[None]
    w = honest.reshape((-1,) + (1,) * (d.ndim - 1)).astype(jnp.float32)
    mu = jnp.sum(w * d, axis=0) / n_honest
    sigma = jnp.sqrt(jnp.sum(w * jnp.square(d - mu[None]), axis=0) / n_honest)  # Population std, as np.std.
    s = ua.strength
    # pgd's upload is its projected local model (the projection happens in every local step).
    up = to_bound.reshape((-1,) + (1,) * (d.ndim - 1))
    branches = (
      d,
      s * d,
      -s * d,
      jnp.broadcast_to(mu - s * sigma, d.shape),
      jnp.broadcast_to(-s * mu, d.shape),
      d,
      up * d,
    )
    new_d = jax.lax.select_n(jnp.clip(ua.kind, 0, len(KINDS) - 1), *branches)
    # 'none' and 'pgd' leave uploads bit-exact (pgd acted during local training).
    mal = (attackers & (ua.kind != 0) & (ua.kind != PGD)).reshape((-1,) + (1,) * (d.ndim - 1))
    return jnp.where(mal, (g.astype(jnp.float32)[None] + new_d).astype(x.dtype), x)

  params = jax.tree.map(leaf, client_g["params"], g_global["params"])
  return {**client_g, "params": params}


def project(params: PyTree, anchor: PyTree, attacking: jax.Array, ua: UploadAttack) -> PyTree:
  """ONE client's ``params`` projected into the L2 ball of radius ``ua.strength`` around ``anchor`` (pgd).

  Applied after every local generator step of a client; a no-op unless the
  client attacks this round (``attacking``, a bool scalar) with kind ``pgd``
  or ``pgd_scale``.
  The norm is over all leaves of the tree, as norm clipping measures it.
  """
  sq = sum(
    jnp.sum(jnp.square(p.astype(jnp.float32) - a.astype(jnp.float32)))
    for p, a in zip(*map(jax.tree.leaves, (params, anchor)))
  )
  norm = jnp.sqrt(sq)
  factor = jnp.minimum(1.0, ua.strength / jnp.maximum(norm, 1e-30))
  on = attacking & ((ua.kind == PGD) | (ua.kind == PGD_SCALE))
  return jax.tree.map(
    lambda p, a: jnp.where(
      on, (a.astype(jnp.float32) + factor * (p.astype(jnp.float32) - a.astype(jnp.float32))).astype(p.dtype), p
    ),
    params,
    anchor,
  )


def durability(records: list[dict], end_round: int, key: str = "eval/implant_amplitude_lo") -> int | None:
  """Rounds after the window until the implant is within the clean noise floor again.

  The first evaluation after round ``end_round`` whose implant's lower 95 %
  bound is at or below 0 (the generated images' median is no longer
  distinguishable from clean real images'), minus ``end_round``; 0 when the
  implant never exceeded the floor at the window's end; None when it stays
  above until the run ends or no evaluation after the window has the key.
  """
  after = [r for r in records if r.get("round", 0) >= end_round and r.get(key) is not None]
  for r in sorted(after, key=lambda r: r["round"]):
    if r[key] <= 0.0:
      return int(r["round"]) - end_round
  return None
