"""A detector with a user-set false-alarm rate, and weights that recover.

The detection defense of Jin & Li (SASHIMI 2022; ``detectors.detect`` +
``detectors.decay_flagged``) has no error-rate control: on a benign run its
Isolation Forest flags someone in most rounds and its persistent decay hands
one honest hospital most of the weight (docs/results.md). This module builds
the same pipeline from two replaceable stages:

- ``alpha_test``: a per-round, per-feature leave-one-out prediction-interval
  test at level ``alpha`` (Student t, exact under the null below);
- ``recovering_weights``: each flag (after a warm-up) halves a client's weight
  (``decay``), each unflagged round gives it back, so a client that stops
  being flagged regains its full weight after as many clean rounds as it had
  net flags (``recovery`` levels per clean round, optionally capped by
  ``max_level``);

and ``alpha_detect`` chains them into a reduction, as
``registry.detect_and_decay`` does for the paper's rule.

The test. For a feature (``abs`` of a ``client_stats`` column by default, as
``detect``) and client ``i``, with ``m`` and ``s`` the mean and sample
standard deviation of the ``k`` other *fit* clients (valid clients with finite
features; ``k = n - 1`` for a fit client, ``k = n`` for one outside the fit)::

    T_i = (x_i - m) / (s * sqrt(1 + 1/k))

Null hypothesis: in the round, the feature values of the fit clients and of
client ``i`` are independent draws from one normal distribution (any mean and
variance, which may change from round to round). Then ``x_i - m`` is
``N(0, sigma^2 (1 + 1/k))`` independent of ``s^2 ~ sigma^2 chi2_{k-1}/(k-1)``,
so ``T_i`` is Student t with ``k - 1`` degrees of freedom *exactly*, for every
``k >= 2``; client ``i`` is flagged when ``|T_i| > t_{1 - alpha'/2, k-1}``.
With ``F`` features, ``alpha' = alpha / F`` (Bonferroni), so the probability
that a client satisfying the null is flagged in a round is ``<= alpha``
(``= alpha`` for one feature). Caveats, stated plainly:

- the guarantee is per client and per round; the chance that *some* of C
  clients is flagged in a round is up to ``C * alpha`` (use ``alpha / C`` for a
  per-round family-wise rate), and flags of different clients in one round are
  dependent (they share the sample);
- it holds only as far as the null does. Heavy-tailed features, or hospitals
  whose losses differ systematically (non-IID data, different dataset sizes),
  are flagged more often than ``alpha``; ``recovering_weights`` then lowers,
  but does not remove, such a hospital's weight while it is flagged. The
  ``abs`` of a feature that changes sign is not normal;
- power is low with few clients: with C = 4 (``k - 1 = 2`` dof) the critical
  value at ``alpha = 0.01`` is 9.92, so an outlier is flagged only when it is
  more than ``9.92 * sqrt(4/3) = 11.5`` sample standard deviations of the
  other three from their mean; two colluding outliers inflate each other's
  leave-one-out ``s`` (masking).

Critical values are computed in Python (float64, a continued fraction for the
regularized incomplete beta function and bisection; no scipy) at trace time,
for every possible number of degrees of freedom given the static client axis
C, and indexed in the graph by the traced ``k - 1``. With fewer than 3 fit
clients nobody is tested. As in ``detect``, a client whose feature is NaN or
Inf is flagged (score ``inf``) and left out of the others' statistics; a
client with a non-finite upload or ``num_examples <= 0`` is left out of the
statistics but still tested against them (its weight is 0 in any case).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedgan_jax.aggregation.base import Aggregator, stateless_init, valid_mask
from fedgan_jax.aggregation.compose import Stage
from fedgan_jax.aggregation.detectors import check_num_clients

# ---------------------------------------------------------------- Student t


def _betacf(a: float, b: float, x: float) -> float:
  """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
  tiny, eps = 1e-300, 1e-16
  qab, qap, qam = a + b, a + 1.0, a - 1.0
  c, d = 1.0, 1.0 - qab * x / qap
  d = 1.0 / (d if abs(d) > tiny else tiny)
  h = d
  for m in range(1, 10_000):
    m2 = 2 * m
    for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
      d = 1.0 + aa * d
      d = 1.0 / (d if abs(d) > tiny else tiny)
      c = 1.0 + aa / c
      c = c if abs(c) > tiny else tiny
      h *= d * c
    if abs(d * c - 1.0) < eps:
      break
  return h


def _betainc(a: float, b: float, x: float, y: float) -> float:
  """Regularized incomplete beta ``I_x(a, b)`` with ``y = 1 - x`` given separately (no cancellation)."""
  if x <= 0.0:
    return 0.0
  if y <= 0.0:
    return 1.0
  log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y)
  if x < (a + 1.0) / (a + b + 2.0):
    return math.exp(log_front) * _betacf(a, b, x) / a
  return 1.0 - math.exp(log_front) * _betacf(b, a, y) / b


def t_two_sided_pvalue(t: float, dof: int) -> float:
  """``P(|T| > t)`` for Student t with ``dof`` degrees of freedom (float64, no scipy)."""
  t2 = float(t) * float(t)
  return _betainc(0.5 * dof, 0.5, dof / (dof + t2), t2 / (dof + t2))


def t_critical(alpha: float, dof: int) -> float:
  """Two-sided critical value ``t_{1 - alpha/2, dof}``: ``P(|T| > t) = alpha``.

  Bisection on ``log t`` over ``[1e-12, 1e160]`` (the two-sided p-value is
  decreasing in ``t``) to float64 precision; agrees with
  ``scipy.stats.t.ppf(1 - alpha / 2, dof)`` to ~1e-12 relative.

  Args:
    alpha: in ``(0, 1)``.
    dof: degrees of freedom, >= 1.

  Returns:
    The critical value (float).
  """
  lo, hi = math.log(1e-12), math.log(1e160)
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    if mid in (lo, hi):
      break
    if t_two_sided_pvalue(math.exp(mid), dof) > alpha:
      lo = mid
    else:
      hi = mid
  return math.exp(0.5 * (lo + hi))


@functools.cache
def critical_table(alpha: float, num_clients: int) -> np.ndarray:
  """``f32[C + 1]``: ``t_critical(alpha, d)`` at index ``d = 1 .. C - 1``; ``inf`` at 0 and C (never flags)."""
  table = np.full(num_clients + 1, np.inf)
  for d in range(1, num_clients):
    table[d] = t_critical(alpha, d)
  return table.astype(np.float32)


# ------------------------------------------------------------ the statistic


def leave_one_out_t(x: jax.Array, fit: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Leave-one-out prediction-interval statistics of every row against the ``fit`` rows.

  For row ``i``, over the ``k_i`` fit rows other than ``i`` with mean ``m``
  and sample standard deviation ``s`` (divisor ``k_i - 1``):
  ``T = (x_i - m) / (s * sqrt(1 + 1/k_i))``, Student t with ``k_i - 1`` dof
  when the rows are i.i.d. normal. Computed with an explicit ``[C, C]`` mask
  and two passes (no sum-of-squares cancellation, no matmul precision
  loss on accelerators). When ``s = 0``: ``T = ±inf`` if ``x_i != m``, else 0.

  Args:
    x: ``f32[C, F]`` features; rows outside ``fit`` may be non-finite.
    fit: ``bool[C]`` rows the statistics are taken over (must have finite ``x``).

  Returns:
    ``(T f32[C, F], dof int32[C])`` with ``dof = k_i - 1``; ``T`` is 0 where
    ``k_i < 2`` or ``x_i`` is non-finite (the caller masks those rows).
  """
  x = jnp.asarray(x, jnp.float32)
  c = x.shape[0]
  finite = jnp.all(jnp.isfinite(x), axis=1)
  fit = fit & finite
  x_safe = jnp.where(finite[:, None], x, 0.0)
  n = jnp.sum(fit).astype(jnp.float32)
  center = jnp.sum(jnp.where(fit[:, None], x_safe, 0.0), axis=0) / jnp.maximum(n, 1.0)
  xc = x_safe - center[None]  # Centering first keeps float32 accurate for features far from 0.
  others = (fit[None, :] & ~jnp.eye(c, dtype=bool)).astype(jnp.float32)  # [i, j]: j counts for i.
  k = jnp.sum(others, axis=1)
  m = jnp.sum(others[:, :, None] * xc[None], axis=1) / jnp.maximum(k, 1.0)[:, None]
  ss = jnp.sum(others[:, :, None] * jnp.square(xc[None] - m[:, None, :]), axis=1)
  s = jnp.sqrt(ss / jnp.maximum(k - 1.0, 1.0)[:, None])
  num = xc - m
  den = s * jnp.sqrt(1.0 + 1.0 / jnp.maximum(k, 1.0))[:, None]
  t = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.where(num != 0, jnp.sign(num) * jnp.inf, 0.0))
  t = jnp.where((k >= 2)[:, None] & finite[:, None], t, 0.0)
  return t, (k - 1.0).astype(jnp.int32)


# ------------------------------------------------------------------ checks


def _check_real(name: str, v: Any, lo: float, hi: float, lo_open: bool, hi_open: bool) -> float:
  ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
  ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
  if not ok:
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    raise ValueError(f"aggregation.kwargs.{name}={v!r}: must be a number in {interval}.")
  return float(v)


def _check_int(name: str, v: Any, lo: int, allow_none: bool = False) -> int | None:
  if v is None and allow_none:
    return None
  if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < lo:
    raise ValueError(f"aggregation.kwargs.{name}={v!r}: must be {'None or ' if allow_none else ''}an integer >= {lo}.")
  return int(v)


def _check_features(features: Any) -> tuple[str, ...]:
  if isinstance(features, str):
    features = (features,)
  try:
    features = tuple(features)
  except TypeError:
    features = ()
  if not features or not all(isinstance(f, str) for f in features):
    raise ValueError(f"aggregation.kwargs.features={features!r}: must be a non-empty tuple of client_stats keys.")
  return features


# ------------------------------------------------------------------ stages


def alpha_test(
  alpha: float = 0.01,
  features: tuple[str, ...] | str = ("g_loss",),
  abs_features: bool = True,
) -> Stage:
  """Stage: flags clients by a leave-one-out t test at level ``alpha`` (see the module docstring).

  Builds ``x[C, F]`` from ``client_stats[f]`` for ``f`` in ``features`` (``abs``
  when ``abs_features``, as ``detect``), tests every client on every feature
  at level ``alpha / F`` against the other valid clients with finite features,
  and flags it if any feature rejects. Under the module's null a client is
  flagged with probability ``<= alpha`` per round (``= alpha`` for one
  feature). Stateless: it reports its verdict every round (warm-up is the job
  of the weighting stage, as in ``detect``). Writes ``client_stats['flagged']``
  and ``client_stats['anomaly_score']`` for later stages; weights unchanged.

  Args:
    alpha: per-client, per-round false-alarm rate under the null, in ``(0, 1)``.
    features: ``client_stats`` keys (e.g. ``g_loss``, ``update_norm``).
    abs_features: take ``abs`` of the features first.

  Returns:
    A stateless ``Stage``; diagnostics ``flagged``, ``scores`` (``max_f |T_f|``,
    ``inf`` for a non-finite feature, 0 when untested) and ``critical_value``
    (``f32[C]``, the threshold each client's ``|T|`` was compared with; ``inf``
    when untested).

  Raises:
    ValueError: a hyperparameter out of range.
  """
  alpha = _check_real("alpha", alpha, 0.0, 1.0, True, True)
  features = _check_features(features)
  if not isinstance(abs_features, (bool, np.bool_)):
    raise ValueError(f"aggregation.kwargs.abs_features={abs_features!r}: must be a bool.")
  per_feature_alpha = alpha / len(features)

  def update(state, global_params, client_params, client_stats, key):
    del global_params, key
    missing = [f for f in features if f not in client_stats]
    if missing:
      raise ValueError(
        f"aggregation.kwargs.features: {missing} not in client_stats (available: {sorted(client_stats)})."
      )
    x = jnp.stack([jnp.asarray(client_stats[f], jnp.float32) for f in features], axis=1)
    if abs_features:
      x = jnp.abs(x)
    c = x.shape[0]
    valid, _ = valid_mask(client_params, client_stats)
    finite = jnp.all(jnp.isfinite(x), axis=1)
    fit = valid & finite
    t, dof = leave_one_out_t(x, fit)
    table = jnp.asarray(critical_table(per_feature_alpha, c))
    tested = finite & (jnp.sum(fit) >= 3) & (dof >= 1)
    crit = jnp.where(tested, table[jnp.clip(dof, 0, c)], jnp.inf)
    score = jnp.max(jnp.abs(t), axis=1)
    flagged = (tested & (score > crit)) | ~finite
    scores = jnp.where(finite, jnp.where(tested, score, 0.0), jnp.inf)
    stats = {**client_stats, "flagged": flagged, "anomaly_score": scores}
    return client_params, stats, state, {"flagged": flagged, "scores": scores, "critical_value": crit}

  return Stage(stateless_init, update)


class RecoveryState(NamedTuple):
  """State of ``recovering_weights``."""

  round: jax.Array  # int32[]: rounds aggregated so far.
  level: jax.Array  # int32[C]: each client's decay level; its weight factor is decay ** level.


def recovering_weights(
  decay: float = 0.5,
  recovery: int = 1,
  warmup_rounds: int = 10,
  max_level: int | None = None,
  num_clients: int | None = None,
) -> Stage:
  """Stage: flagged clients lose weight, unflagged clients win it back.

  Reads ``client_stats['flagged']`` (a detector stage must come first) and
  rescales ``client_stats['num_examples']``, the mechanism of
  ``decay_flagged``. Each client has an integer level ``L`` (0 at the start);
  its weight factor is ``decay ** L``. In round ``r`` (0-based), for the valid
  clients (finite upload, ``num_examples > 0``), from round index
  ``warmup_rounds + 1`` on (``r > warmup_rounds``, as ``decay_flagged``):

  - flagged: ``L += 1`` (the factor is multiplied by ``decay``);
  - not flagged: ``L = max(0, L - recovery)`` (the factor is divided by
    ``decay ** recovery``, capped at 1: ``m = min(1, m / decay ** recovery)``);
  - with ``max_level``: ``L = min(L, max_level)``.

  A client absent from the round (invalid) keeps its level. The level is
  updated first and acts in the same round. So a client flagged in ``T``
  rounds in a row (from level 0) has factor ``decay ** T`` and is back to
  factor 1 after ``ceil(T / recovery)`` unflagged rounds (at most
  ``ceil(max_level / recovery)`` with a cap), unlike ``decay_flagged``'s
  persistent decay, which never gives weight back. The factors are taken
  relative to the lowest level among the valid clients (exact integer
  exponents), so they never all underflow to 0. The reduction renormalizes:
  with ``mean`` client ``i`` gets ``n_i f_i / sum_j n_j f_j``.

  Args:
    decay: factor per flag, in ``(0, 1]``.
    recovery: levels regained per unflagged round, an integer >= 1.
    warmup_rounds: flags are acted on from round index ``warmup_rounds + 1`` (>= 0).
    max_level: None, or the cap on a level (>= 1): bounds both the weight
      loss (``decay ** max_level``) and the recovery time.
    num_clients: C (required: the state holds ``[C]`` arrays).

  Returns:
    A ``Stage`` with ``RecoveryState``; diagnostics ``flag_level`` (int32[C]),
    ``weight_factor`` (f32[C]) and ``reweight_active`` (bool[]).

  Raises:
    ValueError: a hyperparameter out of range or ``num_clients`` missing.
  """
  decay = _check_real("decay", decay, 0.0, 1.0, True, False)
  recovery = _check_int("recovery", recovery, 1)
  warmup_rounds = _check_int("warmup_rounds", warmup_rounds, 0)
  max_level = _check_int("max_level", max_level, 1, allow_none=True)
  c = check_num_clients(num_clients, "recovering_weights")

  def init(global_params):
    del global_params
    return RecoveryState(round=jnp.zeros((), jnp.int32), level=jnp.zeros((c,), jnp.int32))

  def update(state, global_params, client_params, client_stats, key):
    del global_params, key
    if "flagged" not in client_stats:
      raise ValueError(
        "aggregation: the 'recovering_weights' stage needs a detector stage before it "
        "(client_stats['flagged'] is missing)."
      )
    if state.level.shape != (client_stats["num_examples"].shape[0],):
      raise ValueError(
        f"aggregation.kwargs.num_clients={c} does not match the client axis "
        f"of size {client_stats['num_examples'].shape[0]}."
      )
    valid, _ = valid_mask(client_params, client_stats)
    flagged = jnp.asarray(client_stats["flagged"], bool)
    active = state.round > warmup_rounds
    up = active & valid & flagged
    down = active & valid & ~flagged
    level = jnp.where(up, state.level + 1, jnp.where(down, jnp.maximum(state.level - recovery, 0), state.level))
    if max_level is not None:
      level = jnp.minimum(level, max_level)
    lowest = jnp.where(jnp.any(valid), jnp.min(jnp.where(valid, level, jnp.iinfo(jnp.int32).max)), 0)
    factor = jnp.power(jnp.float32(decay), jnp.maximum(level - lowest, 0).astype(jnp.float32))
    counts = jnp.asarray(client_stats["num_examples"], jnp.float32) * factor
    stats = {**client_stats, "num_examples": counts}
    new_state = RecoveryState(round=state.round + 1, level=level)
    diagnostics = {"flag_level": level, "weight_factor": factor, "reweight_active": active}
    return client_params, stats, new_state, diagnostics

  return Stage(init, update, RecoveryState(round=False, level=True))  # Each client's level is its own.


def alpha_detect(
  alpha: float = 0.01,
  features: tuple[str, ...] | str = ("g_loss",),
  abs_features: bool = True,
  decay: float = 0.5,
  warmup_rounds: int = 10,
  inner: Any = "mean",
  inner_kwargs: dict | None = None,
  num_clients: int | None = None,
  recovery: int = 1,
  max_level: int | None = None,
) -> Aggregator:
  """Detection with a set false-alarm rate and recovering weights.

  ``chain(alpha_test(alpha, features, abs_features), recovering_weights(decay,
  recovery, warmup_rounds, max_level), inner)``, the counterpart of
  ``registry.detect_and_decay``: every round each client is tested at level
  ``alpha`` on ``|client_stats[features]|`` (``flagged`` reports the verdict
  every round, warm-up included); from round index ``warmup_rounds + 1`` on,
  a flag multiplies a client's weight by ``decay`` and an unflagged round
  divides it by ``decay ** recovery`` (up to its full weight); ``inner``
  renormalizes. Under the test's null (module docstring) an honest client is
  flagged in a fraction ``<= alpha`` of the rounds and is at full weight
  except in the few rounds after a false alarm.

  Args:
    alpha: per-client, per-round false-alarm rate, in ``(0, 1)``.
    features: ``client_stats`` keys tested.
    abs_features: take ``abs`` of the features.
    decay: weight factor per flag, in ``(0, 1]``.
    warmup_rounds: flags are acted on from round index ``warmup_rounds + 1``.
    inner: the reduction (registry name or ``Aggregator``).
    inner_kwargs: kwargs of ``inner`` when given by name.
    num_clients: C, required (the state holds ``level: int32[C]``).
    recovery: levels regained per unflagged round (integer >= 1).
    max_level: None, or a cap on the number of net flags remembered.

  Returns:
    The ``Aggregator``; state ``(EmptyState(), RecoveryState, inner_state)``;
    diagnostics ``weights``, ``flagged``, ``scores``, ``critical_value``,
    ``flag_level``, ``weight_factor``, ``reweight_active``, ``nonfinite``
    plus ``inner``'s.
  """
  from fedgan_jax.aggregation import registry  # Lazy: registry may import this module.

  c = check_num_clients(num_clients, "alpha_detect")
  spec = inner if not isinstance(inner, str) else (inner, dict(inner_kwargs or {}))
  return registry.chain(
    alpha_test(alpha, features, abs_features),
    recovering_weights(decay, recovery, warmup_rounds, max_level, c),
    spec,
    num_clients=c,
  )
