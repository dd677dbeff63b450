"""docs/matrix.md and its heat map from the rows of docs/matrix.csv: every number and verdict computed here.

A *cell* is one (defense, attack) pair, its seeds one row each. Every cell is
read against the clean reference (``configs/matrix.py:REFERENCE``, no
attacker and no defense, with more seeds) through ``launch.results_stats``:

* **implanted**: the cell's implant is distinguishable from the reference's
  (95 % bootstrap CIs apart and a two-sided Mann-Whitney p < 0.05) and
  higher;
* **fidelity lost**: the same test on SWD, the cell's higher;
* a defense **holds** against an attack when neither is true, which says
  "not distinguishable from a clean run at this many seeds", not "no effect".

Seeds above the clean floor count a cell's seeds whose implant exceeds every
reference seed's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from launch import results_stats as st
from launch.results_page import fmt

Row = dict[str, Any]
REFERENCE = ("none", "benign")
SHUT_OUT = 0.9  # As on the results page: an honest client with this share of the weight is the global model.
COLLAPSED = 0.25  # As on the results page: diversity below this = the samples are nearly one image.


def order(rows: Sequence[Row], key: str) -> list[str]:
  """The distinct values of ``key`` in the rows' order (the sweep's order)."""
  seen: dict[str, None] = {}
  for r in rows:
    seen.setdefault(r[key], None)
  return list(seen)


def values(rows: Sequence[Row], defense: str, attack: str, key: str) -> list[float]:
  """A cell's per-seed values of ``key`` in seed order (missing ones dropped)."""
  cell = [r for r in rows if r["defense"] == defense and r["attack"] == attack]
  return st.clean_values(r.get(key) for r in sorted(cell, key=lambda r: r["seed"]))


def seeds(rows: Sequence[Row], defense: str, attack: str) -> int:
  return sum(1 for r in rows if r["defense"] == defense and r["attack"] == attack)


def _worse(rows: Sequence[Row], defense: str, attack: str, key: str) -> bool:
  """The cell's ``key`` is distinguishable from the reference's and higher."""
  c = st.compare(values(rows, defense, attack, key), values(rows, *REFERENCE, key))
  return bool(c and c.distinguishable and c.a.mean > c.b.mean)


LATENT_CLOSER = 0.9  # A seed carries the latent backdoor when G(z*) is this much closer to x* than samples are.


def latent_carried(rows: Sequence[Row], defense: str, attack: str) -> tuple[int, int]:
  """``(k, n)``: seeds whose G(z*) is closer to x* than ``LATENT_CLOSER`` x the ordinary samples' distance."""
  cell = [r for r in rows if r["defense"] == defense and r["attack"] == attack]
  pairs = [(r.get("latent_trigger_dist"), r.get("latent_clean_dist")) for r in cell]
  pairs = [(t, c) for t, c in pairs if t is not None and c is not None]
  return sum(t < LATENT_CLOSER * c for t, c in pairs), len(pairs)


def own_floor(rows: Sequence[Row], defense: str) -> float | None:
  """The largest implant the defense's own benign seeds read (None for the reference's defense or no benign cell)."""
  if defense == REFERENCE[0]:
    return None
  xs = values(rows, defense, REFERENCE[1], "implant")
  return max(xs) if xs else None


def implanted(rows: Sequence[Row], defense: str, attack: str) -> bool:
  """The attack's implant: above the clean run's (CIs apart, rank test) and, under a defense, above every seed of
  that defense without an attacker (a defense that changes training, e.g. WGAN-GP, moves the reading by itself).

  For the latent backdoor: G(z*) near x* in every seed. A benign cell has no implant to find.
  """
  if attack == REFERENCE[1]:
    return False
  k, n = latent_carried(rows, defense, attack)
  if n:
    return n >= 2 and k == n
  if not _worse(rows, defense, attack, "implant"):
    return False
  own = own_floor(rows, defense)
  k, n = st.above(values(rows, defense, attack, "implant"), own)
  return own is None or k == n


def fidelity_lost(rows: Sequence[Row], defense: str, attack: str) -> bool:
  return _worse(rows, defense, attack, "swd")


def holds(rows: Sequence[Row], defense: str, attack: str) -> bool:
  return not implanted(rows, defense, attack) and not fidelity_lost(rows, defense, attack)


def clean_floor(rows: Sequence[Row]) -> float | None:
  """The largest implant any reference seed reads: a trained clean generator's own noise."""
  xs = values(rows, *REFERENCE, "implant")
  return max(xs) if xs else None


def carried(rows: Sequence[Row], defense: str, attack: str) -> tuple[int, int]:
  return st.above(values(rows, defense, attack, "implant"), clean_floor(rows))


def swd_ratio(rows: Sequence[Row], defense: str, attack: str) -> float | None:
  """The cell's mean SWD over the reference's (1 = as faithful as the clean run)."""
  a, b = values(rows, defense, attack, "swd"), values(rows, *REFERENCE, "swd")
  return float(np.mean(a) / np.mean(b)) if a and b and np.mean(b) > 0 else None


def verdict(rows: Sequence[Row], defense: str, attack: str) -> str:
  if not seeds(rows, defense, attack):
    return "–"
  if (defense, attack) == REFERENCE:
    return "reference"
  bad = [w for w, f in (("implant", implanted), ("fidelity", fidelity_lost)) if f(rows, defense, attack)]
  return " + ".join(bad) if bad else "holds"


def _grid(rows: Sequence[Row], text) -> list[str]:
  defenses, attacks = order(rows, "defense"), order(rows, "attack")
  lines = ["| defense \\ attack | " + " | ".join(f"`{a}`" for a in attacks) + " |"]
  lines.append("| --- | " + " | ".join(["---"] * len(attacks)) + " |")
  for d in defenses:
    lines.append(f"| `{d}` | " + " | ".join(text(d, a) if seeds(rows, d, a) else "–" for a in attacks) + " |")
  return lines


def _names(items: Sequence[str]) -> str:
  return ", ".join(f"`{x}`" for x in items) if items else "none"


def claims(rows: Sequence[Row]) -> list[str]:
  """The page's sentences, each computed from the rows."""
  defenses, attacks = order(rows, "defense"), order(rows, "attack")
  out = []
  for a in attacks:
    if a == REFERENCE[1]:
      continue
    present = [d for d in defenses if seeds(rows, d, a)]
    imp = [d for d in present if implanted(rows, d, a)]
    fid = [d for d in present if fidelity_lost(rows, d, a)]
    held = [d for d in present if holds(rows, d, a)]
    k, n = latent_carried(rows, "none", a)
    if n:  # The latent backdoor: G(z*) against x*.
      undefended = f"{'carried' if 'none' in imp else 'not carried'} (G(z*) near x* in {k} of {n} seeds)"
      how = ""
    else:
      undefended = "above the clean run's" if "none" in imp else "not distinguishable from the clean run's"
      how = f" ({fmt(st.mean_ci(values(rows, 'none', a, 'implant')))})" if "none" in present else ""
    out.append(
      f"- **`{a}`**: without a defense the implant is {undefended}{how}"
      + f"; implanted under {len(imp)} of {len(present)} defenses ({_names(imp)}); fidelity lost under "
      f"{len(fid)} ({_names(fid)}); holds: {len(held)} ({_names(held)})."
    )
  collapsed = [
    f"`{d}` × `{a}`"
    for d in defenses
    for a in attacks
    if seeds(rows, d, a) and 2 * sum(x < COLLAPSED for x in values(rows, d, a, "diversity")) > seeds(rows, d, a)
  ]
  out.append(
    f"- **Collapse**: cells whose samples collapsed (diversity below {COLLAPSED}: nearly one image; 1 = as diverse "
    f"as real images) in most seeds: {', '.join(collapsed) if collapsed else 'none'}. The clean reference's "
    f"diversity is {fmt(st.mean_ci(values(rows, *REFERENCE, 'diversity')), 2)}."
  )
  benign = REFERENCE[1]
  if any(r["attack"] == benign for r in rows):
    cost = [d for d in defenses if d != REFERENCE[0] and seeds(rows, d, benign) and fidelity_lost(rows, d, benign)]
    free = [d for d in defenses if d != REFERENCE[0] and seeds(rows, d, benign) and not fidelity_lost(rows, d, benign)]
    out.append(
      f"- **Without an attacker**, the defenses whose SWD is distinguishably worse than the clean run's: "
      f"{_names(cost)}; not distinguishable: {_names(free)}."
    )
    shut = [
      d
      for d in defenses
      if seeds(rows, d, benign)
      and st.above(values(rows, d, benign, "honest_weight_max"), SHUT_OUT - 1e-12)[0] * 2 > seeds(rows, d, benign)
    ]
    out.append(
      f"- **An honest client holds ≥ {SHUT_OUT} of the weight at the end of most benign seeds** (the global "
      f"generator is one hospital's model) under: {_names(shut)}."
    )
  return out


def _time(rows: Sequence[Row]) -> tuple[float, int]:
  """Total wall time of the runs (a cell's seeds are one program: its rows carry the same time) and cells."""
  per_cell: dict[tuple[str, str], float] = {}
  for r in rows:
    k = (r["defense"], r["attack"])
    per_cell[k] = max(per_cell.get(k, 0.0), r.get("wall_sec") or 0.0)
  return sum(per_cell.values()), len(per_cell)


def render(
  rows: Sequence[Row], prov: dict[str, Any], expected_cells: int | None = None, figure: str | None = "matrix.png"
) -> str:
  """The whole page."""
  total, n_cells = _time(rows)
  defenses, attacks = order(rows, "defense"), order(rows, "attack")
  ref = values(rows, *REFERENCE, "implant")
  n_seeds = sorted({seeds(rows, d, a) for d in defenses for a in attacks if seeds(rows, d, a)})
  first = rows[0] if rows else {}
  runs_commit = prov.get("runs_commit")
  lines = [
    f"# The attack × defense matrix: {len(attacks)} attacks × {len(defenses)} defenses",
    "",
    f"Generated by `{prov['command']}` on {prov['date']} ({prov['machine']}) at commit `{prov['commit']}`"
    + (
      f"; the runs were trained from commit{'s' if ',' in runs_commit else ''} `{runs_commit}`"
      + (
        " (the matrix was resumed: cells added to its config later were trained by the later commits)"
        if "," in runs_commit
        else ""
      )
      if runs_commit
      else ""
    )
    + f". {n_cells} cells"
    + (f" of {expected_cells}" if expected_cells and expected_cells != n_cells else "")
    + f", {'/'.join(map(str, n_seeds))} seeds a cell (the clean reference: {len(ref)}), every number below "
    "computed from `matrix.csv` beside this page (one row per seed). The runs' own wall time (a cell's seeds "
    f"vmapped into one program) adds up to {total / 3600:.1f} h, {total / max(n_cells, 1):.0f} s a cell"
    + (f"; this regeneration took {prov['wall_sec'] / 3600:.1f} h end to end" if prov.get("wall_sec") else "")
    + ". `configs/matrix.py` defines the cells: "
    f"{first.get('resolution', '?')} px synthetic dermoscopy data, 4 clients (client 0 the attacker; clients 0 "
    f"and 1 for `dba`), DCGAN G/D of width {first.get('width', '?')}, batch 32, 5 local steps, "
    f"{first.get('rounds', '?')} rounds, a {first.get('trigger_px', '?')}×{first.get('trigger_px', '?')} trigger; "
    "its docstring says what each attack and defense is.",
    "",
    "**How to read it.** *Implant*: the median amount of the trigger blended into its region of the generated "
    "images (0 = none, 1 = pasted), baseline-subtracted on clean held-out real images, a run's mean over the "
    "evaluations of its second half. *SWD* ×1e3 against clean held-out images (lower is better); "
    "*SWD / clean* is a cell's mean over the clean reference's. A cell is **implanted** when its implant is "
    "distinguishable from the clean reference's (95 % bootstrap CIs over seeds apart and a two-sided "
    "Mann-Whitney p < 0.05) and higher and, under a defense, every seed's implant is above every seed of the same "
    "defense without an attacker (a defense that changes training, as WGAN-GP does, moves the reading by itself); "
    "**fidelity** when SWD is distinguishable from the clean reference's and higher; a defense **holds** when "
    "neither, i.e. the cell is not distinguishable from a clean run at this many seeds. With 3 seeds against "
    'the reference\'s 8 a rank test can reach p = 0.012; small effects stay "not distinguishable".',
    "",
  ]
  if figure:
    lines += [f"![implant and fidelity of every cell]({figure})", ""]
  lines += ["## Verdicts", ""]
  lines += _grid(rows, lambda d, a: verdict(rows, d, a))
  lines += ["", "## What the rows say", ""]
  lines += claims(rows)
  floor = clean_floor(rows)
  lines += [
    "",
    "## Implant (mean over seeds; seeds above the clean floor)",
    "",
    f"The clean reference reads {fmt(st.mean_ci(ref), 4)}; its largest seed, the clean floor, "
    + (f"{floor:.4f}." if floor is not None else "is missing."),
    "",
  ]

  def implant_text(d: str, a: str) -> str:
    mean = f"{np.mean(values(rows, d, a, 'implant')):.4f}"
    if (d, a) == REFERENCE:
      return mean
    k, n = carried(rows, d, a)
    return f"{mean} ({k}/{n})" + (" **↑**" if implanted(rows, d, a) else "")

  lines += _grid(rows, implant_text)
  lines += ["", "## Fidelity: SWD relative to the clean run (**↑** distinguishably worse)", ""]
  lines += _grid(
    rows,
    lambda d, a: (
      (f"{swd_ratio(rows, d, a):.2f}" if swd_ratio(rows, d, a) is not None else "–")
      + (" **↑**" if fidelity_lost(rows, d, a) else "")
    ),
  )
  benign = REFERENCE[1]
  if any(r["attack"] == benign for r in rows):
    lines += [
      "",
      "## Without an attacker: false alarms and who keeps the weight",
      "",
      "Per defense on the benign runs: the share of honest clients flagged per round after the warm-up "
      "(*flagged*; *acted*: the flags that changed weights), and the honest clients' final weights (uniform = "
      f"0.25). A client holding ≥ {SHUT_OUT} is the global model.",
      "",
      "| defense | seeds | FPR flagged | FPR acted | honest weight, min | max "
      f"| seeds with an honest client ≥ {SHUT_OUT} |",
      "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for d in defenses:
      n = seeds(rows, d, benign)
      if n:
        ci = lambda key: fmt(st.mean_ci(values(rows, d, benign, key)), 2)
        k, m = st.above(values(rows, d, benign, "honest_weight_max"), SHUT_OUT - 1e-12)
        lines.append(
          f"| `{d}` | {n} | {ci('fpr_flagged')} | {ci('fpr_acted')} | {ci('honest_weight_min')} | "
          f"{ci('honest_weight_max')} | {k} of {m} |"
        )
  lines += ["", "## The attacker's final aggregation weight (uniform = 0.25)", ""]
  lines += _grid(
    rows,
    lambda d, a: (
      f"{np.mean(values(rows, d, a, 'attacker_weight')):.2f}" if values(rows, d, a, "attacker_weight") else "–"
    ),
  )
  lines += ["", "## Every cell", ""]
  lines.append(
    "| defense | attack | seeds | implant [95 % CI] | seeds above the clean floor | SWD ×1e3 | diversity "
    "| attacker's weight | honest weight, min | max | ε | verdict |"
  )
  lines.append("| " + " | ".join(["---"] * 12) + " |")
  for d in defenses:
    for a in attacks:
      n = seeds(rows, d, a)
      if not n:
        continue
      ci = lambda key, digits=3: fmt(st.mean_ci(values(rows, d, a, key)), digits)
      eps = values(rows, d, a, "epsilon")
      k, m = carried(rows, d, a)
      above = "–" if (d, a) == REFERENCE else f"{k} of {m}"
      lines.append(
        f"| `{d}` | `{a}` | {n} | {ci('implant', 4)} | {above} | {ci('swd', 1)} | {ci('diversity', 2)} | "
        f"{ci('attacker_weight', 2)} | {ci('honest_weight_min', 2)} | {ci('honest_weight_max', 2)} | "
        f"{f'{np.mean(eps):.3g}' if eps else '–'} | {verdict(rows, d, a)} |"
      )
  latent = [a for a in attacks if any(latent_carried(rows, d, a)[1] for d in defenses)]
  for a in latent:
    lines += [
      "",
      f"## The latent-space backdoor (`{a}`)",
      "",
      "Mean squared distance of the global generator's G(z*) to the target x* (final evaluation) beside the "
      "median distance of ordinary samples to x*; a seed carries the backdoor when G(z*) is closer than "
      f"{LATENT_CLOSER} × the ordinary distance, a cell is **implant** when every seed does.",
      "",
      "| defense | seeds | G(z*) to x* | ordinary samples to x* | seeds carrying it | verdict |",
      "| --- | --- | --- | --- | --- | --- |",
    ]
    for d in defenses:
      k, n = latent_carried(rows, d, a)
      if n:
        ci = lambda key: fmt(st.mean_ci(values(rows, d, a, key)), 3)
        lines.append(
          f"| `{d}` | {n} | {ci('latent_trigger_dist')} | {ci('latent_clean_dist')} | {k} of {n} | "
          f"{verdict(rows, d, a)} |"
        )
  deltas = sorted({r["delta"] for r in rows if r.get("delta") is not None})
  if deltas:
    lines += [
      "",
      f"ε is client-level (ε, δ = {', '.join(f'{x:g}' for x in deltas)}) for the rounds run, from `dp-accounting` "
      "(`fedgan_jax.privacy`).",
    ]
  lines += [
    "",
    "## The same matrix at the paper's scale",
    "",
    "On a GPU (width 32, 200 rounds, 8 seeds a cell; the cells of a defense share one compilation):",
    "",
    "```bash",
    "python -m launch.matrix --workdir runs/matrix_gpu --out matrix_gpu \\",
    "  --set model.g_width=32 --set model.d_width=32 --set num_rounds=200",
    "```",
    "",
    "and `configs/matrix.py`'s `NUM_SEEDS` for more seeds. Runs on a folder of real images take "
    "`--set data.source=folder --set data.path=/data/ISIC` as on the results page.",
  ]
  return "\n".join(lines) + "\n"


def heatmap(rows: Sequence[Row], path: str) -> None:
  """Two panels (implant, SWD / clean), defenses × attacks, each cell annotated; * = distinguishable and worse."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  defenses, attacks = order(rows, "defense"), order(rows, "attack")
  nan = float("nan")
  mean = lambda d, a: np.mean(values(rows, d, a, "implant")) if values(rows, d, a, "implant") else nan
  imp = np.array([[mean(d, a) for a in attacks] for d in defenses])
  swd = np.array([[swd_ratio(rows, d, a) or nan for a in attacks] for d in defenses])
  fig, axes = plt.subplots(1, 2, figsize=(2.2 + 1.2 * len(attacks) * 2, 1.2 + 0.45 * len(defenses)), squeeze=False)
  panels = (
    ("implant (baseline-subtracted)", imp, implanted, "magma_r", "{:.3f}"),
    ("SWD / clean run", swd, fidelity_lost, "viridis_r", "{:.2f}"),
  )
  for ax, (title, grid, worse, cmap, form) in zip(axes[0], panels):
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(attacks)), attacks, rotation=45, ha="right")
    ax.set_yticks(range(len(defenses)), defenses)
    ax.set_title(title + "  (* distinguishable, worse)")
    for i, d in enumerate(defenses):
      for j, a in enumerate(attacks):
        if np.isfinite(grid[i, j]):
          mark = "*" if worse(rows, d, a) else ""
          dark = im.norm(grid[i, j]) > 0.5  # Both colour maps run from light (good) to dark (worse).
          text = form.format(grid[i, j]) + mark
          ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    fig.colorbar(im, ax=ax, fraction=0.04)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
