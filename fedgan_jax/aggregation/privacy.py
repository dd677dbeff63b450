"""Client-level differential privacy of the uploads: DP-FedAvg's clipped and noised mean.

``dp_mean`` is the server step of DP-FedAvg (McMahan, Ramage, Talwar & Zhang,
"Learning Differentially Private Recurrent Language Models", ICLR 2018; the
same clip-and-noise scheme as Geyer, Klein & Nabi, "Differentially Private
Federated Learning: A Client Level Perspective", 2017) with every client
taking part in every round (fixed-size participation), or the m clients
sampled for the round (``config.clients_per_round``: C below is then m):

    new_global = global + (1 / C) * sum_c clip(client_c - global, S) + N(0, (z S / C)^2 I)

``clip(u, S)`` scales ``u`` to L2 norm ``<= S`` over every leaf of the upload
(BatchNorm statistics included: they are computed from the client's data and
released with it); ``z`` is the noise multiplier. The denominator is the
number of client slots C, fixed, as in DP-FedAvg's fixed-size estimator: an
excluded client (non-finite upload or no examples, ``base``'s rule) adds a zero
update instead of changing the denominator, so adding or removing one client's
data moves the clipped sum by at most S and the mean by at most S / C, whatever
the other clients do. The noise is then the Gaussian mechanism with L2
sensitivity S / C and noise multiplier z, and ``fedgan_jax.privacy`` computes
the resulting (epsilon, delta) at the client level over the rounds of a run
(add/remove-one-client neighbouring, with ``dp_accounting``).

The guarantee is central (trusted server): it covers the sequence of global
models the server sends out, and everything computed from them, not what the
server itself sees or logs (per-client update norms, reported losses). In the
paper's setting (Jin & Li, SASHIMI 2022) only generators are uploaded; the
discriminators never leave the clients. With
``aggregation.average_discriminator=True`` the same rule also clips and noises
the discriminators, and the accounting counts two Gaussian releases per round.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedgan_jax.aggregation.base import (
  Aggregator,
  check_real,
  client_deltas,
  expand_to,
  stateless_init,
  tree_sq_norms,
  valid_mask,
)


def _is_running_variance(path) -> bool:
  """Whether a leaf is a BatchNorm running variance (``batch_stats/.../var``)."""
  names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  return bool(names) and names[-1] == "var" and "batch_stats" in names


def dp_mean(clip_norm: float, noise_multiplier: float, num_clients: int | None = None) -> Aggregator:
  """DP-FedAvg: the uniform mean of clipped updates over the C client slots, plus Gaussian noise.

  Each valid client's update ``client - global`` is scaled to L2 norm
  ``<= clip_norm`` (over every leaf of its upload); the clipped updates are
  averaged with weight ``1 / C`` each, an excluded client (non-finite upload,
  or ``num_examples <= 0``) contributing a zero update; noise
  ``N(0, (noise_multiplier * clip_norm / C)^2)``, drawn from the round's
  aggregation key, is added to every coordinate; the result is added to the
  global parameters (McMahan et al., ICLR 2018; Geyer et al., 2017).

  Differences from the other rules of the contract (``base``), both required
  for the privacy guarantee: example counts are ignored (a client's weight may
  not depend on its data), so ``weights`` are ``1 / C`` per valid client and sum
  to (valid clients) / C, the rest staying on the global model; and the noise
  is added even when no client is valid (skipping it would reveal that), so
  only ``noise_multiplier = 0`` keeps the global parameters then. After the
  noise, BatchNorm running variances (``batch_stats/.../var`` leaves) are
  clamped at 0, a post-processing that keeps the model finite and costs no
  privacy.

  Args:
    clip_norm: S, the L2 bound on each client's update (> 0).
    noise_multiplier: z, the noise's standard deviation in units of the
      per-client sensitivity ``S`` of the sum (>= 0; 0 = clipping only, no privacy).
    num_clients: C, optional: when given, the client axis may not be longer.
      With clients sampled per round (``config.clients_per_round = m``) the
      axis has the m sampled clients: C above is then m, the fixed number of
      slots of every round, and ``fedgan_jax.privacy`` accounts the sampling.

  Returns:
    A stateless ``Aggregator``; diagnostics ``weights``, ``flagged`` (all
    False), ``nonfinite``, ``clipped: bool[C]`` (valid and over the bound),
    ``update_norm: f32[C]`` (before clipping), and the scalars ``noise_std`` (the
    noise's standard deviation per coordinate) and ``noise_multiplier`` (what
    ``fedgan_jax.privacy`` reads back from ``metrics.jsonl`` for each round).

  Raises:
    ValueError: ``clip_norm <= 0``, ``noise_multiplier < 0``, either not a
      finite number, or ``num_clients`` not a positive integer.
  """
  clip_norm = check_real(
    "clip_norm", clip_norm, "a finite number > 0 (the L2 bound on each client's update)", lambda v: v > 0
  )
  noise_multiplier = check_real(
    "noise_multiplier",
    noise_multiplier,
    "a finite number >= 0 (noise std in units of clip_norm; 0 = no noise, no privacy)",
    lambda v: v >= 0,
  )
  if num_clients is not None and (isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1):
    raise ValueError(f"aggregation.kwargs.num_clients={num_clients!r}: must be a positive integer.")

  def aggregate(state, global_params, client_params, client_stats, key):
    valid, nonfinite = valid_mask(client_params, client_stats)
    C = valid.shape[0]
    if num_clients is not None and C > num_clients:
      raise ValueError(f"dp_mean: the uploads have {C} clients, the rule was built for num_clients={num_clients}.")
    raw = client_deltas(global_params, client_params)
    norm = jnp.sqrt(tree_sq_norms(raw))  # NaN/Inf for a non-finite upload, as clip_updates reports it.
    u = jax.tree.map(lambda d: jnp.where(expand_to(valid, d), d, 0.0), raw)
    safe_norm = jnp.where(valid, norm, 0.0)
    clipped = safe_norm > clip_norm
    scale = jnp.where(clipped, clip_norm / jnp.where(clipped, safe_norm, 1.0), 1.0)
    weights = valid.astype(jnp.float32) / C
    coef = weights * scale
    noise_std = noise_multiplier * clip_norm / C

    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(global_params)
    keys = jax.random.split(key, len(leaves_with_path))
    new_leaves = []
    for (path, g), d, k in zip(leaves_with_path, jax.tree.leaves(u), keys):
      mean_update = jnp.sum(expand_to(coef, d) * d, axis=0)
      noise = noise_std * jax.random.normal(k, mean_update.shape, jnp.float32)
      x = g.astype(jnp.float32) + mean_update + noise
      if _is_running_variance(path):
        x = jnp.maximum(x, 0.0)
      new_leaves.append(x.astype(g.dtype))
    diagnostics = {
      "weights": weights,
      "flagged": jnp.zeros(valid.shape, bool),
      "nonfinite": nonfinite,
      "clipped": clipped,
      "update_norm": norm,
      "noise_std": jnp.asarray(noise_std, jnp.float32),
      "noise_multiplier": jnp.asarray(noise_multiplier, jnp.float32),
    }
    return jax.tree.unflatten(treedef, new_leaves), state, diagnostics

  return Aggregator(stateless_init, aggregate)
