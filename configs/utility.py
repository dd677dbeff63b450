"""The table of docs/utility.md: the paper's settings made class-conditional, with downstream utility and leakage.

    python -m launch.utility --workdir runs/utility     # runs what is missing, then writes docs/utility.{csv,md}

Every setting is configs/results.py's (the paper's rules at CPU size, its
presets and constants imported from there: uniform client weights, detection
acted on after the same warm-up, WGAN-GP with the paper's learning rates)
with ``model.conditional=True``, so that the final evaluation reads what a
downstream user gets from the generator: TSTR accuracy, balanced accuracy and
AUC of a small classifier trained on 512 generated, labelled images next to
the same classifier trained on 512 real ones (TRTR; Esteban et al. 2017),
the fraction of its predictions the trigger flips next to the real-data
classifier's (``trigger_transfer`` and its ``_real`` floor), BadNets' attack
success rate toward the attacker's most common class (``trigger_target_rate``,
Gu et al. 2017), and GAN-Leaks' membership AUC (Chen et al., CCS 2020;
``mia_auc``, 256 members against 256 held-out images). Settings:

* ``clean``, ``attack``, ``attack+detect``, ``attack+gp``, ``attack+both``: the
  paper's (Jin & Li 2022; FedDetect 2023) five;
* ``clean+gp``: WGAN-GP without an attacker, the non-private reference of
  ``clean+gp+dp_sgd``;
* ``clean+gp+dp_sgd`` and ``attack+gp+dp_sgd``: the same with DP-SGD on every
  client's critic (Abadi et al. 2016; clip 1, noise multiplier 1, as
  configs/dp_sgd.py; DP-SGD needs a D without BatchNorm, which the WGAN-GP
  preset's InstanceNorm critic is); each client's ε (δ = 1e-5) per image is
  read from summary.json.

Partition: label-skewed, ``data.partition='dirichlet'`` with ``data.alpha=0.3``
(as configs/results.py's ``noniid+detect``), the same for every setting so
they compare. Under an iid split the attacker's images hold both classes in
the data's proportions, and BadNets' target rate would measure a push toward a
class the attacker does not favour; with a skewed split the attacker's
images lean toward one class, which is the class a trigger-carrying synthetic
image most likely gets labelled, so the target rate reads the backdoor where a
downstream classifier would learn it. The split is drawn from the seed, so the
3 seeds also vary which class leans where. It also makes the clients' sizes
differ widely (seed 0: 1493, 34, 2421 and 52 images): a small client samples
each of its images more often, so its DP-SGD ε is the largest (the page gives
the most and the least exposed client's).

Sized for a loaded 2-core CPU: 32 px, G/D width 16, 30 rounds, seeds 0-2
trained as one vmapped program per setting; feature-space metrics are off
(``eval.extractor='none'``), so the membership attack measures distances in
pixels; SWD, diversity and the implant every 10 rounds, the utility metrics at
the final evaluation only (``eval.utility_every=0``). At 30 rounds the
generators are young: the page is a measurement of this size, not of the
paper's 200 rounds at 256 px (``--set num_rounds=200 --set
model.g_width=32 --set model.d_width=32`` on a GPU). Measured on a shared,
loaded 2-core CPU (2026-12-04, one setting at a time, XLA's compilation cache
warm from other runs): 34 min end to end, 2.5 to 4 min a BCE or WGAN-GP
setting and 6 to 8 min a DP-SGD one (its per-image gradients compile slowly).
"""

import os

from fedgan_jax import config_lib
from launch.sweep import load_module, product

# configs/ is not a package (configs are loaded by path): configs/results.py's settings, read from beside this file.
_RESULTS = load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.py"))
_CLEAN, _DETECT, _GP, WIDTH = _RESULTS._CLEAN, _RESULTS._DETECT, _RESULTS._GP, _RESULTS.WIDTH

NUM_ROUNDS = 30
NUM_SEEDS = 3
ALPHA = 0.3  # Dirichlet label skew of every setting (configs/results.py's noniid+detect).
# DP-SGD as configs/dp_sgd.py: per-image clip S = 1, Gaussian noise std 1 x S on the batch's sum.
_DP = {"train.dp_sgd.enabled": True, "train.dp_sgd.clip_norm": 1.0, "train.dp_sgd.noise_multiplier": 1.0}

# Run order puts the paper's comparisons first, so that a partial sweep still answers them.
SETTINGS = [
  {"_setting": "clean", **_CLEAN},
  {"_setting": "attack"},
  {"_setting": "attack+gp", **_GP},
  {"_setting": "attack+gp+dp_sgd", **_GP, **_DP},
  {"_setting": "attack+detect", **_DETECT},
  {"_setting": "attack+both", **_DETECT, **_GP},
  {"_setting": "clean+gp", **_CLEAN, **_GP},
  {"_setting": "clean+gp+dp_sgd", **_CLEAN, **_GP, **_DP},
]
# The page's order and each private setting's non-private reference.
ORDER = (
  "clean",
  "attack",
  "attack+detect",
  "attack+gp",
  "attack+both",
  "clean+gp",
  "clean+gp+dp_sgd",
  "attack+gp+dp_sgd",
)
PRIVATE_REFERENCE = {"clean+gp+dp_sgd": "clean+gp", "attack+gp+dp_sgd": "attack+gp"}


def get_config():
  config = config_lib.base_config()
  config.num_rounds = NUM_ROUNDS
  config.model.g_width = config.model.d_width = WIDTH
  config.model.conditional = True
  config.data.partition = "dirichlet"
  config.data.alpha = ALPHA
  config.eval_every = 10
  config.ckpt_every = NUM_ROUNDS
  config.eval.extractor = "none"  # Pixels: EfficientNet features cost minutes per evaluation on this CPU.
  config.eval.utility_every = 0  # Final evaluation only.
  config.aggregation.weighting = "uniform"  # The paper's code, as configs/results.py.
  return config


def get_sweep():
  return product(SETTINGS, {"seed": list(range(NUM_SEEDS))})
