"""The paper's four settings at CPU size (Jin & Li, SASHIMI 2022, Table 1 / Fig. 3).

Select one with ``--config configs/paper.py:<setting>``:

* ``attack``: one malicious client (0 of 4), no defense.
* ``detect``: + global malicious detection, as the paper's code does it: an
  Isolation Forest on each client's |G loss of its last local batch|, refit
  every round; from round index 11 on (the code's ``epoch > warmup`` with
  warmup 10), if fewer than C // 2 clients are flagged, each flagged client's
  weight is multiplied by 0.9 ** times_flagged and kept (persistent), and the
  weights are renormalized.
* ``gp``: + local training regularization: WGAN-GP (lambda 10) with an
  InstanceNorm discriminator (a norm after every conv, the first included, as
  the code's critic), RMSprop with PyTorch's semantics, and the code's N(0, 1)
  interpolation coefficient.
* ``both``: detection + gradient penalty (the paper's robust setting).

    python -m fedgan_jax.main --config configs/paper.py:both --workdir runs/paper_both

Kept from the paper's code: the detection rule above, uniform client weights
(1/C), the gradient penalty as the code computes it, RMSprop's semantics,
4 clients with client 0 malicious, batch 32, 200 rounds, the trigger 5/256 of
the side from the bottom-right corner, only generators averaged.

Changed to fit a CPU (``configs/paper_full.py`` has the paper's values):

* DCGAN generator of width 32 instead of StyleGAN2, at 32 px instead of
  256 px: minutes instead of GPU-days;
* 5 local steps per round instead of one local epoch (``train.local_steps=0``);
* each client holds a quarter of 4000 synthetic images (``data.partition``
  iid) instead of reading the whole dataset (``full``, the code's loaders);
* a 4×4 trigger (1.6 % of the image) at full contrast (``attack.trigger_range``
  images) instead of 16×16 on 256×256 (0.39 %) in the code's washed-out [0, 1]
  range: at 32 px the paper's area is 2×2, at the trigger metric's noise floor;
* Adam beta1 0.5 (DCGAN's) instead of PyTorch's default 0.9 for the DCGAN
  generator, and WGAN-GP at learning rate 1e-4 instead of 2e-4: both keep the
  small DCGAN stable at this scale.

Each runs 200 rounds (minutes on a laptop CPU; see README).
"""

from fedgan_jax import config_lib, presets

SETTINGS = ("attack", "detect", "gp", "both")


def get_config(setting: str = "attack"):
  if setting not in SETTINGS:
    raise ValueError(f"configs/paper.py:{setting}: unknown setting; accepted: {SETTINGS}.")
  config = config_lib.base_config()
  config.aggregation.weighting = "uniform"
  if setting in ("detect", "both"):
    presets.apply(config, presets.DETECTION)
  if setting in ("gp", "both"):  # The code's WGAN-GP at learning rate 1e-4 (see above).
    presets.apply(config, {**presets.GRADIENT_PENALTY, "train.g_lr": 1e-4, "train.d_lr": 1e-4})
  return config
