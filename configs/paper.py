"""The paper's four settings on the default dataset (Jin & Li 2022, Table 1 / Fig. 3).

Select one with ``--config configs/paper.py:<setting>``:

* ``attack``: one malicious client (0 of 4), no defense (= configs/default.py).
* ``detect``: + global malicious detection: an Isolation Forest on the clients'
  |generator loss| each round after 10 warm-up rounds; if fewer than half the
  clients are flagged, each flagged client's weight is multiplied by
  0.9 ** times_flagged and the weights are renormalized.
* ``gp``: + local training regularization: WGAN-GP (lambda = 10) with an
  InstanceNorm discriminator and RMSprop, as in the paper's code.
* ``both``: detection + gradient penalty (the paper's robust setting).

    python -m fedgan_jax.main --config configs/paper.py:both --workdir runs/paper_both

Each runs the default's 200 rounds at 32 px (minutes on a laptop CPU; see README).
"""

from fedgan_jax import config_lib

SETTINGS = ("attack", "detect", "gp", "both")


def apply_detection(config):
  """The paper's defense 1 (FedDetect: ``block_after`` to block repeat offenders)."""
  config.aggregation.name = "detect"
  config.aggregation.kwargs.detector = "isolation_forest"
  config.aggregation.kwargs.features = ("g_loss",)
  config.aggregation.kwargs.warmup_rounds = 10
  config.aggregation.kwargs.decay = 0.9
  return config


def apply_gradient_penalty(config):
  """The paper's defense 2: WGAN-GP local training."""
  config.train.loss = "wgan"
  config.train.regularizers.gradient_penalty = 10.0
  config.model.d_norm = "instance"
  config.train.optimizer = "rmsprop"
  config.train.g_lr = 1e-4
  config.train.d_lr = 1e-4
  return config


def get_config(setting: str = "attack"):
  if setting not in SETTINGS:
    raise ValueError(f"configs/paper.py:{setting}: unknown setting; accepted: {SETTINGS}.")
  config = config_lib.base_config()
  if setting in ("detect", "both"):
    apply_detection(config)
  if setting in ("gp", "both"):
    apply_gradient_penalty(config)
  return config
