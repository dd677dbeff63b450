"""The simulated malicious clients (Jin & Li, SASHIMI 2022): poisoned batches and lying reports.

Both happen on the client side of the round, before anything reaches the
server: a malicious client trains on real images that carry the trigger, and
a defense-aware (``mimic``) attacker reports the honest clients' median losses
instead of its own. The ground-truth mask ``is_malicious`` is read here and
nowhere on the server's side.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedgan_jax.aggregation.base import masked_median
from fedgan_jax.data import triggers
from fedgan_jax.federated.state import LocalOut, RoundData, Uploads


def poison_batch(
  real: jax.Array,
  poisoned: jax.Array,
  trigger: jax.Array,
  trigger_loc: jax.Array,
  key: jax.Array,
  random_location: bool,
  part: jax.Array | None = None,
) -> jax.Array:
  """A client's real batch with the trigger pasted on its poisoned images.

  Args:
    real: ``[B, R, R, ch]`` images in [-1, 1].
    poisoned: ``bool[B]``: the client is malicious and the image is flagged.
    trigger: ``[s, s, ch]``.
    trigger_loc: ``int32[2]`` (top, left) of the fixed location.
    key: draws the per-image locations when ``random_location``.
    random_location: paste at a uniformly random place instead (static).
    part: optional bool ``[s, s]``, the trigger pixels this client pastes (DBA).

  Returns:
    The batch, poisoned where ``poisoned``.
  """
  if random_location:
    loc = triggers.random_locations(key, real.shape[0], trigger.shape[0], real.shape[1])
  else:
    loc = trigger_loc
  return triggers.paste(real, trigger, loc, poisoned, part)


def report(local: LocalOut, data: RoundData, attackers: jax.Array | None = None) -> Uploads:
  """What every client uploads: its parameters and the stats it chooses to report.

  Honest clients report their true local losses. With ``data.mimic``, a
  malicious client reports the median of the honest clients' values instead
  (a colluding attacker that sees the honest reports); it cannot fake the
  statistics the server computes from the uploaded parameters.

  Args:
    local: every client's local training output.
    data: the round inputs (``is_malicious``, ``mimic``, ``counts``).
    attackers: ``bool[C]``, the malicious clients that attack this round
      (the attack window applied); default ``data.is_malicious``.

  Returns:
    ``Uploads`` with ``reported`` = the reported losses + ``num_examples``.
  """
  attackers = data.is_malicious if attackers is None else attackers
  liars = attackers & data.mimic
  honest = ~data.is_malicious
  reported = {k: jnp.where(liars, masked_median(v, honest)[0], v) for k, v in local.stats.items()}
  reported["num_examples"] = data.counts.astype(jnp.float32)
  return Uploads(client_g=local.client_g, client_d=local.client_d, reported=reported)
