"""More Byzantine-robust aggregation rules: Centered Clipping, DnC and Bulyan.

- Centered Clipping: Karimireddy, He, Jaggi, "Learning from History for
  Byzantine Robust Optimization", ICML 2021. As the authors' code
  (``Clipping(tau, n_iter=1)`` of epfml/byzantine-robust-optimizer) the
  iteration is ``v <- v + mean_i clip_tau(x_i - v)``, unweighted, ``iters = 1``
  by default; ``tau`` is chosen per experiment there (no default), here 10.
  The authors' center persists across rounds (their "momentum"); here it starts
  at the zero update (the global model) unless ``warm_start=True``, which keeps
  the previous round's aggregate update in the state as the paper does.
- Divide-and-Conquer (DnC): Shejwalkar, Houmansadr, "Manipulating the
  Byzantine: Optimizing Model Poisoning Attacks and Defenses for Federated
  Learning", NDSS 2021 (Algorithm 2). Defaults ``subsample_dim=10000``,
  ``iters=1``, ``filter_frac=1.0`` and the removal count
  ``int(filter_frac * num_byzantine)`` follow the authors' code; the kept
  clients are averaged with example-count weights (their code's plain mean
  when the counts are equal), as ``multi_krum`` does.
- Bulyan: El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of
  Distributed Learning in Byzantium", ICML 2018: ``theta = n - 2f`` clients
  chosen by Krum applied repeatedly to the remaining ones (scores recomputed on
  the remaining set, as in the paper, with the round's neighbour count
  ``n - f - 2``; see ``bulyan``), then per coordinate the mean of the
  ``beta = theta - 2f`` selected values closest to their median. Unweighted,
  like the coordinate-wise rules of ``robust``.

All rules follow the contract of ``base`` (docs/design.md §2): pure and
jittable, static shapes, masks and sorts instead of boolean indexing, no Python
loop over clients, never told which clients are malicious. Invalid clients
(non-finite upload or ``num_examples == 0``) are masked with ``jnp.where``
before any arithmetic and never reach the global model; when no client is
valid the global parameters are kept.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedgan_jax.aggregation.base import (
  Aggregator,
  EmptyState,
  PyTree,
  check_real,
  client_deltas,
  example_weights,
  expand_to,
  keep_global_if_empty,
  masked_sort,
  normalize,
  stateless_init,
  tree_sq_norms,
  valid_mask,
  weighted_average,
)
from fedgan_jax.aggregation.robust import _coordinate_share, _ranks, krum_scores, pairwise_sq_distances

_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32 in the projections on GPU


def _check_int(value, name: str, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f"aggregation.kwargs.{name}={value!r}: must be an integer >= {minimum}.")
  return int(value)


def _num_clients(client_params: PyTree) -> int:
  return jax.tree.leaves(client_params)[0].shape[0]


# ------------------------------------------------------------ Centered Clipping


class CenteredClipState(NamedTuple):
  """State of ``centered_clip(warm_start=True)``: the previous aggregate update."""

  center: PyTree  # float32, shaped as the global params.


def centered_clip(tau: float = 10.0, iters: int = 1, warm_start: bool = False) -> Aggregator:
  """Centered Clipping (Karimireddy, He & Jaggi, ICML 2021).

  On the updates ``u_i = client_i - global`` of the ``n`` valid clients,
  iterates ``iters`` times::

      v <- v + (1/n) * sum_i t_i (u_i - v),   t_i = min(1, tau / |u_i - v|)

  (L2 norm over all leaves) and returns ``global + v``. ``v`` starts at 0
  (the global model) or, with ``warm_start``, at the previous round's
  aggregate update kept in the state (the paper's and authors' code's center;
  the state starts at 0 and is left unchanged by a round with no valid
  client). Unweighted, as in the paper: ``num_examples`` only decides
  validity, so a client moves one iteration by at most ``tau / n``.

  Each step is linear in the updates, so ``v = a * v_0 + sum_i w_i u_i`` with
  ``a + sum_i w_i = 1``. ``diagnostics['weights']`` is ``w`` normalized (the
  share of the clients' total coefficient each got; ``a`` is the weight left
  on the starting center, reported as ``anchor_weight``).

  Args:
    tau: clipping radius (> 0), in the units of the update norm. The authors
      tune it per experiment; set it near the honest updates' spread.
    iters: clipping iterations ``L`` (>= 1; the authors' default is 1).
    warm_start: start from the previous aggregate update (state) instead of 0.

  Returns:
    An ``Aggregator``; state ``EmptyState`` or ``CenteredClipState``;
    diagnostics add ``clip_factor: f32[C]`` (``t`` of the last iteration, 0
    for invalid clients), ``clipped: bool[C]`` (``t < 1`` there) and
    ``anchor_weight: f32[]``. ``flagged`` is all False (the rule bounds every
    client's influence instead of judging clients).

  Raises:
    ValueError: a hyperparameter out of range.
  """
  tau = check_real("tau", tau, "a finite number > 0", lambda v: v > 0)  # May be traced (aggregation/choice.py).
  iters = _check_int(iters, "iters", 1)
  if not isinstance(warm_start, bool):
    raise ValueError(f"aggregation.kwargs.warm_start={warm_start!r}: must be True or False.")

  def init(global_params):
    if not warm_start:
      return EmptyState()
    return CenteredClipState(jax.tree.map(lambda g: jnp.zeros(g.shape, jnp.float32), global_params))

  def aggregate(state, global_params, client_params, client_stats, key):
    del key
    valid, nonfinite = valid_mask(client_params, client_stats)
    any_valid = jnp.any(valid)
    n = jnp.sum(valid).astype(jnp.float32)
    inv_n = jnp.where(n > 0, 1.0 / jnp.maximum(n, 1.0), 0.0)
    u = client_deltas(global_params, client_params, valid)
    if warm_start:
      v0 = jax.tree.map(lambda c: c.astype(jnp.float32), state.center)
    else:
      v0 = jax.tree.map(lambda g: jnp.zeros(g.shape, jnp.float32), global_params)
    c = valid.shape[0]

    def step(_, carry):
      v, w, anchor, _ = carry
      r = jnp.sqrt(tree_sq_norms(jax.tree.map(lambda x, y: x - y[None], u, v)))
      over = r > tau
      t = jnp.where(valid, jnp.where(over, tau / jnp.where(over, r, 1.0), 1.0), 0.0)
      v = jax.tree.map(lambda y, x: y + inv_n * jnp.sum(expand_to(t, x) * (x - y[None]), axis=0), v, u)
      keep = 1.0 - jnp.sum(t) * inv_n
      return v, w * keep + t * inv_n, anchor * keep, t

    init_carry = (v0, jnp.zeros(c, jnp.float32), jnp.float32(1.0), jnp.zeros(c, jnp.float32))
    v, w, anchor, t = jax.lax.fori_loop(0, iters, step, init_carry)
    new = jax.tree.map(lambda g, dv, x: (g.astype(jnp.float32) + dv).astype(x.dtype), global_params, v, client_params)
    new_global = keep_global_if_empty(any_valid, new, global_params)
    if warm_start:
      state = CenteredClipState(jax.tree.map(lambda a, b: jnp.where(any_valid, a, b), v, v0))
    diagnostics = {
      "weights": normalize(w),
      "flagged": jnp.zeros(valid.shape, bool),
      "nonfinite": nonfinite,
      "clip_factor": t,
      "clipped": valid & (t < 1.0),
      "anchor_weight": jnp.where(any_valid, anchor, 1.0),
    }
    return new_global, state, diagnostics

  return Aggregator(init, aggregate)


# ----------------------------------------------------------------------- DnC


def subsample_coordinates(key: jax.Array, num_coordinates: int, size: int, iters: int) -> jax.Array:
  """``int32[iters, min(size, d)]``: DnC's random coordinate subsets, one per iteration.

  Coordinates index the clients' updates flattened leaf by leaf (in
  ``jax.tree.leaves`` order, each leaf row-major). Iteration ``i`` draws
  ``min(size, d)`` distinct coordinates with ``jax.random.choice`` from
  ``jax.random.split(key, iters)[i]``; when ``d <= size`` every iteration uses
  all coordinates, in order (no randomness, as the subsample would be all of
  them anyway).
  """
  d = int(num_coordinates)
  if size >= d:
    return jnp.broadcast_to(jnp.arange(d, dtype=jnp.int32), (iters, d))
  keys = jax.random.split(key, iters)
  draw = lambda k: jax.random.choice(k, d, shape=(size,), replace=False).astype(jnp.int32)
  return jax.vmap(draw)(keys)


def _gather_coordinates(tree: PyTree, idx: jax.Array) -> jax.Array:
  """``f32[C, b]``: the entries at flat coordinates ``idx[b]`` of every client.

  Gathers leaf by leaf (masked to each leaf's coordinate range) instead of
  concatenating the clients' full updates into one ``[C, d]`` copy.
  """
  out, offset = None, 0
  for x in jax.tree.leaves(tree):
    flat = x.reshape(x.shape[0], -1)
    size = flat.shape[1]
    if size == 0:
      continue
    local = idx - offset
    inside = (local >= 0) & (local < size)
    part = jnp.where(inside[None], jnp.take(flat, jnp.clip(local, 0, size - 1), axis=1), 0.0)
    out = part if out is None else out + part
    offset += size
  return out


def dnc(num_byzantine: int = 1, subsample_dim: int = 10000, iters: int = 1, filter_frac: float = 1.0) -> Aggregator:
  """Divide-and-Conquer (Shejwalkar & Houmansadr, NDSS 2021, Algorithm 2).

  Each of ``iters`` iterations draws ``b = min(subsample_dim, d)`` random
  coordinates of the updates ``u_i = client_i - global`` (``d`` the number of
  parameters; see ``subsample_coordinates``; the key is the round's ``key``),
  centers the valid clients' subsampled updates on their mean, takes the top
  right singular vector ``v`` of the centered ``[C, b]`` matrix and scores
  each client by ``<u_i[r] - mu, v>^2``. The ``k = int(filter_frac *
  num_byzantine)`` highest-scored valid clients are removed (at most ``n - 1``
  of the ``n`` valid clients, so one iteration always keeps one); the kept set
  is the intersection over iterations. The kept clients' full uploads are
  averaged with example-count weights. If the intersection is empty (possible
  only with ``iters > 1``), the global parameters are kept.

  Args:
    num_byzantine: assumed number of malicious clients ``m`` (>= 0; 0 gives
      FedAvg).
    subsample_dim: coordinates per iteration ``b`` (>= 1).
    iters: subsampling iterations (>= 1).
    filter_frac: ``c`` of the paper, removal count ``int(c * m)`` (>= 0).

  Returns:
    An ``Aggregator`` with an empty state; ``flagged`` marks the valid clients
    removed in any iteration; diagnostics add ``scores: f32[C]`` (outlier
    score averaged over iterations, ``+inf`` for invalid clients).

  Raises:
    ValueError: a hyperparameter out of range, or (at trace time)
      ``int(filter_frac * num_byzantine) >= C``.
  """
  num_byzantine = _check_int(num_byzantine, "num_byzantine", 0)
  subsample_dim = _check_int(subsample_dim, "subsample_dim", 1)
  iters = _check_int(iters, "iters", 1)
  if (
    isinstance(filter_frac, bool)
    or not isinstance(filter_frac, numbers.Real)
    or not (filter_frac >= 0 and math.isfinite(filter_frac))
  ):
    raise ValueError(f"aggregation.kwargs.filter_frac={filter_frac!r}: must be a finite number >= 0.")
  num_removed = int(filter_frac * num_byzantine)

  def aggregate(state, global_params, client_params, client_stats, key):
    c = _num_clients(client_params)
    if num_removed >= c:
      raise ValueError(
        f"aggregation.kwargs.num_byzantine={num_byzantine}, filter_frac={filter_frac}: DnC removes "
        f"int(filter_frac * num_byzantine) = {num_removed} clients per iteration; needs fewer than "
        f"num_clients={c}."
      )
    valid, nonfinite = valid_mask(client_params, client_stats)
    n = jnp.sum(valid).astype(jnp.int32)
    u = client_deltas(global_params, client_params, valid)
    d = sum(math.prod(x.shape[1:]) for x in jax.tree.leaves(u))
    idx = subsample_coordinates(key, d, subsample_dim, iters)
    k = jnp.minimum(num_removed, jnp.maximum(n - 1, 0))

    def one_iteration(cols):
      x = _gather_coordinates(u, cols)
      mu = jnp.sum(x, axis=0) / jnp.maximum(n, 1).astype(jnp.float32)  # Invalid rows are 0.
      centered = jnp.where(valid[:, None], x - mu[None], 0.0)
      _, _, vt = jnp.linalg.svd(centered, full_matrices=False)
      score = jnp.square(jnp.matmul(centered, vt[0], precision=_HIGHEST))
      score = jnp.where(jnp.isnan(score), jnp.inf, score)  # A NaN score counts as most outlying.
      rank = _ranks(-jnp.where(valid, score, -jnp.inf))  # 0 = highest valid score; invalid last.
      return score, valid & (rank >= k)

    scores, kept = jax.vmap(one_iteration)(idx)
    good = jnp.all(kept, axis=0)
    weights = example_weights(client_stats, good)
    new_global = keep_global_if_empty(jnp.any(good), weighted_average(client_params, weights), global_params)
    diagnostics = {
      "weights": weights,
      "flagged": valid & ~good,
      "nonfinite": nonfinite,
      "scores": jnp.where(valid, jnp.mean(scores, axis=0), jnp.inf),
    }
    return new_global, state, diagnostics

  return Aggregator(stateless_init, aggregate)


# -------------------------------------------------------------------- Bulyan


def _bulyan_requirement(num_byzantine: int, num_clients: int) -> None:
  if num_clients < 4 * num_byzantine + 3:
    raise ValueError(
      f"aggregation.kwargs.num_byzantine={num_byzantine}: Bulyan needs num_clients >= 4f + 3 = "
      f"{4 * num_byzantine + 3} (El Mhamdi et al. 2018); got num_clients={num_clients}."
    )


def bulyan(num_byzantine: int = 1, num_clients: int | None = None) -> Aggregator:
  """Bulyan (El Mhamdi, Guerraoui & Rouault, ICML 2018) over Krum.

  With ``f = num_byzantine`` and ``n`` valid clients: selects ``theta = n -
  2f`` clients by applying Krum (``robust.krum_scores`` on the squared
  distances of ``robust.pairwise_sq_distances``) to the remaining (not yet
  selected) valid clients ``R``, moving the best-scored one to the selection,
  ``theta`` times; then at every coordinate averages the ``beta = theta - 2f``
  selected values closest to the selected values' median (``np.median``).
  Those values are a contiguous run of the sorted selected values; the run
  with the smallest largest distance to the median is taken (the first one on
  exact ties).

  Krum's score in every selection step sums the squared distances to the
  ``min(n - f - 2, |R| - 1)`` nearest remaining clients: the round's Krum
  neighbour count, capped by what remains. (Krum run literally on ``R`` would
  use ``|R| - f - 2``, which falls to 1 or less in the last steps, where
  Krum's own requirement ``|R| > 2f + 2`` no longer holds: two mutual nearest
  neighbours then tie exactly and the choice would depend on the clients'
  order. With the cap the rule is permutation invariant.)

  Requires ``C >= 4f + 3``, checked at build time when ``num_clients`` is
  given, else when the rule is traced. With invalid clients ``n`` may fall
  below ``4f + 3`` in a round; then ``theta`` and ``beta`` are clipped to at
  least 1 (the rule degrades towards Krum followed by a coordinate-wise
  median) instead of failing.

  ``diagnostics['weights'][c]`` is the fraction of coordinates at which client
  ``c``'s value is among the averaged ones (ties at the run's ends count for
  every tied selected client), normalized to sum to 1, as ``trimmed_mean``
  reports.

  Args:
    num_byzantine: assumed number of Byzantine clients ``f`` (>= 0).
    num_clients: C, optional; checks ``C >= 4f + 3`` when given.

  Returns:
    An ``Aggregator`` with an empty state; ``flagged`` marks the valid clients
    Krum did not select; diagnostics add ``selected: bool[C]``.

  Raises:
    ValueError: ``num_byzantine < 0`` or ``C < 4f + 3``.
  """
  f = _check_int(num_byzantine, "num_byzantine", 0)
  if num_clients is not None:
    _bulyan_requirement(f, _check_int(num_clients, "num_clients", 1))

  def aggregate(state, global_params, client_params, client_stats, key):
    del key
    c = _num_clients(client_params)
    _bulyan_requirement(f, c)
    valid, nonfinite = valid_mask(client_params, client_stats)
    n = jnp.sum(valid).astype(jnp.int32)
    theta = jnp.clip(n - 2 * f, 1, jnp.maximum(n, 1))
    beta = jnp.clip(theta - 2 * f, 1, theta)
    sq_dist = pairwise_sq_distances(global_params, client_params, valid)

    def select(step, selected):
      remaining = valid & ~selected
      d = jnp.where(remaining[:, None] & remaining[None, :], sq_dist, jnp.inf)
      # krum_scores sums the |R| - f' - 2 nearest of the remaining set R; f' = f - |selected| makes that the
      # round's n - f - 2 (capped at |R| - 1 there).
      best = jnp.argmin(krum_scores(d, remaining, f - jnp.sum(selected)))
      take = (step < theta) & jnp.any(remaining)
      return selected | ((jnp.arange(c) == best) & take)

    selected = jax.lax.fori_loop(0, c - 2 * f, select, jnp.zeros(c, bool))
    windows = jnp.arange(2 * f + 1)  # Start of the run of beta values: 0 .. theta - beta (= 2f unclipped).
    window_ok = windows <= theta - beta
    mid_lo, mid_hi = jnp.maximum((theta - 1) // 2, 0), theta // 2

    outs, used = [], []
    leaves, treedef = jax.tree.flatten(client_params)
    for x in leaves:
      xf = x.astype(jnp.float32)
      s = masked_sort(xf, selected)  # Selected values first, then +inf.
      med = 0.5 * (jnp.take(s, mid_lo, axis=0) + jnp.take(s, mid_hi, axis=0))
      lo = jnp.take(s, windows, axis=0)
      hi = jnp.take(s, jnp.minimum(windows + beta - 1, c - 1), axis=0)
      cost = jnp.maximum(med[None] - lo, hi - med[None])
      start = jnp.argmin(jnp.where(expand_to(window_ok, cost), cost, jnp.inf), axis=0)
      pos = expand_to(jnp.arange(c), s)
      run = (pos >= start[None]) & (pos < start[None] + beta)
      outs.append((jnp.sum(jnp.where(run, s, 0.0), axis=0) / beta.astype(jnp.float32)).astype(x.dtype))
      run_lo = jnp.take_along_axis(s, start[None], axis=0)
      run_hi = jnp.take_along_axis(s, jnp.minimum(start + beta - 1, c - 1)[None], axis=0)
      used.append(expand_to(selected, xf) & (xf >= run_lo) & (xf <= run_hi))
    new_global = keep_global_if_empty(jnp.any(valid), jax.tree.unflatten(treedef, outs), global_params)
    diagnostics = {
      "weights": _coordinate_share(used),
      "flagged": valid & ~selected,
      "nonfinite": nonfinite,
      "selected": selected,
    }
    return new_global, state, diagnostics

  return Aggregator(stateless_init, aggregate)
