"""The paper's two defenses as its code runs them, as dotted config overrides.

Shared by the configs that run the paper's settings (``configs/paper.py``,
``configs/paper_full.py``, the sweeps ``configs/paper_sweep.py`` and
``configs/results.py``), so "as the paper's code does it" is written once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedgan_jax import config_lib

# Defense 1, global malicious detection (Jin & Li's scripts/vanilla.py): an Isolation Forest on each
# client's |G loss of its last local batch|, refit every round; acted on from round index 11 on
# (``epoch > warmup`` with warmup 10) when fewer than C // 2 clients are flagged; each flagged client's
# weight is multiplied by 0.9 ** times_flagged and kept.
DETECTION: dict[str, Any] = {
  "aggregation.name": "detect",
  "aggregation.kwargs.detector": "isolation_forest",
  "aggregation.kwargs.features": ("g_loss_last",),
  "aggregation.kwargs.warmup_rounds": 10,
  "aggregation.kwargs.decay": 0.9,
  "aggregation.kwargs.mode": "persistent",
}

# Defense 2, local training regularization (scripts/gp.py): WGAN loss with gradient penalty 10 and the
# code's N(0, 1) interpolation coefficient, InstanceNorm (affine) in D after every conv including the first
# (the code's critic; its BCE D has no norm after the first conv), RMSprop with PyTorch's semantics.
GRADIENT_PENALTY: dict[str, Any] = {
  "train.loss": "wgan",
  "train.regularizers.gradient_penalty": 10.0,
  "train.gp_interpolation": "normal",
  "model.d_norm": "instance",
  "model.d_norm_first": True,
  "train.optimizer": "rmsprop",
  "train.rmsprop": "pytorch",
}


def apply(config, overrides: Mapping[str, Any]):
  """Sets every ``{dotted field: value}`` of ``overrides`` on ``config``; returns it."""
  for dotted, value in overrides.items():
    config_lib.set_field(config, dotted, value)
  return config
