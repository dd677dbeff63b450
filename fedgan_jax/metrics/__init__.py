"""Evaluation metrics (DESIGN §5): fidelity of generated images and backdoor success.

* :mod:`~fedgan_jax.metrics.fidelity` -- Fréchet distance (contract:
  ``frechet_distance(features_a, features_b) -> float``), KID, improved
  precision/recall, PGGAN sliced Wasserstein distance.
* :mod:`~fedgan_jax.metrics.extractors` -- named feature extractors
  (``effnet_lite0`` default, ``inception_v3``) in Flax, with torch-free weight
  loading (:mod:`~fedgan_jax.metrics.torch_pickle`).
* :mod:`~fedgan_jax.metrics.trigger` -- trigger correlation/strength, threshold
  calibration on clean images, ``eval/trigger_rate`` and ``eval/trigger_strength``.

Importing this package does not load any weights.
"""

from fedgan_jax.metrics.extractors import EXTRACTORS, Extractor, get_extractor
from fedgan_jax.metrics.fidelity import (
    SlicedWasserstein,
    feature_stats,
    frechet_distance,
    frechet_distance_from_stats,
    kid,
    precision_recall,
    sliced_wasserstein,
)
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
    "calibrate_threshold",
    "feature_stats",
    "frechet_distance",
    "frechet_distance_from_stats",
    "get_extractor",
    "kid",
    "precision_recall",
    "sliced_wasserstein",
    "trigger_rate",
    "trigger_scores",
    "trigger_strength",
]
