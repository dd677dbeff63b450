"""docs/results.md from the rows of docs/results.csv: means with bootstrap CIs over seeds, and what they say.

Every number on the page is computed here from the rows (one per seed); every
verdict sentence follows from them through ``launch.results_stats``: two
settings are "distinguishable" only when their 95 % CIs do not overlap and a
rank test gives p < 0.05, and a seed "carries the implant" only when it is
above every seed of the clean run read with the same template. Regenerating
the page from new runs therefore cannot leave a stale claim, and nothing is
attributed to the paper beyond its abstract's three sentences, quoted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from launch import results_stats as st

Row = dict[str, Any]

_LABELS = {
  "clean": "no attacker",
  "attack": "1 attacker (client 0), no defense",
  "attack+detect": "attacker + detection (defense 1)",
  "attack+gp": "attacker + WGAN-GP (defense 2)",
  "attack+both": "attacker + detection + WGAN-GP",
  "clean+detect": "no attacker + detection",
  "mimic+detect": "mimicking attacker + loss-based detection",
  "mimic+detect_server": "mimicking attacker + detection on server statistics",
  "attack_trigger2": "attacker, 2×2 trigger",
  "attack_trigger8": "attacker, 8×8 trigger",
  "noniid+detect": "no attacker, label-skewed clients + detection",
}
_PAPER = (
  "adding a small trigger with size less than 0.5 percent of the original image size can corrupt the FL-GAN model",
  "we provide two effective defense strategies: global malicious detection and local training regularization",
  "combining the two defense strategies yields a robust medical image generation",
)
SHUT_OUT = 0.9  # An honest client holding at least this share of the weight: the global G is its model.


def values(rows: Sequence[Row], setting: str, key: str) -> list[float]:
  """A setting's per-seed values of ``key`` in seed order (missing ones dropped)."""
  return st.clean_values(r.get(key) for r in sorted(rows, key=lambda r: r["seed"]) if r["setting"] == setting)


def _num(x: float, digits: int) -> str:
  if x != 0 and abs(x) < 0.5 * 10**-digits:
    return f"{x:.1e}"
  return f"{x:.{digits}f}"


def fmt(ci: st.MeanCI | None, digits: int = 3, pct: bool = False) -> str:
  """``mean [lo, hi]`` (``–`` when undefined)."""
  if ci is None:
    return "–"
  k, unit = (100.0, " %") if pct else (1.0, "")
  d = max(digits - 2, 0) if pct else digits
  if ci.n == 1 or ci.lo == ci.hi:
    return f"{_num(ci.mean * k, d)}{unit}"
  return f"{_num(ci.mean * k, d)} [{_num(ci.lo * k, d)}, {_num(ci.hi * k, d)}]{unit}"


def cell(rows: Sequence[Row], setting: str, key: str, digits: int = 3, pct: bool = False) -> str:
  return fmt(st.mean_ci(values(rows, setting, key)), digits, pct)


def _seeds(rows: Sequence[Row], setting: str) -> int:
  return len({r["seed"] for r in rows if r["setting"] == setting})


def _trigger_px(rows: Sequence[Row], setting: str) -> int | None:
  return next((r["trigger_px"] for r in rows if r["setting"] == setting), None)


def floor(rows: Sequence[Row], px: int) -> float | None:
  """The clean run's noise floor for a ``px`` template: the largest implant any clean seed reads with it."""
  xs = values(rows, "clean", f"implant_{px}px")
  return max(xs) if xs else None


def carried(rows: Sequence[Row], setting: str) -> tuple[int, int]:
  """``(k, n)``: seeds of ``setting`` whose implant is above every clean seed's with the same template."""
  px = _trigger_px(rows, setting)
  return st.above(values(rows, setting, "implant"), None if px is None else floor(rows, px))


def shut_out(rows: Sequence[Row], setting: str) -> tuple[int, int]:
  """``(k, n)``: seeds of ``setting`` in which one honest client ends with at least ``SHUT_OUT`` of the weight."""
  return st.above(values(rows, setting, "honest_weight_max"), SHUT_OUT - 1e-12)


def versus(
  rows: Sequence[Row], a: str, b: str, key: str, key_b: str | None = None, digits: int = 3, against: str = ""
) -> str:
  """``0.083 [0.05, 0.11] against 0.002 [...] <against>: distinguishable (CIs apart, p = 0.0002)``."""
  c = st.compare(values(rows, a, key), values(rows, b, key_b or key))
  if c is None:
    return "not enough seeds to compare"
  verdict = "distinguishable" if c.distinguishable else "not distinguishable"
  why = "CIs apart" if not c.overlap else "CIs overlap"
  against = f" {against}" if against else ""
  return f"{fmt(c.a, digits)} against {fmt(c.b, digits)}{against}: {verdict} ({why}, Mann-Whitney p = {c.p:.2g})"


def distinguishable(rows: Sequence[Row], a: str, b: str, key: str, key_b: str | None = None) -> bool:
  c = st.compare(values(rows, a, key), values(rows, b, key_b or key))
  return bool(c and c.distinguishable)


def _table(rows: Sequence[Row], settings: Sequence[str], columns: Sequence[tuple[str, Any]]) -> list[str]:
  lines = ["| setting | seeds | " + " | ".join(c[0] for c in columns) + " |"]
  lines.append("| " + " | ".join(["---"] * (len(columns) + 2)) + " |")
  for s in settings:
    if _seeds(rows, s):
      cells = [fn(s) for _, fn in columns]
      lines.append(f"| {_LABELS.get(s, s)} (`{s}`) | {_seeds(rows, s)} | " + " | ".join(cells) + " |")
  return lines


def _frac(kn: tuple[int, int]) -> str:
  return f"{kn[0]} of {kn[1]}"


def _collapsed(rows: Sequence[Row], setting: str, below: float) -> tuple[int, int]:
  xs = values(rows, setting, "diversity")
  return sum(x < below for x in xs), len(xs)


def _claims(rows: Sequence[Row]) -> list[str]:
  """The abstract's claims, each followed by what the rows say (verdicts computed)."""
  out = []
  have = lambda *ss: all(_seeds(rows, s) for s in ss)
  if have("clean", "attack"):
    px = _trigger_px(rows, "attack")
    implanted = distinguishable(rows, "attack", "clean", "implant", f"implant_{px}px")
    text = (
      f"* *“{_PAPER[0]}.”* The attack ({px}×{px} px) leaves an implant of "
      f"{versus(rows, 'attack', 'clean', 'implant', f'implant_{px}px', against='for the clean run')}; "
      f"attack seeds above every clean seed: {_frac(carried(rows, 'attack'))}."
    )
    if have("attack_trigger2"):
      text += (
        f" At the paper's share of the image (2×2 px, 0.39 %): "
        f"{versus(rows, 'attack_trigger2', 'clean', 'implant', 'implant_2px', against='for the clean run')}; "
        f"seeds above the clean floor: {_frac(carried(rows, 'attack_trigger2'))}."
      )
    text += (
      f" Fidelity: SWD ×1e3 {versus(rows, 'attack', 'clean', 'swd', digits=1, against='clean')}; diversity "
      f"{versus(rows, 'attack', 'clean', 'diversity', digits=2, against='clean')}."
    )
    text += " The implant is real here." if implanted else " At this scale the implant is not distinguishable."
    out.append(text)
  if have("clean", "attack"):
    parts = []
    for setting, name in (("attack+detect", "Detection"), ("attack+gp", "WGAN-GP")):
      if not have(setting):
        continue
      px = _trigger_px(rows, setting)
      below_attack = distinguishable(rows, setting, "attack", "implant")
      from_clean = distinguishable(rows, setting, "clean", "implant", f"implant_{px}px")
      lower = st.mean_ci(values(rows, setting, "implant")).mean < st.mean_ci(values(rows, "attack", "implant")).mean
      if below_attack and lower and not from_clean:
        verdict = "removes the implant (below the attack's, not distinguishable from clean)"
      elif below_attack and lower:
        verdict = "reduces the implant but does not remove it (still distinguishable from clean)"
      elif below_attack:
        verdict = "raises the implant"
      else:
        verdict = "does not change the implant distinguishably"
      parts.append(
        f"{name} {verdict}: {versus(rows, setting, 'attack', 'implant', against='for the attack alone')}. "
        f"Its fidelity cost: SWD ×1e3 {versus(rows, setting, 'attack', 'swd', digits=1, against='without a defense')};"
        f" {versus(rows, setting, 'clean', 'swd', digits=1, against='clean')}."
      )
    if parts:
      out.append(f"* *“{_PAPER[1]}.”* " + " ".join(parts))
  if have("clean", "attack", "attack+both"):
    px = _trigger_px(rows, "attack+both")
    robust = not distinguishable(rows, "attack+both", "clean", "implant", f"implant_{px}px") and not distinguishable(
      rows, "attack+both", "clean", "swd"
    )
    out.append(
      f"* *“{_PAPER[2]}.”* Both defenses: implant "
      f"{versus(rows, 'attack+both', 'clean', 'implant', f'implant_{px}px', against='for the clean run')}; SWD ×1e3 "
      f"{versus(rows, 'attack+both', 'clean', 'swd', digits=1, against='clean')}; diversity "
      f"{versus(rows, 'attack+both', 'clean', 'diversity', digits=2, against='clean')}. "
      + (
        "Agrees: neither the implant nor the fidelity is distinguishable from the clean run."
        if robust
        else "Does not agree at this scale: the implant or the fidelity is distinguishable from the clean run."
      )
    )
  if have("clean+detect"):
    k, n = shut_out(rows, "clean+detect")
    out.append(
      "* **Detection on a benign run** (not in the paper's text): the detector flags someone in "
      f"{cell(rows, 'clean+detect', 'rounds_flagged', pct=True)} of the rounds after its warm-up and the flags change "
      f"weights in {cell(rows, 'clean+detect', 'rounds_acted', pct=True)} (false-positive rate of the flags "
      f"{cell(rows, 'clean+detect', 'fpr_flagged', 2)}, of the acted-on flags "
      f"{cell(rows, 'clean+detect', 'fpr_acted', 2)})."
      f" The largest honest client ends with {cell(rows, 'clean+detect', 'honest_weight_max')} of the weight (1/C = "
      f"0.25 without detection); in {k} of {n} seeds one honest client holds at least {SHUT_OUT}: the global "
      "generator is then essentially one hospital's model. Its fidelity: SWD ×1e3 "
      f"{versus(rows, 'clean+detect', 'clean', 'swd', digits=1, against='without detection')}."
    )
  if have("noniid+detect", "clean+detect"):
    more = distinguishable(rows, "noniid+detect", "clean+detect", "fpr_flagged")
    out.append(
      "* **Label-skewed honest clients** (Dirichlet 0.3, no attacker): false-positive rate of the flags "
      f"{versus(rows, 'noniid+detect', 'clean+detect', 'fpr_flagged', digits=2, against='for IID clients')}: "
      + (
        "heterogeneity changes how often honest clients are flagged." if more else "heterogeneity is not flagged more."
      )
      + f" The largest honest client ends with {cell(rows, 'noniid+detect', 'honest_weight_max')} of the weight."
    )
  if have("mimic+detect", "mimic+detect_server"):
    out.append(
      "* **An attacker who knows the defense** (not evaluated in the paper) reports the honest median loss: "
      f"loss-based detection acts on it in {cell(rows, 'mimic+detect', 'tpr_acted', pct=True)} of the rounds "
      f"(implant {cell(rows, 'mimic+detect', 'implant')}); detection on statistics the server computes from the "
      f"upload (update norm, distance to the median) in {cell(rows, 'mimic+detect_server', 'tpr_acted', pct=True)} "
      f"(implant {cell(rows, 'mimic+detect_server', 'implant')}; "
      f"{versus(rows, 'mimic+detect_server', 'mimic+detect', 'implant', against='for loss-based detection')})."
    )
  sizes = [s for s in ("attack_trigger2", "attack", "attack_trigger8") if have(s)]
  if len(sizes) > 1 and have("clean"):
    parts = [
      f"{_trigger_px(rows, s)}×{_trigger_px(rows, s)} px {cell(rows, s, 'implant')} "
      f"({_frac(carried(rows, s))} seeds above the clean floor {_num(floor(rows, _trigger_px(rows, s)) or 0, 3)})"
      for s in sizes
    ]
    first, last = sizes[0], sizes[-1]
    out.append(
      "* **Trigger size**: implant "
      + ", ".join(parts)
      + f"; the smallest trigger's against the largest's: {versus(rows, first, last, 'implant')}."
    )
  return out


def _rounds(rows: Sequence[Row]) -> int:
  return int(max((r.get("rounds") or 0) for r in rows)) if rows else 0


def _width(rows: Sequence[Row]) -> str:
  widths = sorted({int(r["width"]) for r in rows if r.get("width")})
  return "/".join(map(str, widths)) or "?"


def render(rows: Sequence[Row], prov: dict[str, Any], collapsed_below: float = 0.25) -> str:
  """The whole page."""
  wall = prov.get("wall_sec")
  per_setting: dict[str, float] = {}  # A setting's seeds train as one program: each row carries its wall time.
  for r in rows:
    per_setting[r["setting"]] = max(per_setting.get(r["setting"], 0.0), r.get("wall_sec") or 0.0)
  total = sum(per_setting.values())
  n_seeds = max((_seeds(rows, s) for s in per_setting), default=0)
  data = prov.get("data", "synthetic")
  lines = [
    f"# Results: the paper's settings, {n_seeds} seeds each",
    "",
    f"Generated by `{prov['command']}` from commit `{prov['commit']}` on {prov['date']} "
    f"({prov['machine']}); every number below is computed from `results.csv` beside this page (one row per "
    f"seed). The runs' own wall time (one program per setting, its seeds vmapped) adds up to {total / 60:.0f} min"
    + (f"; this regeneration took {wall / 60:.0f} min end to end" if wall else "")
    + ". `configs/results.py` defines the settings: "
    + ("32 px synthetic dermoscopy data" if data == "synthetic" else f"data from `data.source={data}`")
    + ", 4 clients (client 0 malicious unless the setting has no attacker), DCGAN G/D of width "
    f"{_width(rows)}, batch 32, 5 local steps, {_rounds(rows)} rounds; detection is the paper's code's rule "
    "(Isolation Forest on |G loss of the last local batch|, acted on from round index 11 when fewer than C // 2 "
    "clients are flagged, persistent decay 0.9); "
    "WGAN-GP is λ = 10, InstanceNorm D (also after its first conv, as the code's critic), RMSprop with PyTorch's "
    "semantics and the code's N(0, 1) interpolation.",
    "",
    "**How to read it.** Each cell is the mean over seeds with its 95 % bootstrap CI over seeds in brackets; a "
    "run's value is its mean over the evaluations of the second half (every 10 rounds: the implant comes and goes "
    "between rounds). **Implant**: the median amount of the trigger blended into its region in 512 generated "
    "images (0 = none, 1 = pasted: `metrics.trigger.implant_amplitude`) against the same on 512 clean held-out "
    "real images, so 0.05 means a ghost at 5 % of the trigger's contrast; it reads the same for every trigger "
    "size, pattern and resolution (docs/design.md gives its noise floor). **Seeds above the clean floor**: seeds "
    "whose implant exceeds every clean seed's read with the same template (a trained generator's own noise). "
    "**Above clean p99**: the fraction of generated images above the clean images' 99th percentile (calibrated "
    "on half of them; its rate on the other half is in the CSV): a steep, size-dependent function of the "
    "amplitude, not a fraction of images that carry the trigger. **Diversity**: the spread of the samples "
    f"relative to real images (1 = as diverse, below {collapsed_below} = collapsed). **SWD** ×1e3 against clean "
    "held-out images (lower is better). Detection rates are over the rounds after the warm-up: *flagged* counts "
    "the detector's flags, *acted* only those that changed weights (the rule ignores a round's flags when C // 2 "
    "or more clients are flagged). Two settings are *distinguishable* when their CIs do not overlap and a "
    "two-sided Mann-Whitney U test gives p < 0.05.",
    "",
    "## The paper's settings",
    "",
  ]
  imp = lambda s: cell(rows, s, "implant")
  lines += _table(
    rows,
    ("clean", "attack", "attack+detect", "attack+gp", "attack+both"),
    [
      ("implant", imp),
      ("seeds above the clean floor", lambda s: "–" if s == "clean" else _frac(carried(rows, s))),
      ("above clean p99", lambda s: cell(rows, s, "above_p99", 2)),
      ("diversity", lambda s: cell(rows, s, "diversity", 2)),
      ("SWD ×1e3", lambda s: cell(rows, s, "swd", 1)),
      ("attacker's final weight", lambda s: cell(rows, s, "attacker_weight")),
      ("largest honest weight", lambda s: cell(rows, s, "honest_weight_max")),
    ],
  )
  lines += ["", "## Detection: what it flags, what it acts on, who keeps the weight", ""]
  lines += _table(
    rows,
    ("attack+detect", "attack+both", "clean+detect", "noniid+detect", "mimic+detect", "mimic+detect_server"),
    [
      ("TPR flagged", lambda s: cell(rows, s, "tpr_flagged", 2)),
      ("TPR acted", lambda s: cell(rows, s, "tpr_acted", 2)),
      ("FPR flagged", lambda s: cell(rows, s, "fpr_flagged", 2)),
      ("FPR acted", lambda s: cell(rows, s, "fpr_acted", 2)),
      ("rounds acted", lambda s: cell(rows, s, "rounds_acted", pct=True)),
      ("attacker's final weight", lambda s: cell(rows, s, "attacker_weight")),
      ("honest weights, min", lambda s: cell(rows, s, "honest_weight_min")),
      ("max", lambda s: cell(rows, s, "honest_weight_max")),
      (f"seeds with an honest client ≥ {SHUT_OUT}", lambda s: _frac(shut_out(rows, s))),
      ("implant", imp),
    ],
  )
  lines += ["", "## The trigger's size", ""]
  lines += [
    "| trigger | area of the image | seeds | implant | clean run, same template | seeds above the clean floor "
    "| above clean p99 | SWD ×1e3 |",
    "| --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for s in ("attack_trigger2", "attack", "attack_trigger8"):
    sized = [r for r in rows if r["setting"] == s]
    if sized:
      px, area = sized[0]["trigger_px"], sized[0]["trigger_area_pct"]
      paper = " (the paper: 16×16 on 256×256)" if abs(area - 0.39) < 0.01 else ""
      lines.append(
        f"| {px}×{px} px (`{s}`) | {area:.2f} %{paper} | {len(sized)} | {imp(s)} | "
        f"{cell(rows, 'clean', f'implant_{px}px')} | {_frac(carried(rows, s))} | {cell(rows, s, 'above_p99', 2)} | "
        f"{cell(rows, s, 'swd', 1)} |"
      )
  collapsed = [(s, _collapsed(rows, s, collapsed_below)) for s in per_setting]
  collapsed = [(s, kn) for s, kn in collapsed if kn[0]]
  lines += ["", "## Mode collapse", ""]
  lines.append(
    f"No run collapsed: every seed's diversity stays at or above {collapsed_below} in the second half."
    if not collapsed
    else "Seeds whose samples collapsed (diversity below "
    f"{collapsed_below} in the second half): "
    + "; ".join(f"`{s}` {k} of {n}" for s, (k, n) in collapsed)
    + ". Their implant is read on nearly one image, and their SWD is that image's distance to the data."
  )
  lines += ["", "## What the paper claims and what these runs say", ""]
  lines.append(
    "The paper's claims, quoted from its abstract (Jin & Li, SASHIMI 2022, arXiv 2207.00762), each followed by "
    "the rows' verdict; bold items are questions the paper does not address."
  )
  lines.append("")
  lines += _claims(rows)
  lines += [
    "",
    "The paper trains a StyleGAN2 generator at 256 px on ISIC images for 200 rounds of one local epoch; this page "
    "is the same federated system at CPU scale, so agreement in direction, not in numbers, is the claim. "
    "`configs/paper_full.py` is the paper's scale, for an accelerator.",
    "",
    "## The same settings on real images",
    "",
    "The embedded synthetic data is easier than real images. To run every setting above on a folder of your own "
    "images (e.g. ISIC dermoscopy, resized to 32 px on load) and get this page for them:",
    "",
    "```bash",
    "python -m launch.results --workdir runs/results_isic --out results_isic \\",
    "  --set data.source=folder --set data.path=/data/ISIC",
    "```",
    "",
    "No real images are shipped with the project, and none were available where this page was generated.",
  ]
  return "\n".join(lines) + "\n"
