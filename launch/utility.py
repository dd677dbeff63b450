"""docs/utility.csv and docs/utility.md: what the paper's settings give a downstream user, and what they leak.

    python -m launch.utility --workdir runs/utility            # run what is missing, then write both files
    python -m launch.utility --workdir runs/utility --no-run   # only rewrite them from finished runs

Runs the sweep of ``configs/utility.py`` (the paper's settings made
class-conditional, plus WGAN-GP with and without DP-SGD; resumable, a
setting's seeds train as one vmapped program) through ``launch.results``'s
machinery, and writes one CSV row per run (``launch.results``' columns plus
each DP-SGD run's ε) and a page of means with 95 % bootstrap CIs over seeds.
Every verdict sentence is computed from the rows by ``launch.results_stats``
(two settings are *distinguishable* only when their CIs do not overlap and a
Mann-Whitney U test gives p < 0.05), so a regenerated page cannot keep a stale
claim. The metrics: TSTR/TRTR (Esteban et al. 2017), trigger transfer and
BadNets' target rate (Gu et al. 2017), GAN-Leaks' membership AUC (Chen et
al., CCS 2020): ``fedgan_jax/metrics/utility.py``, ``membership.py``.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from fedgan_jax.io import rundir
from launch import results, results_page, sweep
from launch import results_stats as st
from launch.results_page import cell, values, versus

CONFIG = "configs/utility.py"
# configs/ is not a package: the settings' order and the DP references come from the config file, loaded by path.
_SETTINGS = sweep.load_module(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), CONFIG))
ORDER, PRIVATE_REFERENCE = _SETTINGS.ORDER, _SETTINGS.PRIVATE_REFERENCE
COLLAPSED_BELOW = 0.25  # As launch.results_page.render: samples spread less than a quarter of real images'.
DEFENSES = ("attack+detect", "attack+gp", "attack+both")
COLUMNS = (*results.COLUMNS[:-1], "epsilon_min", "epsilon_max", "dp_delta", results.COLUMNS[-1])
LABELS = {
  **results_page._LABELS,
  "clean+gp": "no attacker, WGAN-GP",
  "clean+gp+dp_sgd": "no attacker, WGAN-GP + DP-SGD",
  "attack+gp+dp_sgd": "attacker + WGAN-GP + DP-SGD",
}

Row = dict[str, Any]


def run_row(setting: str, config, run_dir: str) -> Row | None:
  """``launch.results.run_row`` plus the DP-SGD ε of the least and most exposed client (None without DP-SGD)."""
  row = results.run_row(setting, config, run_dir)
  if row is None:
    return None
  sgd = ((rundir.read_summary(run_dir) or {}).get("privacy") or {}).get("dp_sgd") or {}
  eps = [float(e) for e in sgd.get("epsilon") or ()]
  row["epsilon_min"] = min(eps) if eps else None
  row["epsilon_max"] = max(eps) if eps else None
  row["dp_delta"] = sgd.get("delta")
  return row


def min_p(n_a: int, n_b: int) -> float:
  """The smallest two-sided exact Mann-Whitney p two samples of these sizes can give (no ties)."""
  return min(1.0, 2.0 / math.comb(n_a + n_b, n_a)) if n_a and n_b else 1.0


def _n(rows: Sequence[Row], setting: str) -> int:
  return len({r["seed"] for r in rows if r["setting"] == setting})


def _has(rows: Sequence[Row], *settings: str) -> bool:
  return all(_n(rows, s) for s in settings)


def _table(rows: Sequence[Row], columns: Sequence[tuple[str, Any]]) -> list[str]:
  lines = ["| setting | seeds | " + " | ".join(c[0] for c in columns) + " |"]
  lines.append("| " + " | ".join(["---"] * (len(columns) + 2)) + " |")
  for s in ORDER:
    if _n(rows, s):
      lines.append(f"| {LABELS.get(s, s)} (`{s}`) | {_n(rows, s)} | " + " | ".join(fn(s) for _, fn in columns) + " |")
  return lines


def _above_half(rows: Sequence[Row], setting: str) -> bool:
  """Whether the setting's mean membership AUC has its whole 95 % CI above 0.5 (a leak beyond chance)."""
  ci = st.mean_ci(values(rows, setting, "mia_auc_final"))
  return bool(ci and ci.n > 1 and ci.lo > 0.5)


def claims(rows: Sequence[Row]) -> list[str]:
  """The page's sentences, each computed from the rows (a missing setting drops its sentence)."""
  out = []
  tt, ttr = "trigger_transfer_final", "trigger_transfer_real_final"
  tr, trr = "trigger_target_rate_final", "trigger_target_rate_real_final"
  if _has(rows, "clean"):
    out.append(
      "* **Is the synthetic data useful?** The clean run's TSTR balanced accuracy against TRTR's (the same "
      f"classifier on real images): {versus(rows, 'clean', 'clean', 'tstr_bacc_final', 'trtr_bacc_final')}."
    )
  if _has(rows, "clean", "attack"):
    out.append(
      "* **Does the backdoor reach a downstream classifier?** The attack's trigger transfer (predictions the "
      f"pasted trigger flips) against the clean run's: {versus(rows, 'attack', 'clean', tt)}; against the "
      f"real-data classifier's floor in the same runs: {versus(rows, 'attack', 'attack', tt, ttr)}. "
      "BadNets' target rate toward the attacker's most common class (a clean run has no target), the TSTR "
      f"classifier's against the real-data one's in the same runs: {versus(rows, 'attack', 'attack', tr, trr)}."
    )
    out.append(
      "* **Does the attack cost utility?** TSTR balanced accuracy, attack against clean: "
      f"{versus(rows, 'attack', 'clean', 'tstr_bacc_final')}."
    )
  for d in DEFENSES:
    if _has(rows, d, "attack"):
      out.append(
        f"* **`{d}` against `attack`**: trigger transfer {versus(rows, d, 'attack', tt)}; TSTR balanced accuracy "
        f"{versus(rows, d, 'attack', 'tstr_bacc_final')}."
      )
  for p, ref in PRIVATE_REFERENCE.items():
    if _has(rows, p, ref):
      eps = values(rows, p, "epsilon_max")
      delta = next((r["dp_delta"] for r in rows if r["setting"] == p and r.get("dp_delta")), None)
      eps_text = f"ε ≤ {max(eps):.2f} (δ = {delta:g}) per image, worst client and seed" if eps else "no ε"
      out.append(
        f"* **DP-SGD, `{p}` against `{ref}`** ({eps_text}): TSTR balanced accuracy "
        f"{versus(rows, p, ref, 'tstr_bacc_final')}; membership AUC {versus(rows, p, ref, 'mia_auc_final')}; "
        f"SWD ×1e3 {versus(rows, p, ref, 'swd_final', digits=1)}"
        + (f"; trigger transfer {versus(rows, p, ref, tt)}" if p.startswith("attack") else "")
        + "."
      )
  div = {s: values(rows, s, "diversity_final") for s in ORDER}
  collapsed = [(s, (sum(x < COLLAPSED_BELOW for x in xs), len(xs))) for s, xs in div.items()]
  collapsed = [(s, kn) for s, kn in collapsed if kn[0]]
  if any(div.values()):
    out.append(
      f"* **Mode collapse** (final diversity below {COLLAPSED_BELOW}, docs/results.md's threshold): "
      + (
        "; ".join(f"`{s}` {k} of {n} seeds" for s, (k, n) in collapsed)
        + ". A collapsed conditional generator still gives one image per class, which a classifier can learn from"
        if collapsed
        else "no seed"
      )
      + "."
    )
  leaking = [s for s in ORDER if _n(rows, s) and _above_half(rows, s)]
  measured = [s for s in ORDER if values(rows, s, "mia_auc_final")]
  if measured:
    out.append(
      "* **Membership leak**: "
      + (
        "settings whose membership AUC CI lies wholly above 0.5 (chance): "
        + ", ".join(f"`{s}` {cell(rows, s, 'mia_auc_final')}" for s in leaking)
        if leaking
        else "no setting's membership AUC CI lies wholly above 0.5 (chance)"
      )
      + "."
    )
  return out


def render(rows: Sequence[Row], prov: dict[str, Any]) -> str:
  """The whole page, every number and sentence from ``rows`` (one per seed) and ``prov`` (``results.provenance``)."""
  per_setting: dict[str, float] = {}  # A setting's seeds train as one program: each row carries its wall time.
  for r in rows:
    per_setting[r["setting"]] = max(per_setting.get(r["setting"], 0.0), r.get("wall_sec") or 0.0)
  total = sum(per_setting.values())
  wall = prov.get("wall_sec")
  runs_commit = prov.get("runs_commit")
  counts = [_n(rows, s) for s in ORDER if _n(rows, s)]
  n = min(counts, default=0)
  missing = [s for s in ORDER if not _n(rows, s)]
  rounds = int(max((r.get("rounds") or 0) for r in rows)) if rows else 0
  widths = "/".join(str(w) for w in sorted({int(r["width"]) for r in rows if r.get("width")})) or "?"
  c = lambda key, digits=3: lambda s: cell(rows, s, key, digits)  # noqa: E731
  lines = [
    "# Downstream utility, backdoor transfer and membership: the paper's settings, class-conditional",
    "",
    f"Generated by `{prov['command']}` from commit `{prov['commit']}` on {prov['date']} ({prov['machine']})"
    + (f"; the runs were trained from commit `{runs_commit}`" if runs_commit else "")
    + ". Every number below is computed from `utility.csv` beside this page (one row per seed). The runs' own "
    f"wall time (one program per setting, its seeds vmapped) adds up to {total / 60:.0f} min"
    + (f"; this regeneration took {wall / 60:.0f} min end to end" if wall else "")
    + ". `configs/utility.py` defines the settings: configs/results.py's (32 px synthetic dermoscopy data, 4 "
    "clients, client 0 malicious unless the setting has no attacker, uniform client weights, batch 32, 5 local "
    "steps, the paper code's detection rule and WGAN-GP) with a class-conditional DCGAN G/D of width "
    f"{widths}, {rounds} rounds, clients' labels split by a Dirichlet(0.3) draw per seed (so the attacker's "
    "images lean toward one class, the target of BadNets' rate, and the clients' sizes differ widely), and "
    "DP-SGD on every client's critic (clip 1, noise multiplier 1) in the `dp_sgd` settings."
    + (" Not yet run: " + ", ".join(f"`{s}`" for s in missing) + "." if missing else ""),
    "",
    "**How to read it.** Each cell is the mean over seeds of the final evaluation's value, with its 95 % "
    "bootstrap CI over seeds in brackets. **TSTR**: a small CNN trained on 512 labelled generated images, tested "
    "on held-out real ones (accuracy, balanced accuracy, ROC AUC); **TRTR**: the same CNN, initialisation and "
    "batches on 512 real training images, the ceiling. **Trigger transfer**: the fraction of held-out real "
    "images whose TSTR prediction the pasted trigger flips; **floor**: the same for the TRTR classifier (what "
    "pasting any patch does). **Target rate**: BadNets' attack success rate toward the attacker's most common "
    "class, TSTR beside TRTR. **Membership AUC**: GAN-Leaks (full black box) telling 256 training images from "
    "256 held-out ones by their distance in pixels to the nearest of 512 generated samples (0.5 = no leak). "
    "**SWD** ×1e3 against held-out images and **diversity** (1 = as diverse as real images) at the final "
    "evaluation. **ε**: the per-image ε (δ = 1e-5) of the most and the least exposed client (summary.json; a "
    "client with fewer images samples each of them more often, so its ε is larger). Two settings are "
    "*distinguishable* when their CIs do not overlap and a two-sided Mann-Whitney U test gives p < 0.05"
    + (
      f"; with {n} seeds a setting the exact test's smallest possible p is {min_p(n, n):.2g} (tied values switch "
      "it to a normal approximation, which reaches about 0.05 at best), so *CIs apart* is the strongest signal "
      "these runs can give"
      if n and min_p(n, n) >= st.ALPHA
      else ""
    )
    + ".",
    "",
    "## Downstream utility: train on synthetic, test on real",
    "",
  ]
  lines += _table(
    rows,
    [
      ("TSTR acc", c("tstr_acc_final")),
      ("TRTR acc", c("trtr_acc_final")),
      ("TSTR bacc", c("tstr_bacc_final")),
      ("TRTR bacc", c("trtr_bacc_final")),
      ("TSTR AUC", c("tstr_auc_final")),
      ("TRTR AUC", c("trtr_auc_final")),
    ],
  )
  lines += ["", "## Backdoor transfer, membership, fidelity and privacy", ""]
  eps = lambda key: lambda s: cell(rows, s, key, 2) if values(rows, s, key) else "–"  # noqa: E731
  lines += _table(
    rows,
    [
      ("trigger transfer", c("trigger_transfer_final")),
      ("floor (real)", c("trigger_transfer_real_final")),
      ("target rate", c("trigger_target_rate_final")),
      ("target rate (real)", c("trigger_target_rate_real_final")),
      ("implant", c("implant_final")),
      ("membership AUC", c("mia_auc_final")),
      ("SWD ×1e3", c("swd_final", 1)),
      ("diversity", c("diversity_final", 2)),
      ("ε, most exposed client", eps("epsilon_max")),
      ("least", eps("epsilon_min")),
    ],
  )
  lines += ["", "## What the rows say", ""]
  lines += claims(rows)
  lines += [
    "",
    f"These are {rounds}-round generators at 32 px and width {widths}: young, so small utility gaps and leaks "
    "are expected; on an accelerator, `--set num_rounds=200 --set model.g_width=32 --set model.d_width=32` is "
    "the same page closer to the paper's scale.",
  ]
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m launch.utility``: ``launch.results.main`` with this sweep, these rows and this page."""
  return results.main(argv, name="utility", config=CONFIG, render=render, row_fn=run_row, columns=COLUMNS, doc=__doc__)


if __name__ == "__main__":
  sys.exit(main())
