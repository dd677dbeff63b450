"""The attack x defense matrix of docs/matrix.md: every attack against every defense, 3 seeds a cell.

    python -m launch.matrix --workdir runs/matrix     # runs what is missing, then writes docs/matrix.{md,csv,png}

The base is configs/results.py's run (configs/paper.py's rules at CPU size:
32 px synthetic dermoscopy data, 4 clients, uniform client weights, DCGAN
G/D, Adam, batch 32, 5 local steps, the 4x4 trigger), made smaller so that
the whole matrix regenerates in a few hours on a 2-core CPU: width
``WIDTH``, ``NUM_ROUNDS`` rounds, ``NUM_SEEDS`` seeds trained as one vmapped
program per cell. Cells that differ only in the attack share one compiled
program (the attack is a mask and array inputs of the round: the persistent
compilation cache in ``<workdir>/.jax_cache`` serves them), so a defense
costs one compilation.

Attacks (columns; client 0 is the attacker unless said otherwise):

* ``benign``: no attacker: the defense's false alarms and fidelity cost;
* ``paper``: the paper's data poisoning (the trigger pasted on every image);
* ``mimic``: the same, reporting the honest median loss to the server;
* ``dba``: the distributed backdoor, clients 0 and 1 each pasting one half
  (row band) of the trigger; scored with the whole trigger;
* ``scale``: data poisoning + model replacement (the update boosted by C);
* ``pgd_scale``: data poisoning + constrain-and-scale at the L2 bound
  ``BOUND`` (the bound ``norm_clip``, ``centered_clip`` and ``dp_mean``
  clip to: the upload passes clipping at exactly its limit);
* ``sign_flip``, ``alie``, ``ipm``: the Byzantine uploads (data poisoning
  stays on: their implant column says whether it survives them);
* ``latent``: the generator's latent-space backdoor (``attack.latent_trigger``,
  no poisoned images): read by the distance of G(z*) to its target x* beside
  the same distance of ordinary samples.

Defenses (rows): ``none`` (FedAvg), the paper's ``detect`` (Isolation
Forest on |G loss|, persistent decay), ``gp`` (WGAN-GP local
regularisation) and ``detect+gp``, then every rule of configs/robust.py with
its preset: ``alpha_detect``, ``median``, ``krum``, ``norm_clip``, ``rlr``,
``flame``, ``foolsgold``, ``centered_clip``, ``dnc``, ``dp_mean`` (its
epsilon in the CSV), ``fltrust`` (the server's root set: 32 clean held-out
images). Left out because at C = 4 they coincide with a row or
with FedAvg: ``trimmed_mean`` (beta = 0.25 trims one client per side: the
mean of the two middle values, which is the median of four), ``bulyan``
(C >= 4f + 3 allows only f = 0: nothing trimmed), ``multi_krum`` (f = 0).

The clean reference (``benign`` x ``none``) trains ``REFERENCE_SEEDS``
seeds: every cell's implant and fidelity are compared with it (3 against 8
seeds lets a rank test reach p < 0.05; 3 against 3 cannot).

On a GPU, the paper's scale: ``--set model.g_width=32 --set
model.d_width=32 --set num_rounds=200`` (and ``--seeds 8``).
"""

import importlib.util
import os

from fedgan_jax import presets
from launch.grid import product


def _sibling(name: str):
  """configs/<name>.py, loaded by path (config files are not a package: they load from any working directory)."""
  spec = importlib.util.spec_from_file_location(
    f"_matrix_{name}", os.path.join(os.path.dirname(__file__), f"{name}.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


results, robust = _sibling("results"), _sibling("robust")

NUM_ROUNDS = 40
WIDTH = 16
NUM_SEEDS = 3
REFERENCE_SEEDS = 8  # The clean reference (benign x none): the floor every cell is read against, 3 vs 8 seeds.
BOUND = 0.5  # configs/robust.py's clipping bound (norm_clip max_norm, centered_clip tau, dp_mean clip_norm).

ATTACKS = {
  "benign": {"attack.malicious": ()},
  "paper": {},
  "mimic": {"attack.report_losses": "mimic"},
  "dba": {"attack.malicious": (0, 1), "attack.dba": True},
  "scale": {"attack.upload": "scale"},
  "pgd_scale": {"attack.upload": "pgd_scale", "attack.upload_strength": BOUND},
  "sign_flip": {"attack.upload": "sign_flip"},
  "alie": {"attack.upload": "alie"},
  "ipm": {"attack.upload": "ipm"},
  # The generator's latent-space backdoor alone (no poisoned images): read by G(z*)'s distance to x*.
  "latent": {"attack.latent_trigger": True, "attack.poison_rate": 0.0},
}

_DETECT = dict(presets.DETECTION, **{"aggregation.kwargs.warmup_rounds": results.WARMUP})
_GP = dict(presets.GRADIENT_PENALTY, **{"train.g_lr": 1e-4, "train.d_lr": 1e-4})  # As configs/paper.py:gp.


def _rule(name: str) -> dict:
  rule, kwargs = robust.RULES[name]
  return {"aggregation.name": rule, **{f"aggregation.kwargs.{k}": v for k, v in kwargs.items()}}


DEFENSES = {
  "none": {},
  "detect": _DETECT,
  "gp": _GP,
  "detect+gp": {**_DETECT, **_GP},
  **{
    name: _rule(name)
    for name in (
      "alpha_detect",
      "median",
      "krum",
      "norm_clip",
      "rlr",
      "flame",
      "foolsgold",
      "centered_clip",
      "dnc",
      "dp_mean",
      "fltrust",
    )
  },
}


def get_config():
  config = results.get_config()
  config.num_rounds = NUM_ROUNDS
  config.model.g_width = config.model.d_width = WIDTH
  config.ckpt_every = 20
  config.eval_every = 10  # The implant comes and goes between rounds: the page averages the second half.
  config.eval.num_samples = 256  # The numpy SWD dominates an evaluation on a CPU.
  config.eval.implant_sizes = (4,)  # One trigger size in the whole matrix.
  return config


# The clean run: the noise floor of the implant and the fidelity every cell is read against.
REFERENCE = ("none", "benign")


def cells():
  """(defense, attack, overrides) of every cell, defense-major (a defense's cells share one program)."""
  return [
    (d, a, {"_defense": d, "_attack": a, **dov, **aov}) for d, dov in DEFENSES.items() for a, aov in ATTACKS.items()
  ]


def get_sweep():
  # product() names a point by its labels only (defense-detect__attack-dba__seeds-0-2).
  return [
    p
    for d, a, ov in cells()
    for p in product([ov], {"seed": list(range(REFERENCE_SEEDS if (d, a) == REFERENCE else NUM_SEEDS))})
  ]
