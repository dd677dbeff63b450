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
* :mod:`~fedgan_jax.metrics.trigger` -- trigger correlation/strength, threshold
  calibration on clean images, ``eval/trigger_rate`` and ``eval/trigger_strength``.

Importing this package does not load any weights.
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
  calibrate_threshold,
  trigger_rate,
  trigger_scores,
  trigger_strength,
)

__all__ = [
  "EXTRACTORS",
  "Extractor",
  "SlicedWasserstein",
  "SwdReference",
  "calibrate_threshold",
  "feature_stats",
  "frechet_distance",
  "frechet_distance_from_stats",
  "get_extractor",
  "kid",
  "precision_recall",
  "sliced_wasserstein",
  "swd_reference",
  "trigger_rate",
  "trigger_scores",
  "trigger_strength",
]
