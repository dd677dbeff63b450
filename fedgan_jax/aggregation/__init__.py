"""Server aggregation rules as pure functions over the client axis.

An aggregation rule is a factory returning ``Aggregator(init, aggregate)``
(``base``); rules are looked up by name in the explicit registry
``AGGREGATORS`` with ``get(name, **kwargs)``, and a rule living outside the
package is named ``'module:factory'`` (``registry``). Stages for ``chain`` are
in ``STAGES``, detectors in ``DETECTORS``. Modules: ``base`` (the contract,
shared helpers, FedAvg), ``robust`` (median, trimmed mean, Krum, geometric
median), ``backdoor`` (RLR, FLAME, FoolsGold), ``alpha_detect`` (a detector at a
false-alarm rate the user sets, with weights that recover), ``byzantine`` (Centered
Clipping, DnC, Bulyan), ``fltrust`` (trust from the server's own update on a clean root
set), ``compose`` (stages and ``chain`` of built elements), ``detectors``
(Isolation Forest, robust z-score, the detect and decay stages), ``privacy``
(DP-FedAvg's clipped, noised mean), ``stats``
(server statistics of the uploads), ``registry`` (names), ``choice`` (several
rules, and rules with traced hyperparameters, in one program: ``one_of``, for
packed sweep points).

A rule with state per client (FoolsGold's history, the detection's
``times_flagged``, ``alpha_detect``'s levels) declares it in
``Aggregator.client_axes`` (a ``Stage`` in ``Stage.client_axes``; ``chain``
collects them): a prefix of its state's pytree, True where the leaves have a
row per client. When only m of the C clients take part in a round
(``config.clients_per_round``) the round gathers those rows for the m
(``gather_state``), the rule aggregates the m uploads as if they were all
the clients, and the new rows are scattered back into their clients' slots
(``scatter_state``); the other clients' rows are untouched. ``base``'s
docstring states the contract; a contract test runs every registered rule
this way.
"""

from __future__ import annotations

from fedgan_jax.aggregation.alpha_detect import alpha_detect, alpha_test, recovering_weights
from fedgan_jax.aggregation.backdoor import flame, foolsgold, rlr
from fedgan_jax.aggregation.base import (
  Aggregator,
  EmptyState,
  check_client_axes,
  finite_mask,
  gather_state,
  mean,
  normalize,
  scatter_state,
  stateless_init,
  valid_mask,
  weighted_average,
)
from fedgan_jax.aggregation.byzantine import bulyan, centered_clip, dnc
from fedgan_jax.aggregation.choice import TRACEABLE_KWARGS, one_of
from fedgan_jax.aggregation.compose import Stage, clip_updates
from fedgan_jax.aggregation.detectors import (
  DETECTORS,
  DecayState,
  decay_flagged,
  detect,
  isolation_forest,
  robust_zscore,
)
from fedgan_jax.aggregation.fltrust import SERVER_MODEL, fltrust
from fedgan_jax.aggregation.privacy import dp_mean
from fedgan_jax.aggregation.registry import AGGREGATORS, STAGES, chain, detect_and_decay, get, norm_clip
from fedgan_jax.aggregation.robust import geometric_median, krum, median, multi_krum, trimmed_mean
from fedgan_jax.aggregation.stats import server_stats

__all__ = [
  "alpha_detect",
  "alpha_test",
  "recovering_weights",
  "Aggregator",
  "AGGREGATORS",
  "DecayState",
  "DETECTORS",
  "EmptyState",
  "Stage",
  "STAGES",
  "TRACEABLE_KWARGS",
  "bulyan",
  "one_of",
  "centered_clip",
  "chain",
  "check_client_axes",
  "clip_updates",
  "decay_flagged",
  "detect",
  "detect_and_decay",
  "dnc",
  "dp_mean",
  "finite_mask",
  "flame",
  "fltrust",
  "gather_state",
  "foolsgold",
  "geometric_median",
  "get",
  "isolation_forest",
  "krum",
  "mean",
  "median",
  "multi_krum",
  "norm_clip",
  "normalize",
  "rlr",
  "robust_zscore",
  "scatter_state",
  "SERVER_MODEL",
  "server_stats",
  "stateless_init",
  "trimmed_mean",
  "valid_mask",
  "weighted_average",
]
