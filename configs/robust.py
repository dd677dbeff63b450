"""The default attack against one robust aggregation rule: ``configs/robust.py:<rule>``.

Rules (each a pure function over the client axis, ``fedgan_jax.aggregation``):
``median`` and ``trimmed_mean`` (Yin et al. 2018), ``krum`` and ``multi_krum``
(Blanchard et al. 2017), ``geometric_median`` (RFA, Pillutla et al. 2022),
``norm_clip`` (update clipping before the mean), ``detect_zscore`` (robust
z-score detection with decay), ``detect_block`` (Isolation Forest detection
on loss and update statistics that blocks a client flagged in 3 acted-on
rounds). The backdoor defenses ``rlr`` (Ozdayi et al. 2021), ``flame``
(Nguyen et al. 2022), ``foolsgold`` (Fung et al. 2020), the Byzantine rules
``centered_clip`` (Karimireddy et al. 2021), ``dnc`` (Shejwalkar & Houmansadr
2021), ``bulyan`` (El Mhamdi et al. 2018), ``alpha_detect`` (a detector whose false-alarm rate is set by the user and
whose weights recover), ``fltrust`` (Cao et al. 2021: trust from the server's own update on 32 clean
held-out root images), and client-level DP ``dp_mean``
(McMahan et al. 2018; its (epsilon, delta) lands in summary.json).

    python -m fedgan_jax.main --config configs/robust.py:median --workdir runs/median
"""

from fedgan_jax import config_lib

RULES = {
  "median": ("median", {}),
  "trimmed_mean": ("trimmed_mean", {"beta": 0.25}),
  # Krum needs C > 2f + 2: at the paper's C = 4 only f = 0 (pick the most central client).
  "krum": ("krum", {"f": 0}),
  "multi_krum": ("multi_krum", {"f": 0, "m": 2}),
  "geometric_median": ("geometric_median", {}),
  "norm_clip": ("norm_clip", {"max_norm": 0.5}),
  "detect_zscore": ("detect", {"detector": "robust_zscore", "features": ("g_loss",), "warmup_rounds": 10}),
  "detect_block": (
    "detect",
    {"detector": "isolation_forest", "features": ("g_loss", "update_norm"), "warmup_rounds": 10, "block_after": 3},
  ),
  "rlr": ("rlr", {}),  # Threshold ceil(C / 2) of the valid clients.
  "flame": ("flame", {}),
  "foolsgold": ("foolsgold", {}),
  "centered_clip": ("centered_clip", {"tau": 0.5}),  # The scale of norm_clip's bound.
  "dnc": ("dnc", {"num_byzantine": 1}),
  # Bulyan needs C >= 4f + 3: at the paper's C = 4 only f = 0.
  "bulyan": ("bulyan", {"num_byzantine": 0}),
  # A per-round test at level alpha on |G loss| whose weights recover once a client stops being flagged.
  "alpha_detect": ("alpha_detect", {"alpha": 0.01, "warmup_rounds": 10}),
  "dp_mean": ("dp_mean", {"clip_norm": 0.5, "noise_multiplier": 1.0}),
  # The server trains on the first 32 clean held-out images each round, as an honest client does.
  "fltrust": ("fltrust", {"root_size": 32}),
}


def get_config(rule: str = "median"):
  if rule not in RULES:
    raise ValueError(f"configs/robust.py:{rule}: unknown rule; accepted: {sorted(RULES)}.")
  config = config_lib.base_config()
  name, kwargs = RULES[rule]
  config.aggregation.name = name
  config.aggregation.kwargs.update(kwargs)
  return config
