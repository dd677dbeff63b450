"""Backdoor defenses of the aggregation server: Robust Learning Rate, FLAME and FoolsGold.

- ``rlr``: Ozdayi, Kantarcioglu & Gel, "Defending against Backdoors in
  Federated Learning with Robust Learning Rate", AAAI 2021 (code:
  github.com/TinfoilHat0/Defending-Against-Backdoors-with-Robust-Learning-Rate,
  ``src/aggregation.py``). Per coordinate, the server learning rate is
  ``+server_lr`` where the valid clients' update signs agree by at least
  ``threshold`` (``|sum_c sign(u_c)| >= threshold``) and ``-server_lr``
  elsewhere; the example-weighted mean update is multiplied by it.
- ``flame``: Nguyen et al., "FLAME: Taming Backdoors in Federated Learning",
  USENIX Security 2022. Cosine-distance clustering admits the majority
  cluster of updates, every update is clipped to the median update norm,
  the admitted clipped updates are averaged, and Gaussian noise of standard
  deviation ``noise_lambda * median_norm`` is added. HDBSCAN is replaced by an
  exact, deterministic in-graph equivalent (see ``flame``).
- ``foolsgold``: Fung, Yoon & Beschastnikh, "The Limitations of Federated
  Learning in Sybil Settings", RAID 2020 (code: github.com/DistributedML/
  FoolsGold, ``deep-fg/fg/foolsgold.py`` and ``ML/code/logistic_aggregator.py``).
  Clients whose accumulated update histories are too similar (sybils pushing
  the same objective) lose weight: cosine similarity of histories, pardoning,
  and a logit squashing with confidence ``kappa``. The history is the
  aggregator's state (``[C, ...]`` leaves), so ``num_clients`` is required, as
  for the ``decay`` stage.

All three follow ``base``'s contract (docs/design.md §2): pure and jittable
over the client axis, static shapes, no Python loop over clients, and the
shared exclusion rule: a client is valid iff its upload is finite and
``num_examples > 0``; invalid clients are masked with ``jnp.where`` before any
arithmetic (they vote with sign 0 in RLR, are at infinite distance in FLAME,
add nothing to their FoolsGold history), get weight 0, are listed in
``diagnostics['nonfinite']`` when non-finite, and when no client is valid the
global parameters are kept (FLAME then adds no noise). None of them reads
which clients are malicious.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedgan_jax.aggregation.base import (
  Aggregator,
  PyTree,
  check_real,
  client_deltas,
  example_weights,
  expand_to,
  keep_global_if_empty,
  masked_median,
  normalize,
  stateless_init,
  tree_sq_norms,
  valid_mask,
  weighted_average,
)
from fedgan_jax.aggregation.detectors import check_num_clients

_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32 in Gram matrices on GPU


def _gram(tree: PyTree) -> jax.Array:
  """``f32[C, C]`` inner products of the clients' slices over all leaves (float32, exact matmul)."""
  gram = 0.0
  for x in jax.tree.leaves(tree):
    flat = x.astype(jnp.float32).reshape(x.shape[0], -1)
    gram = gram + jnp.matmul(flat, flat.T, precision=_HIGHEST)
  return gram


def _cosine(tree: PyTree) -> jax.Array:
  """``f32[C, C]`` cosine similarities in ``[-1, 1]``; 0 with a zero-norm slice (as sklearn)."""
  gram = _gram(tree)
  norm = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  denom = norm[:, None] * norm[None, :]
  return jnp.clip(jnp.where(denom > 0, gram / jnp.where(denom > 0, denom, 1.0), 0.0), -1.0, 1.0)


def _is_running_variance(path) -> bool:
  """Whether a leaf is a BatchNorm running variance (``batch_stats/.../var``), as in ``privacy``."""
  names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  return bool(names) and names[-1] == "var" and "batch_stats" in names


# ---------------------------------------------------------------- RLR


def rlr(threshold: float | None = None, server_lr: float = 1.0) -> Aggregator:
  """Robust Learning Rate (Ozdayi et al., AAAI 2021): per-coordinate sign vote on the server lr.

  With ``u_c = client_c - global`` and ``n`` valid clients::

      votes = |sum_{c valid} sign(u_c)|                      (per coordinate)
      lr    = +server_lr where votes >= threshold, else -server_lr
      new   = global + lr * sum_c a_c u_c                    (a: example-count weights)

  As the authors' code (``compute_robustLR`` and ``agg_avg``): signs are
  ``torch.sign``'s (0 for a zero entry), the comparison is ``>=``, the
  learning-rate vector multiplies the example-weighted average of the updates
  (FedAvg's weights), and ``threshold=0`` is plain FedAvg scaled by
  ``server_lr`` (their ``robustLR_threshold=0`` disables the defense). Invalid
  clients neither vote nor count in the average.

  ``threshold=None`` (default) uses ``ceil(n / 2)``, ``n`` the number of
  valid clients this round. The paper leaves the threshold a hyperparameter;
  the authors' runs (``src/runner.sh``) use 4 with 10 agents of which 1 is
  corrupt and 8 with 40 agents of which 4 are corrupt, i.e. above the number
  of corrupt agents, so that they cannot pass it on their own where the
  honest votes cancel. Without that number, ``ceil(n / 2)`` is the smallest
  threshold that no minority coalition (fewer than half the voters) reaches
  on its own. With 4 clients it is 2: three of four signs must agree.

  Args:
    threshold: None (``ceil(n / 2)``) or a vote threshold ``>= 0``.
    server_lr: the server learning rate's magnitude (> 0).

  Returns:
    An ``Aggregator`` with an empty state; diagnostics ``weights`` (example
    weights), ``flagged`` (all False: RLR acts on coordinates, not clients),
    ``nonfinite``, ``rlr_flipped`` (the fraction of coordinates whose lr is
    negative) and ``rlr_threshold`` (the threshold used).

  Raises:
    ValueError: ``threshold < 0`` or ``server_lr <= 0`` (or not finite numbers).
  """
  if threshold is not None:
    threshold = check_real(
      "threshold", threshold, "None (ceil(n/2) of the valid clients) or a finite number >= 0", lambda v: v >= 0
    )
  server_lr = check_real("server_lr", server_lr, "a finite number > 0", lambda v: v > 0)

  def aggregate(state, global_params, client_params, client_stats, key):
    del key
    valid, nonfinite = valid_mask(client_params, client_stats)
    weights = example_weights(client_stats, valid)
    n = jnp.sum(valid).astype(jnp.int32)
    theta = ((n + 1) // 2).astype(jnp.float32) if threshold is None else jnp.float32(threshold)
    u = client_deltas(global_params, client_params, valid)  # Invalid clients: 0, i.e. sign 0, no vote.
    outs, flipped, total = [], 0.0, 0
    for g, d, x in zip(jax.tree.leaves(global_params), jax.tree.leaves(u), jax.tree.leaves(client_params)):
      votes = jnp.abs(jnp.sum(jnp.sign(d), axis=0))
      lr = jnp.where(votes >= theta, server_lr, -server_lr)
      avg = jnp.sum(expand_to(weights, d) * d, axis=0)
      outs.append((g.astype(jnp.float32) + lr * avg).astype(x.dtype))
      flipped = flipped + jnp.sum(lr < 0, dtype=jnp.float32)
      total += votes.size
    new = jax.tree.unflatten(jax.tree.structure(global_params), outs)
    new_global = keep_global_if_empty(jnp.any(valid), new, global_params)
    diagnostics = {
      "weights": weights,
      "flagged": jnp.zeros(valid.shape, bool),
      "nonfinite": nonfinite,
      "rlr_flipped": flipped / max(total, 1),
      "rlr_threshold": theta,
    }
    return new_global, state, diagnostics

  return Aggregator(stateless_init, aggregate)


# ---------------------------------------------------------------- FLAME


def _bottleneck_distances(dist: jax.Array) -> jax.Array:
  """Minimax path distances (single-linkage merge heights) by Floyd-Warshall in the (min, max) semiring.

  ``B[i, j]`` is the smallest ``t`` such that ``i`` and ``j`` are connected by
  edges of length ``<= t``; ``inf`` rows and columns (invalid clients) stay
  ``inf``. A ``fori_loop`` over the C pivots, ``O(C^2)`` memory.
  """

  def relax(k, b):
    col = jax.lax.dynamic_slice_in_dim(b, k, 1, axis=1)
    row = jax.lax.dynamic_slice_in_dim(b, k, 1, axis=0)
    return jnp.minimum(b, jnp.maximum(col, row))

  return jax.lax.fori_loop(0, dist.shape[0], relax, dist)


def flame(noise_lambda: float = 0.001, min_cluster_frac: float = 0.5) -> Aggregator:
  """FLAME (Nguyen et al., USENIX Security 2022): cluster, clip to the median norm, average, add noise.

  With ``u_c = client_c - global`` over all leaves and ``n`` valid clients:

  1. *Clustering.* Cosine distances ``d_ij = 1 - cos(u_i, u_j)`` (``d = 1`` with a
     zero update, as sklearn's ``cosine_distances``). The authors cluster them
     with HDBSCAN (``min_cluster_size = n // 2 + 1``, single-cluster mode) and
     admit the majority cluster. In place of HDBSCAN this rule computes, in
     graph and deterministically, the admitted set that
     ``HDBSCAN(metric='precomputed', min_cluster_size=m, min_samples=1,
     allow_single_cluster=True)`` labels: with ``m > n / 2`` the condensed tree
     is the root alone, and its labelled points are those that leave it last,
     i.e. the single-linkage component at the smallest distance ``t*`` at which
     some component still has ``m`` members. ``t*`` and the component are read
     from the minimax path distances (Floyd-Warshall in the (min, max)
     semiring; with ``min_samples=1`` mutual reachability leaves them
     unchanged): ``t* = min_i (m-th smallest B[i, :])``, admitted
     ``{j : B[i*, j] <= t*}``. ``m = int(min_cluster_frac * n) + 1``; the
     default 0.5 gives the authors' ``n // 2 + 1``.
  2. *Clipping.* ``S = median_c |u_c|`` over all valid clients (``np.median``),
     and each update is scaled by ``min(1, S / |u_c|)``.
  3. *Aggregation.* The uniform mean of the admitted clipped updates (the
     paper's ``sum / L``; example counts only decide validity).
  4. *Noise.* ``N(0, (noise_lambda * S)^2)`` on every coordinate (the paper's
     ``sigma = lambda * S_t``), drawn from the round's key, one split per leaf;
     BatchNorm running variances (``batch_stats/.../var``) are then clamped at 0.

  Distances are taken between updates, not between the local models the
  paper's Algorithm 1 writes: the global model is common to all uploads and
  would dominate the angles between models.

  Args:
    noise_lambda: lambda >= 0 (0: no noise; the aggregate is then
      deterministic).
    min_cluster_frac: in ``[0.5, 1)``; the admitted cluster has at least
      ``int(min_cluster_frac * n) + 1`` clients.

  Returns:
    An ``Aggregator`` with an empty state; diagnostics ``weights`` (``1 / L``
    per admitted client), ``flagged`` (valid but not admitted), ``nonfinite``,
    ``clipped: bool[C]``, ``update_norm: f32[C]`` (before clipping; NaN/Inf
    for a non-finite upload), and the scalars ``clip_bound`` (S),
    ``noise_std`` and ``cluster_distance`` (``t*``).

  Raises:
    ValueError: ``noise_lambda < 0`` or ``min_cluster_frac`` outside ``[0.5, 1)``.
  """
  noise_lambda = check_real("noise_lambda", noise_lambda, "a finite number >= 0", lambda v: v >= 0)
  min_cluster_frac = check_real(
    "min_cluster_frac",
    min_cluster_frac,
    "in [0.5, 1) (the admitted cluster must be a majority of the valid clients)",
    lambda v: 0.5 <= v < 1.0,
  )

  def aggregate(state, global_params, client_params, client_stats, key):
    valid, nonfinite = valid_mask(client_params, client_stats)
    c = valid.shape[0]
    n = jnp.sum(valid).astype(jnp.int32)
    any_valid = jnp.any(valid)
    raw_norm = jnp.sqrt(tree_sq_norms(client_deltas(global_params, client_params)))
    u = client_deltas(global_params, client_params, valid)

    # 1. Majority cluster of the cosine distances.
    dist = 1.0 - _cosine(u)
    dist = jnp.where(jnp.eye(c, dtype=bool), 0.0, dist)
    dist = jnp.where(valid[:, None] & valid[None, :], dist, jnp.inf)
    b = _bottleneck_distances(dist)
    size_table = jnp.asarray([min(int(min_cluster_frac * k) + 1, max(k, 1)) for k in range(c + 1)], jnp.int32)
    m = size_table[n]
    reach = jnp.take(jnp.sort(b, axis=1), m - 1, axis=1)  # Distance at which i's component has m members.
    reach = jnp.where(valid, reach, jnp.inf)
    center = jnp.argmin(reach)
    t_star = reach[center]
    admitted = valid & (b[center] <= t_star)

    # 2. Clip every update to the median norm.
    norm = jnp.where(valid, raw_norm, 0.0)
    bound, _, _ = masked_median(norm, valid)
    bound = jnp.where(any_valid, bound, 0.0)
    clipped = norm > bound
    scale = jnp.where(clipped, bound / jnp.where(clipped, norm, 1.0), 1.0)

    # 3-4. Mean of the admitted clipped updates, plus noise.
    weights = normalize(admitted.astype(jnp.float32))
    coef = weights * scale
    noise_std = noise_lambda * bound
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(global_params)
    keys = jax.random.split(key, len(leaves_with_path))
    outs = []
    for (path, g), d, x, k in zip(leaves_with_path, jax.tree.leaves(u), jax.tree.leaves(client_params), keys):
      mean_update = jnp.sum(expand_to(coef, d) * d, axis=0)
      y = g.astype(jnp.float32) + mean_update
      if noise_lambda > 0:
        y = y + noise_std * jax.random.normal(k, y.shape, jnp.float32)
        if _is_running_variance(path):
          y = jnp.maximum(y, 0.0)
      outs.append(y.astype(x.dtype))
    new_global = keep_global_if_empty(any_valid, jax.tree.unflatten(treedef, outs), global_params)
    diagnostics = {
      "weights": weights,
      "flagged": valid & ~admitted,
      "nonfinite": nonfinite,
      "clipped": valid & clipped,
      "update_norm": raw_norm,
      "clip_bound": bound,
      "noise_std": jnp.where(any_valid, noise_std, 0.0).astype(jnp.float32),
      "cluster_distance": jnp.where(any_valid, t_star, 0.0),
    }
    return new_global, state, diagnostics

  return Aggregator(stateless_init, aggregate)


# ---------------------------------------------------------------- FoolsGold


class FoolsGoldState(NamedTuple):
  """State of ``foolsgold``."""

  history: PyTree  # float32 leaves [C, ...]: each client's sum of its valid updates so far.


def foolsgold_weights(features: PyTree, valid: jax.Array, kappa: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """FoolsGold's per-client weights in ``[0, 1]`` from per-client feature vectors (Fung et al. 2020).

  As the authors' ``foolsgold(grads)``: ``cs = cosine(features) - I``;
  ``v_i = max_j cs_ij`` (the zero diagonal included, so ``v_i >= 0``);
  pardoning ``cs_ij *= v_i / v_j`` where ``v_i < v_j``; ``w_i = 1 - max_j cs_ij``
  clipped to ``[0, 1]``; ``w /= max w``; ``w[w == 1] = 0.99``;
  ``w = kappa * (ln(w / (1 - w)) + 0.5)`` (the paper's logit, ``kappa = 1`` in
  the code) clipped to ``[0, 1]``. Invalid clients take no part (their
  similarities are 0, which the zero diagonal makes inert) and get 0. Where the
  code divides 0 by 0 (every valid client has a perfect twin, ``max w = 0``),
  every valid client gets 1.

  Args:
    features: leaves ``[C, ...]``, finite (invalid rows may hold anything finite).
    valid: ``bool[C]``.
    kappa: the logit's confidence (> 0).

  Returns:
    ``(weights f32[C], max_similarity f32[C])``: the weights (not normalized)
    and each client's largest pardoned similarity.
  """
  c = valid.shape[0]
  both = valid[:, None] & valid[None, :] & ~jnp.eye(c, dtype=bool)
  cs = jnp.where(both, _cosine(features), 0.0)
  v = jnp.max(cs, axis=1)
  pardon = v[:, None] < v[None, :]
  cs = jnp.where(pardon, cs * v[:, None] / jnp.where(pardon, v[None, :], 1.0), cs)
  max_sim = jnp.max(cs, axis=1)
  w = jnp.where(valid, jnp.clip(1.0 - max_sim, 0.0, 1.0), 0.0)
  top = jnp.max(w)
  w = jnp.where(top > 0, w / jnp.where(top > 0, top, 1.0), 0.0)
  w = jnp.where(w == 1.0, 0.99, w)
  logit = kappa * (jnp.log(w / (1.0 - w)) + 0.5)  # -inf at w = 0, clipped to 0 below.
  w = jnp.where(valid, jnp.clip(logit, 0.0, 1.0), 0.0)
  w = jnp.where(top > 0, w, valid.astype(jnp.float32))
  return w, jnp.where(valid, max_sim, 0.0)


def foolsgold(kappa: float = 1.0, use_history: bool = True, num_clients: int | None = None) -> Aggregator:
  """FoolsGold (Fung et al., RAID 2020): down-weights clients whose update histories look alike.

  Per round, as Algorithm 1 and the authors' code: each valid client's update
  ``u_c = client_c - global`` (all leaves, float32) is added to its history
  ``H_c`` (kept in the state; an invalid client's history is unchanged), the
  FoolsGold weights ``alpha`` are computed from the cosine similarities of
  the histories (``foolsgold_weights``: pardoning, ``1 - max`` similarity,
  rescaling, logit with ``kappa``), and the new global model is the
  ``alpha``-weighted mean of the uploads. Differences from the code, for the
  contract: the weights are normalized over the valid clients (the code adds
  ``sum_c alpha_c u_c``, unnormalized, or divides it by C: a server learning
  rate), example counts only decide validity (FoolsGold ignores them), and
  all leaves are features (``deep-fg`` uses only the output layer's weights,
  the ``ML`` code all of them).

  Args:
    kappa: confidence of the logit (> 0); 1 as in the code.
    use_history: True (the paper; the code's ``use_memory``): similarities of
      the histories; False: of this round's updates only.
    num_clients: C, required (the state holds the ``[C, ...]`` history).

  Returns:
    An ``Aggregator`` with ``FoolsGoldState``; diagnostics ``weights``,
    ``flagged`` (valid with FoolsGold weight 0), ``nonfinite``,
    ``fg_weight: f32[C]`` (the weights before normalization) and
    ``max_similarity: f32[C]``.

  Raises:
    ValueError: ``kappa <= 0``, ``use_history`` not a bool, ``num_clients``
      missing or not a positive integer; at aggregation, a client axis that
      is not as long as the history (``num_clients``, or the round's sampled
      clients: ``Aggregator.client_axes``).
  """
  kappa = check_real("kappa", kappa, "a finite number > 0", lambda v: v > 0)
  if not isinstance(use_history, bool):
    raise ValueError(f"aggregation.kwargs.use_history={use_history!r}: must be True or False.")
  c = check_num_clients(num_clients, "foolsgold")

  def init(global_params):
    return FoolsGoldState(jax.tree.map(lambda g: jnp.zeros((c,) + g.shape, jnp.float32), global_params))

  def aggregate(state, global_params, client_params, client_stats, key):
    del key
    valid, nonfinite = valid_mask(client_params, client_stats)
    rows = jax.tree.leaves(state.history)[0].shape[0]  # C, or the m clients of a sampled round (gathered).
    if valid.shape[0] != rows:
      raise ValueError(
        f"aggregation.kwargs.num_clients={c} does not match the client axis of size {valid.shape[0]} "
        f"(foolsgold's history has {rows} rows)."
      )
    u = client_deltas(global_params, client_params, valid)
    history = jax.tree.map(lambda h, d: h + d, state.history, u)
    fg, max_sim = foolsgold_weights(history if use_history else u, valid, kappa)
    weights = normalize(fg)
    new_global = keep_global_if_empty(jnp.any(valid), weighted_average(client_params, weights), global_params)
    diagnostics = {
      "weights": weights,
      "flagged": valid & (fg <= 0),
      "nonfinite": nonfinite,
      "fg_weight": fg,
      "max_similarity": max_sim,
    }
    return new_global, FoolsGoldState(history), diagnostics

  return Aggregator(init, aggregate, FoolsGoldState(history=True))  # Each client's history is its own.
