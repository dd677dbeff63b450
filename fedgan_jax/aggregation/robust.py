"""Byzantine-robust aggregation rules over the client axis.

- Coordinate-wise median and trimmed mean: Yin, Chen, Ramchandran, Bartlett,
  "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
  ICML 2018.
- Krum and Multi-Krum: Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine
  Learning with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017.
- Geometric median by smoothed Weiszfeld (RFA): Pillutla, Kakade, Harchaoui,
  "Robust Aggregation for Federated Learning", IEEE TSP 2022.

All rules follow the contract of ``base`` (docs/design.md §2): static shapes, masks and
sorting instead of boolean indexing, no Python loop over clients. Invalid
clients (non-finite upload or ``num_examples == 0``) are excluded by every rule:
sorts push them past the valid rows (``+inf`` sentinel, dropped by rank and the
count of valid clients) and distance-based rules give them infinite distance.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from fedgan_jax.aggregation.base import (
  Aggregator,
  client_deltas,
  example_weights,
  expand_to,
  keep_global_if_empty,
  masked_median,
  masked_sort,
  normalize,
  stateless_init,
  tree_sq_norms,
  valid_mask,
  weighted_average,
)

_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32 in distance Gram matrices on GPU


def _coordinate_share(used: list[jax.Array]) -> jax.Array:
  """Normalized per-client fraction of coordinates where ``used`` is True."""
  count = sum(jnp.sum(u.reshape(u.shape[0], -1), axis=1, dtype=jnp.float32) for u in used)
  return normalize(count)


def median() -> Aggregator:
  """Coordinate-wise median of the valid clients (Yin et al. 2018).

  Unweighted: ``num_examples`` only decides validity (> 0). With an even
  number ``n`` of valid clients the median is the mean of the two middle
  values, as ``np.median``.

  ``diagnostics['weights'][c]`` is the fraction of all coordinates at which
  client ``c``'s value lies at the median, i.e. between the two middle order
  statistics (ties count for every tied client), normalized to sum to 1. It
  says how often a client's value *is* the aggregate, not a linear weight.

  Returns:
    An ``Aggregator`` with an empty state.
  """

  def aggregate(state, global_params, client_params, client_stats, key):
    del key
    valid, nonfinite = valid_mask(client_params, client_stats)
    outs, used = [], []
    leaves, treedef = jax.tree.flatten(client_params)
    for x in leaves:
      xf = x.astype(jnp.float32)
      med, lo, hi = masked_median(xf, valid)
      outs.append(med.astype(x.dtype))
      used.append(expand_to(valid, xf) & (xf >= lo[None]) & (xf <= hi[None]))
    new_global = keep_global_if_empty(jnp.any(valid), jax.tree.unflatten(treedef, outs), global_params)
    diagnostics = {
      "weights": _coordinate_share(used),
      "flagged": jnp.zeros(valid.shape, bool),
      "nonfinite": nonfinite,
    }
    return new_global, state, diagnostics

  return Aggregator(stateless_init, aggregate)


def trimmed_mean(beta: float = 0.1) -> Aggregator:
  """Coordinate-wise trimmed mean of the valid clients (Yin et al. 2018).

  At every coordinate the ``k = int(beta * n)`` largest and ``k`` smallest of
  the ``n`` valid values are dropped and the rest averaged, exactly as
  ``scipy.stats.trim_mean(values, proportiontocut=beta)``. ``k`` is looked up
  in a static table indexed by the (traced) ``n``, so it matches Python's
  ``int(beta * n)`` bit for bit. Unweighted, like the median.

  ``diagnostics['weights'][c]`` is the fraction of coordinates at which
  client ``c``'s value lies inside the kept range of order statistics
  ``[s_k, s_{n-k-1}]`` (ties at the edges count for every tied client),
  normalized to sum to 1.

  Args:
    beta: fraction cut from each end, in ``[0, 0.5)``.

  Returns:
    An ``Aggregator`` with an empty state.

  Raises:
    ValueError: ``beta`` outside ``[0, 0.5)``.
  """
  if not isinstance(beta, numbers.Real) or not 0.0 <= beta < 0.5:
    raise ValueError(f"aggregation.kwargs.beta={beta!r}: must be in [0, 0.5).")
  beta = float(beta)

  def aggregate(state, global_params, client_params, client_stats, key):
    del key
    valid, nonfinite = valid_mask(client_params, client_stats)
    c = valid.shape[0]
    n = jnp.sum(valid).astype(jnp.int32)
    cut_table = jnp.asarray([int(beta * m) for m in range(c + 1)], jnp.int32)
    k = cut_table[n]
    kept_count = jnp.maximum(n - 2 * k, 1).astype(jnp.float32)
    pos = jnp.arange(c)
    keep_pos = (pos >= k) & (pos < n - k)
    outs, used = [], []
    leaves, treedef = jax.tree.flatten(client_params)
    for x in leaves:
      xf = x.astype(jnp.float32)
      s = masked_sort(xf, valid)
      kept = jnp.where(expand_to(keep_pos, s), s, 0.0)
      outs.append((jnp.sum(kept, axis=0) / kept_count).astype(x.dtype))
      lo = jnp.take(s, jnp.minimum(k, c - 1), axis=0)
      hi = jnp.take(s, jnp.clip(n - k - 1, 0, c - 1), axis=0)
      used.append(expand_to(valid, xf) & (xf >= lo[None]) & (xf <= hi[None]))
    new_global = keep_global_if_empty(jnp.any(valid), jax.tree.unflatten(treedef, outs), global_params)
    diagnostics = {
      "weights": _coordinate_share(used),
      "flagged": jnp.zeros(valid.shape, bool),
      "nonfinite": nonfinite,
    }
    return new_global, state, diagnostics

  return Aggregator(stateless_init, aggregate)


def pairwise_sq_distances(global_params, client_params, valid: jax.Array) -> jax.Array:
  """``f32[C, C]`` squared L2 distances between clients over all leaves.

  Computed as a Gram matrix of the updates centered on their coordinate-wise
  median: centering removes the component common to all clients, which would
  otherwise cancel catastrophically in ``|a|^2 + |b|^2 - 2 a.b`` in float32.
  The median (not the mean) is used so one huge upload cannot shift the
  center. Rows and columns of invalid clients are ``+inf``.

  Args:
    global_params: leaves without the client axis.
    client_params: leaves ``[C, ...]``.
    valid: ``bool[C]``.

  Returns:
    The distance matrix, with a zero diagonal for valid clients.
  """
  deltas = client_deltas(global_params, client_params, valid)
  gram = 0.0
  for u in jax.tree.leaves(deltas):
    center, _, _ = masked_median(u, valid)
    centered = jnp.where(expand_to(valid, u), u - center[None], 0.0).reshape(u.shape[0], -1)
    gram = gram + jnp.matmul(centered, centered.T, precision=_HIGHEST)
  sq = jnp.diagonal(gram)
  d = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
  d = jnp.where(jnp.eye(d.shape[0], dtype=bool), 0.0, d)
  both = valid[:, None] & valid[None, :]
  return jnp.where(both, d, jnp.inf)


def krum_scores(sq_dist: jax.Array, valid: jax.Array, f: int) -> jax.Array:
  """Krum score of each client (Blanchard et al. 2017).

  The score of client ``i`` is the sum of squared distances to its
  ``n - f - 2`` nearest other valid clients, ``n`` the number of valid
  clients; that count is clipped to ``[1, n - 1]`` so few valid clients still
  give a defined score. Invalid clients score ``+inf``.

  Args:
    sq_dist: ``f32[C, C]`` from ``pairwise_sq_distances``.
    valid: ``bool[C]``.
    f: assumed number of Byzantine clients.

  Returns:
    ``f32[C]`` scores.
  """
  c = sq_dist.shape[0]
  n = jnp.sum(valid).astype(jnp.int32)
  k = jnp.clip(n - f - 2, 1, n - 1)
  others = jnp.where(jnp.eye(c, dtype=bool), jnp.inf, sq_dist)
  s = jnp.sort(others, axis=1)
  take = jnp.arange(c)[None, :] < k
  score = jnp.sum(jnp.where(take, s, 0.0), axis=1)
  return jnp.where(valid, score, jnp.inf)


def _ranks(x: jax.Array) -> jax.Array:
  """Rank of each entry (0 = smallest), ties broken by index."""
  return jnp.argsort(jnp.argsort(x, stable=True), stable=True)


def _check_f(f, num_clients, name):
  if not isinstance(f, numbers.Integral) or f < 0:
    raise ValueError(f"aggregation.kwargs.f={f!r}: must be an integer >= 0.")
  if num_clients is not None and num_clients <= 2 * f + 2:
    raise ValueError(
      f"aggregation.kwargs.f={f}: {name} needs num_clients > 2f + 2 = {2 * f + 2} "
      f"(Blanchard et al. 2017); got num_clients={num_clients}."
    )


def multi_krum(f: int = 1, m: int | None = None, num_clients: int | None = None) -> Aggregator:
  """Multi-Krum (Blanchard et al. 2017): average the ``m`` best-scored clients.

  Clients are ranked by ``krum_scores``; the ``m`` lowest (``m = n - f`` when
  None, ``n`` the number of valid clients; clipped to ``[1, n]``) are averaged
  with example-count weights. ``flagged`` marks the ``f`` highest-scored valid
  clients: those Krum's assumption of ``f`` attackers points at.

  Args:
    f: assumed number of Byzantine clients (>= 0).
    m: how many clients to average, or None for ``n - f``.
    num_clients: C, optional; checks ``C > 2f + 2`` when given.

  Returns:
    An ``Aggregator`` with an empty state; diagnostics add ``scores`` (Krum
    scores, ``+inf`` for invalid clients).

  Raises:
    ValueError: ``f < 0``, ``m < 1``, or ``num_clients <= 2f + 2``.
  """
  _check_f(f, num_clients, "Multi-Krum" if m != 1 else "Krum")
  if m is not None and (not isinstance(m, numbers.Integral) or m < 1):
    raise ValueError(f"aggregation.kwargs.m={m!r}: must be None or an integer >= 1.")

  def aggregate(state, global_params, client_params, client_stats, key):
    del key
    valid, nonfinite = valid_mask(client_params, client_stats)
    n = jnp.sum(valid).astype(jnp.int32)
    scores = krum_scores(pairwise_sq_distances(global_params, client_params, valid), valid, f)
    rank = _ranks(scores)
    m_eff = jnp.clip(n - f if m is None else m, 1, n)
    selected = valid & (rank < m_eff)
    weights = example_weights(client_stats, selected)
    new_global = keep_global_if_empty(jnp.any(valid), weighted_average(client_params, weights), global_params)
    diagnostics = {
      "weights": weights,
      "flagged": valid & (rank >= n - f),
      "nonfinite": nonfinite,
      "scores": scores,
    }
    return new_global, state, diagnostics

  return Aggregator(stateless_init, aggregate)


def krum(f: int = 1, num_clients: int | None = None) -> Aggregator:
  """Krum (Blanchard et al. 2017): the single client with the lowest score.

  The new global model is exactly the chosen client's upload (weight 1).
  Equivalent to ``multi_krum(f, m=1)``; see there for ``flagged``.

  Args:
    f: assumed number of Byzantine clients (>= 0).
    num_clients: C, optional; checks ``C > 2f + 2`` when given.

  Returns:
    An ``Aggregator`` with an empty state.
  """
  return multi_krum(f=f, m=1, num_clients=num_clients)


def geometric_median(iters: int = 100, eps: float = 1e-6, ftol: float = 1e-6) -> Aggregator:
  """Geometric median by smoothed Weiszfeld, as RFA (Pillutla et al. 2022).

  Minimizes ``sum_i a_i * max(eps, |v - x_i|)`` (``a`` the example-count
  weights of the valid clients) over the updates ``x_i = client_i - global``;
  starts at the weighted mean and iterates
  ``v <- sum_i w_i x_i / sum_i w_i`` with ``w_i = a_i / max(eps, |v - x_i|)``
  until the objective improves by less than ``ftol`` relative, or ``iters``
  steps. Works on updates in float32 for accuracy, then adds the global back.

  ``diagnostics['weights']`` are the final Weiszfeld weights ``w``
  (normalized): the aggregate is (to the last step) that weighted average.

  Args:
    iters: maximum Weiszfeld steps (>= 1).
    eps: smoothing ``nu`` of RFA (> 0): distances below it are clamped.
    ftol: relative objective tolerance for early stopping (>= 0).

  Returns:
    An ``Aggregator`` with an empty state; diagnostics add ``gm_iters``.

  Raises:
    ValueError: a hyperparameter out of range.
  """
  if not isinstance(iters, numbers.Integral) or iters < 1:
    raise ValueError(f"aggregation.kwargs.iters={iters!r}: must be an integer >= 1.")
  if not isinstance(eps, numbers.Real) or not eps > 0:
    raise ValueError(f"aggregation.kwargs.eps={eps!r}: must be > 0.")
  if not isinstance(ftol, numbers.Real) or not ftol >= 0:
    raise ValueError(f"aggregation.kwargs.ftol={ftol!r}: must be >= 0.")

  def aggregate(state, global_params, client_params, client_stats, key):
    del key
    valid, nonfinite = valid_mask(client_params, client_stats)
    alpha = example_weights(client_stats, valid)
    u = client_deltas(global_params, client_params, valid)

    def dists(v):
      diff = jax.tree.map(lambda x, y: x - y[None], u, v)
      return jnp.sqrt(tree_sq_norms(diff))

    def step(w_unnorm):
      w = normalize(w_unnorm)
      v = jax.tree.map(lambda x: jnp.sum(expand_to(w, x) * x, axis=0), u)
      d = dists(v)
      obj = jnp.sum(alpha * jnp.maximum(d, eps))
      return v, d, obj, w

    v0, d0, obj0, w0 = step(alpha)

    def cond(carry):
      i, _, _, obj, prev_obj, _ = carry
      return (i < iters) & (prev_obj - obj > ftol * obj)

    def body(carry):
      i, _, d, obj, _, _ = carry
      v, d_new, obj_new, w = step(jnp.where(valid, alpha / jnp.maximum(d, eps), 0.0))
      return i + 1, v, d_new, obj_new, obj, w

    init = (jnp.int32(0), v0, d0, obj0, jnp.float32(jnp.inf), w0)
    steps, v, _, _, _, w = jax.lax.while_loop(cond, body, init)
    new = jax.tree.map(lambda g, dv, x: (g.astype(jnp.float32) + dv).astype(x.dtype), global_params, v, client_params)
    new_global = keep_global_if_empty(jnp.any(valid), new, global_params)
    diagnostics = {
      "weights": w,
      "flagged": jnp.zeros(valid.shape, bool),
      "nonfinite": nonfinite,
      "gm_iters": steps,
    }
    return new_global, state, diagnostics

  return Aggregator(stateless_init, aggregate)
