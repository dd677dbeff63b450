"""Evaluation metrics: fidelity of generated images and backdoor success.

* :mod:`~fedgan_jax.metrics.fidelity` -- Fréchet distance (contract:
  ``frechet_distance(features_a, features_b) -> float``), KID, improved
  precision/recall.
* :mod:`~fedgan_jax.metrics.swd` -- PGGAN's sliced Wasserstein distance on
  image patches (host NumPy, or jitted on accelerators).
* :mod:`~fedgan_jax.metrics.detection` -- detection rates of flagged clients
  against the ground truth (outside the aggregators).
* :mod:`~fedgan_jax.metrics.extractors` -- named feature extractors
  (``effnet_lite0`` default, ``inception_v3``) in Flax, with torch-free weight
  loading (:mod:`~fedgan_jax.metrics.torch_pickle`).
* :mod:`~fedgan_jax.metrics.trigger` -- the implant: per-image amplitude of the
  trigger (0 = none, 1 = pasted), generated minus clean with a bootstrap CI,
  the above-clean-p99 fraction with its out-of-sample false-positive rate.
* :mod:`~fedgan_jax.metrics.diversity` -- spread of generated images relative
  to real ones (mode collapse), with no feature network.

Importing this package does not load any weights. (``metrics.diversity`` is the
module; its function is ``metrics.diversity.diversity``.)
"""

from fedgan_jax.metrics.extractors import EXTRACTORS, Extractor, get_extractor
from fedgan_jax.metrics.fidelity import (
  feature_stats,
  frechet_distance,
  frechet_distance_from_stats,
  kid,
  precision_recall,
)
from fedgan_jax.metrics.swd import SlicedWasserstein, SwdReference, sliced_wasserstein, swd_reference
from fedgan_jax.metrics.trigger import (
  Exceedance,
  exceedance_threshold,
  implant_amplitude,
  implant_summary,
  trigger_scores,
)

__all__ = [
  "EXTRACTORS",
  "Extractor",
  "SlicedWasserstein",
  "SwdReference",
  "Exceedance",
  "exceedance_threshold",
  "feature_stats",
  "frechet_distance",
  "frechet_distance_from_stats",
  "get_extractor",
  "kid",
  "precision_recall",
  "sliced_wasserstein",
  "swd_reference",
  "implant_amplitude",
  "implant_summary",
  "trigger_scores",
]
