"""The paper's grid on the embedded synthetic dermoscopy data, sized for a CPU.

Jin & Li, "Backdoor Attack is a Devil in Federated GAN-based Medical Image
Synthesis" (SASHIMI 2022), Tables 1-2: attack {none, one attacker (client 0)}
x defense {none, global malicious detection, local gradient penalty (WGAN-GP),
both} x trigger size {4, 8} px x seeds {0, 1, 2} = 48 points, on the default
32 px data with 4 clients and a short run (60 rounds) per point.

    python -m launch.sweep --config configs/paper_sweep.py --workdir runs/paper_sweep
    python -m launch.sweep --config configs/paper_sweep.py --workdir runs/paper_sweep --dry-run

Rerunning the command skips finished points and resumes the rest; the results
land in ``runs/paper_sweep/results.csv``. Expected runtime on a 2-core CPU
(jax 0.10.2; docs/benchmarks.md): 2-5 minutes per point. Measured: the
heaviest point (attacker + detection + gradient penalty) took 290 s: 55 s to
the first round (compilation), ~2.4 s per round (the gradient penalty doubles
the D step), ~80 s for the final FID/KID evaluation. About 3 hours for the 48
points; ``--parallel`` does not help on 2 cores (one run uses both). Use
``--dry-run`` to hand the commands to a scheduler instead, or ``--batch-seeds``
to train the 3 seeds of each point as one program.

Defenses (the paper's settings):

* ``detect``: ``aggregation.name='detect'`` (Isolation Forest on |G loss of
  the last local batch|, persistent decay 0.9 per flag), acting from round
  index 11 (the paper's code's ``epoch > 10``).
* ``gp``: WGAN loss with gradient penalty 10 (the code's N(0, 1)
  interpolation), InstanceNorm after every conv of D (the first too), RMSprop.
* ``both``: the two together.
"""

from fedgan_jax import config_lib, presets
from launch.sweep import product

NUM_ROUNDS = 60

_GP = dict(presets.GRADIENT_PENALTY, **{"train.g_lr": 1e-4, "train.d_lr": 1e-4})  # As configs/paper.py:gp.
_DETECT = presets.DETECTION

DEFENSES = [
  {"_defense": "none"},
  {"_defense": "detect", **_DETECT},
  {"_defense": "gp", **_GP},
  {"_defense": "both", **_DETECT, **_GP},
]


def get_config():
  config = config_lib.base_config()
  config.num_rounds = NUM_ROUNDS
  config.eval_every = 20
  config.ckpt_every = 20
  config.log_every = 10
  config.eval.num_samples = 256
  return config


def get_sweep():
  return product(
    {"attack.malicious": [(), (0,)]},
    DEFENSES,
    {"attack.trigger_size": [4, 8]},
    {"seed": [0, 1, 2]},
  )
