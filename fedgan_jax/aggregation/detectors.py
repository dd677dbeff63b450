"""Malicious-client detectors, and the detect and decay stages of the detection defense.

- Isolation Forest: Liu, Ting, Zhou, "Isolation Forest", ICDM 2008, written in
  JAX with static shapes so it runs inside the jitted round: every tree is a
  complete binary tree array of depth ``d``; nodes that cannot split become
  leaves through masks. It reproduces ``sklearn.ensemble.IsolationForest``
  (``max_samples='auto'``, ``max_features=1.0``, ``contamination='auto'``) in
  distribution; the random draws differ, so individual scores differ.
- Robust z-score: ``|x - median| / (1.4826 * MAD)`` (Iglewicz & Hoaglin,
  1993), with the mean absolute deviation as fallback when MAD is 0.
- The stages of the global malicious detection of Jin & Li, "Backdoor
  Attack is a Devil in Federated GAN-based Medical Image Synthesis", SASHIMI
  2022: ``detect`` (a detector over per-client features flags clients) and
  ``decay_flagged`` (after a warm-up, if fewer than half are flagged, each
  flagged client's aggregation weight is multiplied by
  ``decay ** times_flagged``; with ``block_after`` a client flagged in that
  many rounds is blocked). ``aggregation.registry.detect_and_decay`` chains
  them into the rule named ``detect``.

A detector is a pure function ``(x: f32[C, F], fit: bool[C], key) ->
(scores: f32[C], flagged: bool[C])``: ``fit`` selects the rows the model is
fitted on (valid clients with finite features); every row is scored; rows with
a non-finite feature are flagged with the detector's maximal score.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedgan_jax.aggregation.base import check_real, masked_median, stateless_init, valid_mask
from fedgan_jax.aggregation.compose import Stage

_EULER_GAMMA = 0.5772156649015329


def average_path_length(n: jax.Array) -> jax.Array:
  """``c(n)``: mean path length of an unsuccessful BST search among ``n`` points.

  ``c(n) = 2 H(n - 1) - 2 (n - 1) / n`` with ``H(i) ~ ln(i) + gamma``;
  ``c(1) = 0``, ``c(2) = 1`` (Liu et al. 2008; as sklearn).

  Args:
    n: sample counts (any shape).

  Returns:
    ``c(n)`` as float32, same shape.
  """
  n = jnp.asarray(n, jnp.float32)
  safe = jnp.maximum(n, 3.0)
  big = 2.0 * (jnp.log(safe - 1.0) + _EULER_GAMMA) - 2.0 * (safe - 1.0) / safe
  return jnp.where(n <= 1, 0.0, jnp.where(n <= 2, 1.0, big))


def _static_depth(psi: int) -> int:
  return int(math.ceil(math.log2(max(psi, 2))))


class _Tree(NamedTuple):
  """An isolation tree as level-major arrays of a complete binary tree.

  Node ``j`` of level ``d`` (``0 <= j < 2^d``) has children ``2j`` and
  ``2j + 1`` of level ``d + 1``; arrays are padded to width ``2^depth``.
  """

  split: jax.Array  # bool[depth, W]: the node splits (else it is a leaf).
  feature: jax.Array  # int32[depth, W]
  threshold: jax.Array  # f32[depth, W]: rows with x[feature] > threshold go right.
  count: jax.Array  # f32[depth + 1, W]: training rows reaching the node.


def _build_tree(key: jax.Array, xs: jax.Array, in_sample: jax.Array, depth: int, depth_limit: jax.Array) -> _Tree:
  """One isolation tree over the rows ``xs[P, F]`` with ``in_sample``.

  Levels are a ``lax.scan`` over a fixed width ``W = 2^depth`` (nodes beyond
  ``2^d`` at level ``d`` are empty), so the program size does not grow with
  the depth.
  """
  p, nf = xs.shape
  width = 2**depth
  slots = jnp.arange(width)

  def level(local, d):
    # local: int32[P], the node (within level d) of each row; -1 once in a leaf.
    member = (local[None, :] == slots[:, None]) & in_sample[None, :]  # [W, P]
    cnt = jnp.sum(member, axis=1)
    k_feat, k_thr = jax.random.split(jax.random.fold_in(key, d))
    lo_all = jnp.min(jnp.where(member[..., None], xs[None], jnp.inf), axis=1)  # [W, F]
    hi_all = jnp.max(jnp.where(member[..., None], xs[None], -jnp.inf), axis=1)
    nonconst = hi_all > lo_all
    # Uniform among the non-constant features: sklearn's random splitter draws
    # features until one is non-constant at the node, the same distribution.
    f = jnp.argmax(jnp.where(nonconst, jax.random.uniform(k_feat, (width, nf)), -1.0), axis=1)
    lo = jnp.take_along_axis(lo_all, f[:, None], axis=1)[:, 0]
    hi = jnp.take_along_axis(hi_all, f[:, None], axis=1)[:, 0]
    can = (cnt >= 2) & jnp.any(nonconst, axis=1) & (d < depth_limit)
    lo, hi = jnp.where(can, lo, 0.0), jnp.where(can, hi, 0.0)
    t = lo + jax.random.uniform(k_thr, (width,)) * (hi - lo)
    t = jnp.where(t < hi, t, lo)  # Rounding must not leave the right child empty.
    idx = jnp.clip(local, 0, width - 1)
    move = (local >= 0) & can[idx]
    right = jnp.take_along_axis(xs, f[idx][:, None], axis=1)[:, 0] > t[idx]
    new_local = jnp.where(move, 2 * local + right, -1)
    return new_local, (can, f.astype(jnp.int32), t, cnt.astype(jnp.float32))

  start = jnp.where(in_sample, 0, -1).astype(jnp.int32)
  last, (split, feature, threshold, count) = jax.lax.scan(level, start, jnp.arange(depth))
  member = (last[None, :] == slots[:, None]) & in_sample[None, :]
  count = jnp.concatenate([count, jnp.sum(member, axis=1, dtype=jnp.float32)[None]])
  return _Tree(split, feature, threshold, count)


def _path_lengths(tree: _Tree, x: jax.Array) -> jax.Array:
  """``h(x)``: depth of the leaf each row of ``x`` reaches, plus ``c(leaf size)``."""
  c = x.shape[0]
  depth = tree.split.shape[0]

  def level(carry, d):
    local, length, live = carry
    s = live & tree.split[d, local]
    right = jnp.take_along_axis(x, tree.feature[d, local][:, None], axis=1)[:, 0] > tree.threshold[d, local]
    return (jnp.where(s, 2 * local + right, local), length + s, s), None

  init = (jnp.zeros(c, jnp.int32), jnp.zeros(c, jnp.int32), jnp.ones(c, bool))
  (local, length, _), _ = jax.lax.scan(level, init, jnp.arange(depth))
  return length.astype(jnp.float32) + average_path_length(tree.count[length, local])


def isolation_forest(
  x: jax.Array,
  fit: jax.Array,
  key: jax.Array,
  num_trees: int = 100,
  max_samples: int = 256,
  max_depth: int | None = None,
  threshold: float = 0.5,
) -> tuple[jax.Array, jax.Array]:
  """Isolation Forest anomaly scores (Liu et al. 2008), pure and key-driven.

  Each of ``num_trees`` trees is grown on ``psi = min(max_samples, n)`` rows
  (``n`` the rows with ``fit``; all of them when ``n <= max_samples``, else a
  random subset per tree) to depth ``ceil(log2(psi))`` (or ``max_depth``):
  at every node a feature is drawn uniformly among those not constant there and
  a split uniformly between its min and max over the node's rows. The score is
  ``s(x) = 2 ** (-E[h(x)] / c(psi))`` with ``h`` the leaf depth plus
  ``c(leaf size)``. ``threshold=0.5`` is sklearn's ``contamination='auto'``:
  flagged iff ``s > 0.5``. With ``psi <= 1`` every score is 0.5 (sklearn's
  convention). The trees are independent of the row order, so for the same
  key the scores are permutation-equivariant when ``n <= max_samples``.

  Scores are invariant to any increasing affine map of a feature (splits are
  uniform between min and max), so features need no standardization.

  Args:
    x: ``f32[C, F]`` features.
    fit: ``bool[C]`` rows to grow the trees on.
    key: PRNG key.
    num_trees: number of trees (static).
    max_samples: subsample cap (static), 256 as in Liu et al.
    max_depth: static depth cap; None for ``ceil(log2(psi))``.
    threshold: score above which a row is flagged.

  Returns:
    ``(scores f32[C], flagged bool[C])``; rows with a non-finite feature get
    score 1 and are flagged.
  """
  x = jnp.asarray(x, jnp.float32)
  c, _ = x.shape
  finite = jnp.all(jnp.isfinite(x), axis=1)
  fit = fit & finite
  n = jnp.sum(fit).astype(jnp.int32)
  psi_static = min(max_samples, c)
  depth = _static_depth(psi_static) if max_depth is None else int(max_depth)
  psi_table = np.minimum(np.arange(c + 1), max_samples)
  limit_table = jnp.asarray([depth if max_depth is not None else _static_depth(int(m)) for m in psi_table], jnp.int32)
  psi = jnp.asarray(psi_table, jnp.float32)[n]
  depth_limit = limit_table[n]
  x_safe = jnp.where(finite[:, None], x, 0.0)

  def one_tree(k):
    k_sub, k_tree = jax.random.split(k)
    if c <= max_samples:
      xs, in_sample = x_safe, fit
    else:  # Random psi-subset of the fit rows: smallest random priorities.
      prio = jnp.where(fit, jax.random.uniform(k_sub, (c,)), 2.0)
      idx = jnp.argsort(prio)[:psi_static]
      xs, in_sample = x_safe[idx], fit[idx]
    tree = _build_tree(k_tree, xs, in_sample, depth, depth_limit)
    return _path_lengths(tree, x_safe)

  h = jnp.mean(jax.vmap(one_tree)(jax.random.split(key, num_trees)), axis=0)
  norm = average_path_length(psi)
  scores = jnp.where(norm > 0, 2.0 ** (-h / jnp.where(norm > 0, norm, 1.0)), 0.5)
  scores = jnp.where(finite, scores, 1.0)
  return scores, (scores > threshold) | ~finite


def robust_zscore(
  x: jax.Array, fit: jax.Array, key: jax.Array | None = None, threshold: float = 3.0
) -> tuple[jax.Array, jax.Array]:
  """Robust z-score detector: flags a row if any feature is far from the median.

  Per feature, over the ``fit`` rows: ``z = |x - median| / (1.4826 * MAD)``;
  when ``MAD = 0`` (more than half the rows tie) the scale falls back to
  ``1.2533 * mean|x - median|`` (both estimate sigma for normal data); when
  that is 0 too (all rows tie) z is 0 at the median and ``inf`` elsewhere.
  The score is the max over features.

  Args:
    x: ``f32[C, F]`` features.
    fit: ``bool[C]`` rows used for the median and MAD.
    key: unused (deterministic); accepted for the detector signature.
    threshold: z above which a row is flagged.

  Returns:
    ``(scores f32[C], flagged bool[C])``; rows with a non-finite feature get
    score ``inf`` and are flagged.
  """
  del key
  x = jnp.asarray(x, jnp.float32)
  finite = jnp.all(jnp.isfinite(x), axis=1)
  fit = fit & finite
  x_safe = jnp.where(finite[:, None], x, 0.0)
  med, _, _ = masked_median(x_safe, fit)
  dev = jnp.abs(x_safe - med[None])
  mad, _, _ = masked_median(dev, fit)
  n = jnp.maximum(jnp.sum(fit), 1).astype(jnp.float32)
  mean_ad = jnp.sum(jnp.where(fit[:, None], dev, 0.0), axis=0) / n
  scale = jnp.where(mad > 0, 1.4826 * mad, 1.2533 * mean_ad)
  z = jnp.where(scale > 0, dev / jnp.where(scale > 0, scale, 1.0), jnp.where(dev > 0, jnp.inf, 0.0))
  z = jnp.where(jnp.any(fit), z, 0.0)
  scores = jnp.where(finite, jnp.max(z, axis=1), jnp.inf)
  return scores, (scores > threshold) | ~finite


# Detector name -> pure detector function (see the module docstring).
DETECTORS: dict[str, Callable[..., tuple[jax.Array, jax.Array]]] = {
  "isolation_forest": isolation_forest,
  "robust_zscore": robust_zscore,
}


def _check_detector_kwargs(name: str, kwargs: dict[str, Any]) -> Callable[..., Any]:
  if name not in DETECTORS:
    raise ValueError(f"aggregation.kwargs.detector={name!r} is not known; accepted: {sorted(DETECTORS)}.")
  fn = DETECTORS[name]
  params = inspect.signature(fn).parameters
  for k in kwargs:
    if k not in params or k in ("x", "fit", "key"):
      allowed = [p for p in params if p not in ("x", "fit", "key")]
      raise ValueError(f"aggregation.kwargs.{k}: not a parameter of detector {name!r}; accepted: {allowed}.")
  for k in ("num_trees", "max_samples"):
    v = kwargs.get(k, 1)
    if not isinstance(v, numbers.Integral) or v < 1:
      raise ValueError(f"aggregation.kwargs.{k}={v!r}: must be an integer >= 1.")
  v = kwargs.get("max_depth")
  if v is not None and (not isinstance(v, numbers.Integral) or v < 1):
    raise ValueError(f"aggregation.kwargs.max_depth={v!r}: must be None or an integer >= 1.")
  if "threshold" in kwargs:  # May be traced (a packed sweep point's own: aggregation/choice.py).
    kwargs = {**kwargs, "threshold": check_real("threshold", kwargs["threshold"], "a finite number", lambda v: True)}
  return functools.partial(fn, **kwargs)


def detect(
  detector: str = "isolation_forest",
  features: tuple[str, ...] | str = ("g_loss",),
  abs_features: bool = True,
  **detector_kwargs: Any,
) -> Stage:
  """Stage: scores clients on columns of ``client_stats`` and flags outliers.

  Builds ``x[C, F]`` from ``client_stats[f]`` for ``f`` in ``features``
  (absolute values when ``abs_features``: the paper uses |generator loss|),
  fits the detector on the valid clients with finite features, and writes
  ``client_stats['flagged']`` and ``client_stats['anomaly_score']`` for later
  stages. Weights are not changed.

  Args:
    detector: a ``DETECTORS`` name.
    features: ``client_stats`` keys (e.g. ``g_loss``, ``d_loss``,
      ``update_norm``, ``cosine_to_mean``, ``dist_to_median``).
    abs_features: take ``abs`` of the features first.
    **detector_kwargs: the detector's hyperparameters.

  Returns:
    A stateless ``Stage``; diagnostics ``flagged`` and ``scores``.

  Raises:
    ValueError: unknown detector, bad kwargs, or empty ``features``.
  """
  if isinstance(features, str):
    features = (features,)
  features = tuple(features)
  if not features or not all(isinstance(f, str) for f in features):
    raise ValueError(f"aggregation.kwargs.features={features!r}: must be a non-empty tuple of client_stats keys.")
  fn = _check_detector_kwargs(detector, detector_kwargs)

  def update(state, global_params, client_params, client_stats, key):
    del global_params
    missing = [f for f in features if f not in client_stats]
    if missing:
      raise ValueError(
        f"aggregation.kwargs.features: {missing} not in client_stats (available: {sorted(client_stats)})."
      )
    x = jnp.stack([jnp.asarray(client_stats[f], jnp.float32) for f in features], axis=1)
    if abs_features:
      x = jnp.abs(x)
    valid, _ = valid_mask(client_params, client_stats)
    scores, flagged = fn(x, valid, key)
    stats = {**client_stats, "flagged": flagged, "anomaly_score": scores}
    return client_params, stats, state, {"flagged": flagged, "scores": scores}

  return Stage(stateless_init, update)


class DecayState(NamedTuple):
  """State of ``decay_flagged``."""

  round: jax.Array  # int32[]: rounds aggregated so far.
  times_flagged: jax.Array  # int32[C]: rounds (after warm-up) each client was flagged and acted on.
  # f32[C]: each client's weight factor (persistent mode), normalised so the largest is 1 (see decay_flagged).
  factor: jax.Array


def check_num_clients(num_clients: Any, rule: str) -> int:
  if num_clients is None:
    raise ValueError(
      f"aggregation.kwargs.num_clients: required by {rule!r} (its state holds a [C] "
      "array); pass num_clients=C to aggregation.get()."
    )
  if not isinstance(num_clients, numbers.Integral) or num_clients < 1:
    raise ValueError(f"aggregation.kwargs.num_clients={num_clients!r}: must be an integer >= 1.")
  return int(num_clients)


def decay_flagged(
  decay: float = 0.9,
  warmup_rounds: int = 10,
  block_after: int | None = None,
  num_clients: int | None = None,
  mode: str = "persistent",
) -> Stage:
  """Stage: decays the aggregation weight of flagged clients (the paper's defense 1).

  Reads ``client_stats['flagged']`` (a ``detect`` stage must come first) and
  rescales ``client_stats['num_examples']``. In round ``r`` (0-based,
  ``r = state.round``), as the paper's code does:

  1. the flags are acted on iff ``r > warmup_rounds`` (the code's
     ``epoch > warmup``: with 10, from round index 11 on) and fewer than
     ``n_valid // 2`` of the valid clients are flagged (the code's
     ``len(flagged) < C // 2``);
  2. if acted on, ``times_flagged += 1`` for each flagged client *first*;
  3. ``mode='persistent'`` (the paper's code): each such client's weight
     factor is multiplied by ``decay ** times_flagged`` and *kept*: the factor
     is the product of all its decays so far, so a client never regains weight
     by not being flagged (the code multiplies its float64 weight list in place
     and renormalises it every round). That product is
     ``decay ** (T (T + 1) / 2)`` for a client acted on ``T`` times, so it is
     computed from ``times_flagged`` relative to the least-flagged client's
     (integer exponents, the largest factor is 1): a running float32 product
     underflows (below float32's range after ~40 flags: with one client
     flagged per round, every weight was exactly 0 at round 197 and the global
     model stopped moving), this never does, and a client whose weight is
     negligible now regains the lead when the others are decayed below it, as
     in the code's float64 replay. ``mode='per_round'``: only this round's
     flagged clients get ``decay ** times_flagged``, the others their full count;
  4. with ``block_after=k``: clients with ``times_flagged >= k`` get count 0
     (blocked) in this and every later round;
  5. ``round += 1``.

  The reduction renormalizes: with ``mean``, client ``i`` gets
  ``n_i f_i / sum_j n_j f_j`` over valid clients (``n`` = 1 with
  ``aggregation.weighting='uniform'``, the paper's 1/C start).

  Args:
    decay: factor in ``(0, 1]``.
    warmup_rounds: flags are acted on from round index ``warmup_rounds + 1`` (>= 0).
    block_after: None, or flagged rounds (>= 1) after which a client is blocked.
    num_clients: C (required: the state holds ``[C]`` arrays).
    mode: ``'persistent'`` (default, the paper's code) or ``'per_round'``.

  Returns:
    A ``Stage`` with ``DecayState``; diagnostics ``times_flagged``,
    ``blocked``, ``decay_active``, ``decay_factor``.

  Raises:
    ValueError: a hyperparameter out of range or ``num_clients`` missing.
  """
  decay = check_real("decay", decay, "in (0, 1]", lambda v: 0.0 < v <= 1.0)  # May be traced (aggregation/choice.py).
  if not isinstance(warmup_rounds, numbers.Integral) or warmup_rounds < 0:
    raise ValueError(f"aggregation.kwargs.warmup_rounds={warmup_rounds!r}: must be an integer >= 0.")
  if block_after is not None and (not isinstance(block_after, numbers.Integral) or block_after < 1):
    raise ValueError(f"aggregation.kwargs.block_after={block_after!r}: must be None or an integer >= 1.")
  if mode not in ("persistent", "per_round"):
    raise ValueError(f"aggregation.kwargs.mode={mode!r}: accepted 'persistent', 'per_round'.")
  c = check_num_clients(num_clients, "decay")

  def init(global_params):
    del global_params
    return DecayState(
      round=jnp.zeros((), jnp.int32), times_flagged=jnp.zeros((c,), jnp.int32), factor=jnp.ones((c,), jnp.float32)
    )

  def update(state, global_params, client_params, client_stats, key):
    del global_params, key
    if "flagged" not in client_stats:
      raise ValueError(
        "aggregation: the 'decay' stage needs a 'detect' stage before it (client_stats['flagged'] is missing)."
      )
    if state.times_flagged.shape != (client_stats["num_examples"].shape[0],):
      raise ValueError(
        f"aggregation.kwargs.num_clients={c} does not match the client axis "
        f"of size {client_stats['num_examples'].shape[0]}."
      )
    valid, _ = valid_mask(client_params, client_stats)
    flagged = client_stats["flagged"] & valid
    active = (state.round > warmup_rounds) & (jnp.sum(flagged) < jnp.sum(valid) // 2)
    hit = active & flagged
    times = state.times_flagged + hit.astype(jnp.int32)
    this_round = jnp.where(hit, jnp.power(jnp.float32(decay), times.astype(jnp.float32)), 1.0)
    # Persistent: decay ** (T (T + 1) / 2) relative to the least-flagged client; exact integer exponents.
    exponent = times * (times + 1) // 2
    kept = jnp.power(jnp.float32(decay), (exponent - jnp.min(exponent)).astype(jnp.float32))
    factor = kept if mode == "persistent" else this_round
    blocked = (times >= block_after) if block_after is not None else jnp.zeros(times.shape, bool)
    counts = jnp.asarray(client_stats["num_examples"], jnp.float32) * factor
    counts = jnp.where(blocked, 0.0, counts)
    stats = {**client_stats, "num_examples": counts}
    new_state = DecayState(round=state.round + 1, times_flagged=times, factor=kept)
    diagnostics = {"times_flagged": times, "blocked": blocked, "decay_active": active, "decay_factor": factor}
    return client_params, stats, new_state, diagnostics

  # times_flagged and factor are each client's (gathered and scattered when clients are sampled); round is global.
  return Stage(init, update, DecayState(round=False, times_flagged=True, factor=True))
