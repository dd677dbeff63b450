"""The table of docs/results.md: the paper's settings and what a reviewer asks next, 8 seeds each.

    python -m launch.results --workdir runs/results     # runs what is missing, then writes docs/results.{csv,md}

Every setting is configs/paper.py's (the paper's code's rules at CPU size; its
docstring lists what differs) with 100 rounds: 32 px synthetic dermoscopy
data, 4 clients, client 0 malicious unless the setting is clean, uniform
client weights, DCGAN G/D of width 16, Adam, batch 32, 5 local steps; detection =
an Isolation Forest on |G loss of the last local batch| acted on from round
index 11 with persistent decay 0.9 when fewer than C // 2 clients are flagged;
WGAN-GP = lambda 10, InstanceNorm D, RMSprop with PyTorch's semantics, the
code's N(0, 1) interpolation, InstanceNorm also after the critic's first conv),
seeds 0-7 trained as one vmapped program per setting. Settings:

* ``clean``, ``attack``, ``attack+detect``, ``attack+gp``, ``attack+both``;
* ``clean+detect``: the detector's false positives on a benign run;
* ``mimic+detect``: an attacker that reports the honest median loss, against
  loss-based detection; ``mimic+detect_server``: the same attacker against
  detection on statistics the server computes itself (``update_norm``,
  ``dist_to_median``), which it cannot fake;
* ``attack_trigger2`` / ``attack_trigger8``: the attack with a 2×2 trigger (the
  paper's 0.39 % of the image: 16×16 on 256×256) and an 8×8 one (6.25 %), next
  to the default 4×4 (1.56 %);
* ``noniid+detect``: a benign label-skewed (Dirichlet 0.3) run with detection:
  do skewed honest clients look like outliers?

Sized so that 11 settings x 8 seeds regenerate in about two hours on a 2-core
CPU (docs/results.md gives the measured time): width 16 and 100 rounds, where
3 seeds at width 32 and 150 rounds took as long (8 replicas at width 32 cost
~9.5 s per round with BCE, ~19 s with WGAN-GP, on that CPU). Feature-space
metrics (FD/KID) are off; SWD, the implant (read with the 2, 4 and 8 px
templates in every run, clean ones included) and diversity are computed every
10 rounds. The implant comes and goes between evaluations (GAN dynamics), so
the tables report the mean over the evaluations of the second half of the run
next to the final value. On a GPU, ``--set model.g_width=32 --set
model.d_width=32 --set num_rounds=200`` is the same table closer to the paper.
"""

from fedgan_jax import config_lib, presets
from launch.sweep import product

NUM_ROUNDS = 100
WIDTH = 16
NUM_SEEDS = 8  # Trained as one vmapped program per setting; 8 vs 8 lets a rank test reach p < 0.001.
WARMUP = 10  # The paper code's ``warmup``: flags acted on from round index 11.

_DETECT = dict(presets.DETECTION, **{"aggregation.kwargs.warmup_rounds": WARMUP})
_DETECT_SERVER = dict(_DETECT, **{"aggregation.kwargs.features": ("update_norm", "dist_to_median")})
_GP = dict(presets.GRADIENT_PENALTY, **{"train.g_lr": 1e-4, "train.d_lr": 1e-4})  # As configs/paper.py:gp.
_CLEAN = {"attack.malicious": ()}

SETTINGS = [
  {"_setting": "clean", **_CLEAN},
  {"_setting": "attack"},
  {"_setting": "attack+detect", **_DETECT},
  {"_setting": "attack+gp", **_GP},
  {"_setting": "attack+both", **_DETECT, **_GP},
  {"_setting": "clean+detect", **_CLEAN, **_DETECT},
  {"_setting": "mimic+detect", "attack.report_losses": "mimic", **_DETECT},
  {"_setting": "mimic+detect_server", "attack.report_losses": "mimic", **_DETECT_SERVER},
  {"_setting": "attack_trigger2", "attack.trigger_size": 2},
  {"_setting": "attack_trigger8", "attack.trigger_size": 8},
  {"_setting": "noniid+detect", **_CLEAN, **_DETECT, "data.partition": "dirichlet", "data.alpha": 0.3},
]


def get_config():
  config = config_lib.base_config()
  config.num_rounds = NUM_ROUNDS
  config.model.g_width = config.model.d_width = WIDTH
  config.eval_every = 10  # The implant comes and goes between rounds: the tables average the second half.
  config.ckpt_every = 50
  config.eval.extractor = "none"
  config.eval.implant_sizes = (2, 4, 8)  # Every run, clean ones included, read with every template used here.
  config.aggregation.weighting = "uniform"  # The paper's code: 1/C before the defense changes it.
  return config


def get_sweep():
  return product(SETTINGS, {"seed": list(range(NUM_SEEDS))})
