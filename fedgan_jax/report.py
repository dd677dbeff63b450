"""Plots and an HTML page for one run, or a comparison table for a sweep.

    python -m fedgan_jax.report --workdir runs/default   # one run  -> runs/default/report/
    python -m fedgan_jax.report --workdir runs/sweep     # a sweep  -> runs/sweep/report/

A *run directory* holds ``metrics.jsonl`` (and normally ``config.json``,
``summary.json``, ``samples/``). A *sweep directory* holds run directories
(each with ``summary.json`` and ``config.json``) as children or grandchildren.

Library use (the experiment loop calls the first at the end of every run)::

    from fedgan_jax import report
    paths = report.write_run_report(workdir)       # PNG plots, samples strip/GIF, report.html
    paths = report.write_sweep_report(sweep_dir)   # comparison.csv/.html, final_metrics.png

Metric names are honest: only ``eval/fid@inception_v3`` is called "FID"
(and ``kid@inception_v3`` "KID"); Fréchet/kernel distances in other feature
spaces are labelled "FD (<extractor> features)" / "KD (<extractor> features)".

Figures are drawn with matplotlib's object-oriented API on the Agg canvas
(``matplotlib.figure.Figure``), so calling these functions inside another
program (or a notebook) never touches the global pyplot backend; the command
line additionally selects ``matplotlib.use("Agg")``.
"""

from __future__ import annotations

import argparse
import csv
import glob
import html
import json
import math
import os
import re
import sys
from typing import Any, Iterable, Sequence

import numpy as np

REPORT_DIR = "report"
MAX_STRIP = 8
ATTACKER_COLOR = "#d62728"
_HONEST_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2",
                  "#7f7f7f", "#bcbd22", "#17becf"]  # tab10 without its red.
_FIDELITY_PREFIXES = ("eval/swd", "eval/fid@", "eval/kid@", "eval/precision@", "eval/recall@")


class NotARunError(ValueError):
  """The directory is neither a run directory nor a sweep directory."""


# ----------------------------------------------------------------------------- names


def metric_label(key: str) -> str:
  """A human, honest name for a metric key.

  Args:
    key: A ``metrics.jsonl``/``summary.json`` key, e.g. ``eval/fid@effnet_lite0``.

  Returns:
    E.g. ``"FID"`` for ``eval/fid@inception_v3``, ``"FD (effnet_lite0 features)"``
    for ``eval/fid@effnet_lite0``, ``"SWD ×1e3 (Laplacian-pyramid patches)"``.
  """
  name = key[len("eval/"):] if key.startswith("eval/") else key
  base, _, ext = name.partition("@")
  if base == "fid":
    return "FID" if ext == "inception_v3" else f"FD ({ext} features)"
  if base == "kid":
    return "KID" if ext == "inception_v3" else f"KD ({ext} features)"
  if base in ("precision", "recall") and ext:
    return f"{base} ({ext} features)"
  fixed = {
      "swd": "SWD ×1e3 (Laplacian-pyramid patches)",
      "trigger_rate": "trigger rate",
      "trigger_strength": "trigger strength",
      "detect_tpr": "detection TPR",
      "detect_fpr": "detection FPR",
      "detect_tpr_mean": "detection TPR (mean over rounds)",
      "detect_fpr_mean": "detection FPR (mean over rounds)",
      "first_flag_round": "first flag round (earliest attacker)",
      "nonfinite_samples": "non-finite samples",
      "train/g_loss": "G loss (mean over local steps)",
      "train/d_loss": "D loss (mean over local steps)",
      "train/g_loss_last": "G loss (last local step)",
      "train/d_loss_last": "D loss (last local step)",
      "train/update_norm": "G update norm ‖Δθ‖",
      "agg/weights": "aggregation weight",
  }
  return fixed.get(name, fixed.get(key, key))


def _fmt(v: Any) -> str:
  """Compact value formatting for tables (None/NaN -> 'n/a')."""
  if v is None:
    return "n/a"
  if isinstance(v, bool):
    return str(v)
  if isinstance(v, int):
    return str(v)
  if isinstance(v, float):
    if not math.isfinite(v):
      return "n/a"
    if v == 0:
      return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
      return f"{v:.3e}"
    return f"{v:.4g}"
  if isinstance(v, (list, tuple)):
    return "[" + ", ".join(_fmt(x) for x in v) + "]"
  return str(v)


# ----------------------------------------------------------------------------- loading


def _read_json(path: str) -> Any:
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def _read_records(path: str) -> list[dict[str, Any]]:
  """``metrics.jsonl`` records sorted by round; unparsable lines (a run killed mid-write) skipped."""
  records = []
  with open(path) as f:
    for ln in f:
      ln = ln.strip()
      if not ln:
        continue
      try:
        rec = json.loads(ln)
      except json.JSONDecodeError:
        continue
      if isinstance(rec, dict) and "round" in rec:
        records.append(rec)
  records.sort(key=lambda r: r["round"])
  return records


def is_run_dir(path: str) -> bool:
  """Whether ``path`` holds a run's ``metrics.jsonl``."""
  return os.path.isfile(os.path.join(path, "metrics.jsonl"))


def _is_sweep_member(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "summary.json")) and os.path.isfile(os.path.join(path, "config.json"))


def find_runs(sweep_dir: str) -> list[str]:
  """Run directories of a sweep: children, or grandchildren, with summary.json + config.json.

  Args:
    sweep_dir: The sweep's root directory.

  Returns:
    Sorted absolute paths.
  """
  runs = []
  for child in sorted(os.listdir(sweep_dir)):
    p = os.path.join(sweep_dir, child)
    if not os.path.isdir(p) or child == REPORT_DIR:
      continue
    if _is_sweep_member(p):
      runs.append(p)
      continue
    for grandchild in sorted(os.listdir(p)):
      q = os.path.join(p, grandchild)
      if os.path.isdir(q) and _is_sweep_member(q):
        runs.append(q)
  return runs


class _Run:
  """One run directory, loaded."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.records = _read_records(os.path.join(workdir, "metrics.jsonl"))
    self.config = _read_json(os.path.join(workdir, "config.json")) or {}
    self.summary = _read_json(os.path.join(workdir, "summary.json")) or {}
    self.calibration = _read_json(os.path.join(workdir, "trigger_calibration.json")) or {}
    self.rounds = np.array([r["round"] for r in self.records], dtype=float)
    lens = [len(v) for r in self.records for k, v in r.items() if k.startswith(("train/", "agg/"))
            and isinstance(v, list)]
    self.num_clients = max(lens) if lens else int(self.config.get("num_clients", 0) or 0)
    mal = self.summary.get("malicious", None)
    if mal is None:
      mal = (self.config.get("attack") or {}).get("malicious", [])
    self.malicious = sorted({int(c) for c in (mal or []) if 0 <= int(c) < max(self.num_clients, 1)})

  def keys(self) -> list[str]:
    out: dict[str, None] = {}
    for r in self.records:
      out.update(dict.fromkeys(r))
    return list(out)

  def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Rounds and float values where ``key`` is a finite scalar."""
    xs, ys = [], []
    for r in self.records:
      v = r.get(key)
      if isinstance(v, bool):
        v = float(v)
      if isinstance(v, (int, float)) and math.isfinite(v):
        xs.append(r["round"])
        ys.append(float(v))
    return np.array(xs, dtype=float), np.array(ys, dtype=float)

  def matrix(self, key: str) -> np.ndarray | None:
    """``[C, R]`` floats of a per-client list metric (NaN where missing/null); None if absent."""
    if not any(isinstance(r.get(key), list) for r in self.records):
      return None
    m = np.full((self.num_clients, len(self.records)), np.nan)
    for j, r in enumerate(self.records):
      v = r.get(key)
      if not isinstance(v, list):
        continue
      for c, x in enumerate(v[: self.num_clients]):
        if isinstance(x, bool):
          x = float(x)
        if isinstance(x, (int, float)) and math.isfinite(x):
          m[c, j] = float(x)
    return m

  @property
  def final(self) -> dict[str, Any]:
    if isinstance(self.summary.get("final"), dict):
      return self.summary["final"]
    final: dict[str, Any] = {}
    for rec in self.records:
      final.update({k: v for k, v in rec.items() if not k.startswith("z/") and v is not None})
    return final

  def first_flag_rounds(self) -> dict[int, int | None]:
    """First round each attacker was flagged (from summary.json, else from the records)."""
    ff = self.summary.get("first_flag_round")
    if isinstance(ff, dict):
      return {int(k): v for k, v in ff.items()}
    flagged = self.matrix("agg/flagged")
    out: dict[int, int | None] = {}
    for c in self.malicious:
      idx = np.flatnonzero(flagged[c] > 0.5) if flagged is not None else []
      out[c] = int(self.rounds[idx[0]]) if len(idx) else None
    return out

  def samples(self) -> list[tuple[int, str]]:
    """``(round, path)`` of the sample grids, by round."""
    out = []
    for p in glob.glob(os.path.join(self.workdir, "samples", "round_*.png")):
      m = re.search(r"round_(\d+)\.png$", p)
      if m:
        out.append((int(m.group(1)), p))
    return sorted(out)


# ----------------------------------------------------------------------------- plotting helpers


def _figure(width: float, height: float):
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path: str, dpi: int = 110, tight: bool = False) -> str:
  fig.savefig(path, dpi=dpi, **({"bbox_inches": "tight", "pad_inches": 0.05} if tight else {}))
  return path


def _client_styles(num_clients: int, malicious: Sequence[int]) -> list[dict[str, Any]]:
  """Line style per client: attackers red and thick, honest clients coloured (or grey when many)."""
  honest = [c for c in range(num_clients) if c not in malicious]
  many = len(honest) > len(_HONEST_COLORS)
  styles = []
  for c in range(num_clients):
    if c in malicious:
      styles.append(dict(color=ATTACKER_COLOR, lw=2.2, zorder=3, alpha=1.0, label=f"client {c} (attacker)"))
    elif many:
      styles.append(dict(color="#4a6fa5", lw=0.8, zorder=2, alpha=0.35,
                         label=f"honest clients ({len(honest)})" if c == honest[0] else None))
    else:
      styles.append(dict(color=_HONEST_COLORS[honest.index(c)], lw=1.2, zorder=2, alpha=0.9,
                         label=f"client {c}"))
  return styles


def _edges(x: np.ndarray) -> np.ndarray:
  """Cell edges around sorted centres (rounds) for pcolormesh."""
  if len(x) == 1:
    return np.array([x[0] - 0.5, x[0] + 0.5])
  mid = (x[1:] + x[:-1]) / 2
  return np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])


def _client_axis(ax, num_clients: int, malicious: Sequence[int]) -> None:
  """Y ticks 'client k', attackers in red bold; thinned when there are many clients."""
  step = 1 if num_clients <= 16 else int(math.ceil(num_clients / 16))
  regular = [c for c in range(0, num_clients, step) if all(abs(c - m) * 2 >= step for m in malicious)]
  ticks = sorted(set(regular) | set(malicious))  # Attackers always labelled, neighbours thinned out.
  ax.set_yticks(ticks)
  labels = [f"client {c}" + (" (attacker)" if c in malicious else "") for c in ticks]
  ax.set_yticklabels(labels, fontsize=8 if num_clients <= 32 else 6)
  for lbl, c in zip(ax.get_yticklabels(), ticks):
    if c in malicious:
      lbl.set_color(ATTACKER_COLOR)
      lbl.set_fontweight("bold")
  ax.set_ylim(num_clients - 0.5, -0.5)


def _mark_attacker_rows(ax, x_edges: np.ndarray, malicious: Sequence[int]) -> None:
  for c in malicious:
    ax.add_patch(_rect((x_edges[0], c - 0.5), x_edges[-1] - x_edges[0], 1.0))


def _rect(xy, w, h):
  from matplotlib.patches import Rectangle  # pylint: disable=import-outside-toplevel
  return Rectangle(xy, w, h, fill=False, edgecolor=ATTACKER_COLOR, lw=1.5, zorder=4)


def _heat_height(num_clients: int) -> float:
  return min(max(1.6, 0.22 * num_clients + 1.0), 6.5)


def _round_axis(ax, rounds: np.ndarray) -> None:
  from matplotlib.ticker import MaxNLocator  # pylint: disable=import-outside-toplevel
  if 0 < len(rounds) <= 12:
    ax.set_xticks(rounds)
  else:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=10))
  if len(rounds) == 1:
    ax.set_xlim(rounds[0] - 1, rounds[0] + 1)


# ----------------------------------------------------------------------------- run figures


def _plot_fidelity(run: _Run, path: str) -> str | None:
  keys = [k for k in run.keys() if k.startswith(_FIDELITY_PREFIXES)]
  order = {p: i for i, p in enumerate(_FIDELITY_PREFIXES)}
  keys.sort(key=lambda k: (min(order[p] for p in _FIDELITY_PREFIXES if k.startswith(p)), k))
  data = [(k, *run.series(k)) for k in keys]
  data = [d for d in data if len(d[1])]
  if not data:
    return None
  ncols = min(3, len(data))
  nrows = int(math.ceil(len(data) / ncols))
  fig = _figure(max(4.2 * ncols, 6.5), 3.0 * nrows + 0.3)
  axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
  for ax, (k, x, y) in zip(axes, data):
    ax.plot(x, y, "o-", color="#1f77b4", ms=4)
    better = "higher" if k.startswith(("eval/precision", "eval/recall")) else "lower"
    ax.set_title(f"{metric_label(k)}\n({better} is better)", fontsize=9.5)
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)
    _round_axis(ax, x)
  for ax in axes[len(data):]:
    ax.set_visible(False)
  fig.suptitle("Global generator vs clean held-out images", fontsize=11)
  return _save(fig, path)


def _plot_trigger(run: _Run, path: str) -> str | None:
  rate = run.series("eval/trigger_rate")
  strength = run.series("eval/trigger_strength")
  if not len(rate[0]) and not len(strength[0]):
    return None
  fig = _figure(9.0, 3.2)
  ax1, ax2 = fig.subplots(1, 2)
  if len(rate[0]):
    ax1.plot(*rate, "o-", color=ATTACKER_COLOR, ms=4, label="generated images")
  clean = run.calibration.get("clean_real_rate")
  if isinstance(clean, (int, float)):
    ax1.axhline(clean, color="0.4", ls=":", lw=1.2, label=f"clean real images ({float(clean):.1%})")
  ax1.set_ylim(-0.03, 1.03)
  ax1.set_title("trigger rate: fraction of samples carrying the trigger", fontsize=9.5)
  ax1.set_xlabel("round")
  ax1.set_ylabel("fraction")
  ax1.legend(fontsize=8, loc="best")
  if len(strength[0]):
    ax2.plot(*strength, "o-", color="#9467bd", ms=4)
    lo, hi = min(0.0, float(np.min(strength[1]))), max(1.0, float(np.max(strength[1])))
    ax2.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
  ax2.axhline(1.0, color="0.4", ls="--", lw=1, label="1 = fully pasted")
  ax2.axhline(0.0, color="0.4", ls=":", lw=1, label="0 = absent")
  ax2.set_title("trigger strength (median regression coefficient)", fontsize=9.5)
  ax2.set_xlabel("round")
  ax2.legend(fontsize=8, loc="best")
  for ax, s in ((ax1, rate), (ax2, strength)):
    ax.grid(alpha=0.3)
    _round_axis(ax, s[0] if len(s[0]) else run.rounds)
  return _save(fig, path)


def _plot_weights(run: _Run, path: str) -> str | None:
  w = run.matrix("agg/weights")
  if w is None or not len(run.rounds):
    return None
  c = run.num_clients
  xe = _edges(run.rounds)
  with_share = bool(run.malicious) and c > 1
  h = _heat_height(c) + (1.9 if with_share else 0.0)
  fig = _figure(9.0, h + 0.8)
  if with_share:
    ax, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=[_heat_height(c), 1.9])
  else:
    ax = fig.subplots(1, 1)
  vmax = float(np.nanmax(w)) if np.isfinite(w).any() else 1.0
  mesh = ax.pcolormesh(xe, np.arange(c + 1) - 0.5, np.ma.masked_invalid(w), cmap="viridis",
                       vmin=0.0, vmax=max(vmax, 1e-12))
  cb = fig.colorbar(mesh, ax=ax, pad=0.01)
  cb.set_label("weight", fontsize=8)
  _client_axis(ax, c, run.malicious)
  _mark_attacker_rows(ax, xe, run.malicious)
  ax.set_title(f"Aggregation weight per client and round (uniform = 1/C = {1.0 / max(c, 1):.3g}"
               + ("; attackers outlined in red)" if run.malicious else "; no attackers)"), fontsize=9.5)
  if with_share:
    share = np.nansum(w[run.malicious], axis=0)
    ax2.plot(run.rounds, share, "-", color=ATTACKER_COLOR, lw=1.8, marker="o" if len(run.rounds) < 30 else None,
             ms=3, label="attackers' total weight")
    ax2.axhline(len(run.malicious) / c, color="0.3", ls="--", lw=1,
                label=f"their uniform share |M|/C = {len(run.malicious) / c:.3g}")
    top = max(float(np.nanmax(share)) if np.isfinite(share).any() else 0.0, len(run.malicious) / c) * 1.15
    ax2.set_ylim(-0.03 * top, top)
    ax2.set_ylabel("weight", fontsize=8)
    ax2.legend(fontsize=8, loc="best")
    ax2.grid(alpha=0.3)
    ax2.set_xlabel("round")
  else:
    ax.set_xlabel("round")
  _round_axis(ax, run.rounds)
  ax.set_xlim(xe[0], xe[-1])
  return _save(fig, path)


def _plot_losses(run: _Run, path: str) -> str | None:
  panels = [(k, run.matrix(k)) for k in ("train/g_loss", "train/d_loss", "train/update_norm")]
  panels = [(k, m) for k, m in panels if m is not None and np.isfinite(m).any()]
  if not panels:
    return None
  styles = _client_styles(run.num_clients, run.malicious)
  marker = "o" if len(run.rounds) <= 20 else None
  fig = _figure(4.3 * len(panels), 3.4)
  axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)).ravel()
  # Honest first, attackers on top.
  order = [c for c in range(run.num_clients) if c not in run.malicious] + list(run.malicious)
  for ax, (k, m) in zip(axes, panels):
    for c in order:
      ax.plot(run.rounds, m[c], marker=marker, ms=3, **styles[c])
    ax.set_title(metric_label(k), fontsize=10)
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)
    _round_axis(ax, run.rounds)
  handles, labels = axes[0].get_legend_handles_labels()
  if handles:
    by_label = dict(zip(labels, handles))
    fig.legend(list(by_label.values()), list(by_label.keys()), loc="outside right upper", fontsize=8)
  fig.suptitle("Local training per client (reported by each client)", fontsize=11)
  return _save(fig, path)


def _plot_detection(run: _Run, path: str) -> str | None:
  flagged = run.matrix("agg/flagged")
  if flagged is None or not np.nansum(flagged) > 0:
    return None
  from matplotlib.colors import ListedColormap  # pylint: disable=import-outside-toplevel
  c = run.num_clients
  xe = _edges(run.rounds)
  scores = run.matrix("agg/scores")
  has_scores = scores is not None and np.isfinite(scores).any()
  tpr, fpr = run.series("eval/detect_tpr"), run.series("eval/detect_fpr")
  has_rates = bool(len(tpr[0]) or len(fpr[0]))
  ratios = [_heat_height(c)] + ([2.2] if has_scores else []) + ([1.8] if has_rates else [])
  fig = _figure(9.0, sum(ratios) + 0.8)
  axes = np.atleast_1d(fig.subplots(len(ratios), 1, sharex=True, height_ratios=ratios, squeeze=False)).ravel()
  ax = axes[0]
  ax.pcolormesh(xe, np.arange(c + 1) - 0.5, np.ma.masked_invalid(flagged),
                cmap=ListedColormap(["#eeeeee", "#ff7f0e"]), vmin=0, vmax=1)
  nonfinite = run.matrix("agg/nonfinite")
  if nonfinite is not None and np.nansum(nonfinite) > 0:
    cc, jj = np.nonzero(nonfinite > 0.5)
    ax.plot(run.rounds[jj], cc, "kx", ms=5, label="non-finite update")
    ax.legend(fontsize=8, loc="upper right")
  _client_axis(ax, c, run.malicious)
  _mark_attacker_rows(ax, xe, run.malicious)
  n_flag = np.nansum(flagged, axis=1).astype(int)
  title = "Flagged by the server's detector (orange); " + (
      "attackers outlined in red" if run.malicious else "no attackers in this run")
  if c <= 8:
    title += f" — times flagged: {', '.join(f'c{i}={n}' for i, n in enumerate(n_flag) if n)}"
  ax.set_title(title, fontsize=9)
  i = 1
  if has_scores:
    styles = _client_styles(c, run.malicious)
    for k in [k for k in range(c) if k not in run.malicious] + list(run.malicious):
      axes[i].plot(run.rounds, scores[k], **styles[k])
    axes[i].set_ylabel("anomaly score", fontsize=8)
    axes[i].grid(alpha=0.3)
    h, lb = axes[i].get_legend_handles_labels()
    d = dict(zip(lb, h))
    if len(d) <= 10:
      axes[i].legend(d.values(), d.keys(), fontsize=7, loc="best", ncol=2)
    i += 1
  if has_rates:
    if len(tpr[0]):
      axes[i].plot(*tpr, "-", color=ATTACKER_COLOR, lw=1.5, label="TPR (attackers flagged)")
    if len(fpr[0]):
      axes[i].plot(*fpr, "-", color="#1f77b4", lw=1.5, label="FPR (honest flagged)")
    axes[i].set_ylim(-0.05, 1.05)
    axes[i].set_ylabel("rate", fontsize=8)
    axes[i].legend(fontsize=8, loc="best")
    axes[i].grid(alpha=0.3)
  axes[-1].set_xlabel("round")
  _round_axis(axes[-1], run.rounds)
  axes[0].set_xlim(xe[0], xe[-1])
  return _save(fig, path)


def _load_grid(path: str):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with Image.open(path) as im:
    return im.convert("RGB")


def _plot_strip(samples: list[tuple[int, str]], path: str) -> str | None:
  if not samples:
    return None
  idx = np.unique(np.round(np.linspace(0, len(samples) - 1, min(len(samples), MAX_STRIP))).astype(int))
  chosen = [samples[i] for i in idx]
  grids = [np.asarray(_load_grid(p)) for _, p in chosen]
  h, w = grids[0].shape[:2]
  panel_w = 3.0  # inches; the pixel size is set by the dpi below.
  # Each panel at most its native width, the whole strip at most ~2800 px wide.
  panel_px = min(max(min(w, 2800 / len(grids)), 220), 520)
  dpi = max(int(panel_px / panel_w), 60)
  fig = _figure(panel_w * len(grids), panel_w * h / w + 0.3)
  axes = np.atleast_1d(fig.subplots(1, len(grids), squeeze=False)).ravel()
  for ax, (r, _), g in zip(axes, chosen, grids):
    ax.imshow(g, interpolation="antialiased")  # Box-filtered when shrunk, nearest when enlarged.
    ax.set_title(f"round {r}", fontsize=9)
    ax.set_axis_off()
  return _save(fig, path, dpi=dpi, tight=True)


def _write_gif(samples: list[tuple[int, str]], path: str) -> str | None:
  if not samples:
    return None
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=import-outside-toplevel
  first = _load_grid(samples[0][1])
  # Small grids enlarged (nearest) to >= 256 px, large ones shrunk by an integer factor to <= 640 px.
  up = max(1, int(math.ceil(256 / max(min(first.size), 1))))
  down = max(1, int(math.ceil(max(first.size) / 640)))
  size = ((first.size[0] * up) // down, (first.size[1] * up) // down)
  band = 20
  try:
    font = ImageFont.load_default(size=14)
  except TypeError:  # Pillow < 10.1
    font = ImageFont.load_default()
  frames = []
  for r, p in samples:
    g = _load_grid(p)
    if g.size != first.size:
      g = g.resize(first.size, Image.NEAREST)
    g = g.resize(size, Image.NEAREST if down == 1 else Image.BOX)
    frame = Image.new("RGB", (size[0], size[1] + band), "white")
    frame.paste(g, (0, band))
    ImageDraw.Draw(frame).text((4, 2), f"round {r}", fill="black", font=font)
    frames.append(frame)
  durations = [400] * (len(frames) - 1) + [1500]
  frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
  return path


# ----------------------------------------------------------------------------- run HTML

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:24px auto;
     padding:0 16px;color:#222}
h1{font-size:1.4em;margin-bottom:4px} h2{font-size:1.15em;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em;margin:8px 0} th,td{border:1px solid #ddd;padding:3px 8px;
text-align:left} th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.attacker td{color:#b01c1c;font-weight:600} img{max-width:100%;margin:8px 0;border:1px solid #eee}
pre{background:#f8f8f8;padding:8px;overflow-x:auto;font-size:.8em} .muted{color:#777;font-size:.85em}
code{background:#f3f3f3;padding:0 3px}
"""


def _final_metric_keys(final: dict[str, Any]) -> list[str]:
  first = ["eval/trigger_rate", "eval/trigger_strength", "eval/swd"]
  keys = [k for k in first if k in final]
  keys += sorted(k for k in final if k.startswith(("eval/fid@", "eval/kid@", "eval/precision@", "eval/recall@")))
  keys += [k for k in ("eval/detect_tpr", "eval/detect_fpr", "eval/nonfinite_samples") if k in final]
  keys += sorted(k for k in final if k.startswith("eval/") and k not in keys)
  return keys


def _row(cells: Iterable[str], cls: str = "", header: bool = False) -> str:
  tag = "th" if header else "td"
  attr = f' class="{cls}"' if cls else ""
  return f"<tr{attr}>" + "".join(f"<{tag}>{c}</{tag}>" if not c.startswith("<td") else c for c in cells) + "</tr>"


def _num(v: Any) -> str:
  return f'<td class="num">{html.escape(_fmt(v))}</td>'


def _wall(run: _Run) -> str:
  wall = run.summary.get("wall_sec")
  if not isinstance(wall, (int, float)) and run.records:
    wall = run.records[-1].get("z/wall_sec")
  return f"{wall:.1f} s" if isinstance(wall, (int, float)) else "n/a"


def _run_html(run: _Run, images: dict[str, str]) -> str:
  s, cfg, final = run.summary, run.config, run.final
  title = os.path.basename(os.path.abspath(run.workdir))
  agg = cfg.get("aggregation") or {}
  facts = [
      ("rounds", s.get("rounds", int(run.rounds[-1]) if len(run.rounds) else 0)),
      ("clients", run.num_clients),
      ("malicious clients", ", ".join(map(str, run.malicious)) or "none (clean run)"),
      ("aggregation", f"{agg.get('name', '?')} {json.dumps(agg.get('kwargs') or {})}"),
      ("loss / D norm", f"{(cfg.get('train') or {}).get('loss', '?')} / {(cfg.get('model') or {}).get('d_norm', '?')}"),
      ("data", f"{(s.get('data') or {}).get('source', (cfg.get('data') or {}).get('source', '?'))}, "
               f"{cfg.get('resolution', '?')} px"),
      ("wall time", _wall(run)),
  ]
  if not s:
    facts.append(("status", "no summary.json: the run is in progress or was interrupted; values are from "
                            "metrics.jsonl so far"))
  out = [f"<!doctype html><html><head><meta charset='utf-8'><title>fedgan_jax report: {html.escape(title)}</title>",
         f"<style>{_CSS}</style></head><body>",
         f"<h1>fedgan_jax run report: {html.escape(title)}</h1>",
         f"<div class='muted'>{html.escape(os.path.abspath(run.workdir))}</div>",
         "<table>" + "".join(_row([html.escape(k), html.escape(str(v))]) for k, v in facts) + "</table>"]

  out.append("<h2>Final metrics</h2>")
  keys = _final_metric_keys(final)
  rows = [_row(["metric", "key", "value"], header=True)]
  for k in keys:
    rows.append(_row([html.escape(metric_label(k)), f"<code>{html.escape(k)}</code>", _num(final.get(k))]))
  for k in ("detect_tpr_mean", "detect_fpr_mean"):
    if k in s:
      rows.append(_row([html.escape(metric_label(k)), f"<code>{k}</code>", _num(s.get(k))]))
  if len(rows) == 1:
    out.append("<p>No evaluation metrics were recorded.</p>")
  else:
    out.append("<table>" + "".join(rows) + "</table>")
  if any(k.startswith(("eval/fid@", "eval/kid@")) for k in keys):
    out.append("<p class='muted'>Only <code>fid@inception_v3</code> is the standard FID; Fréchet distances "
               "in other feature spaces (FD) are not comparable with published FID numbers.</p>")

  out.append("<h2>Detection: first round each attacker was flagged</h2>")
  ff = run.first_flag_rounds()
  if ff:
    out.append("<table>" + _row(["attacker", "first flagged"], header=True) + "".join(
        _row([f"client {c}", html.escape("never" if r is None else str(r))], cls="attacker")
        for c, r in sorted(ff.items())) + "</table>")
  else:
    out.append("<p>No malicious clients in this run.</p>")

  out.append("<h2>Per-client summary</h2>")
  w, fl = run.matrix("agg/weights"), run.matrix("agg/flagged")
  nf = run.matrix("agg/nonfinite")
  g, d = final.get("train/g_loss"), final.get("train/d_loss")
  rows = [_row(["client", "role", "final weight", "mean weight", "rounds flagged", "non-finite rounds",
                "final G loss", "final D loss"], header=True)]

  def at(v, c):
    return v[c] if isinstance(v, list) and c < len(v) else None

  for c in range(run.num_clients):
    mal = c in run.malicious
    rows.append(_row([
        f"client {c}", "attacker" if mal else "honest",
        _num(float(w[c, -1]) if w is not None else None),
        _num(float(np.nanmean(w[c])) if w is not None and np.isfinite(w[c]).any() else None),
        _num(int(np.nansum(fl[c])) if fl is not None else None),
        _num(int(np.nansum(nf[c])) if nf is not None else None),
        _num(at(g, c)), _num(at(d, c))], cls="attacker" if mal else ""))
  out.append("<table>" + "".join(rows) + "</table>")

  out.append("<h2>Curves</h2>")
  captions = {
      "fidelity.png": "Fidelity vs round (evaluation rounds only).",
      "trigger.png": "Backdoor trigger in the global generator's samples: the rate counts samples in which "
                     "the trigger is detectable at its location (threshold calibrated so that at most 1 % of "
                     "clean real images pass); the strength says how strongly it is there (1 = fully pasted, "
                     "0 = absent). A high rate with a low strength is a faint ghost of the trigger.",
      "weights.png": "Aggregation weights.",
      "losses.png": "Local losses and update norms per client.",
      "detection.png": "Server-side detection.",
      "samples_strip.png": "Sample grids at fixed noise (at most 8 rounds).",
      "samples.gif": "All sample grids, animated.",
  }
  for name, cap in captions.items():
    if name in images:
      out.append(f"<h3 style='font-size:1em'>{html.escape(cap)}</h3><img src='{name}' alt='{name}'>")
  missing = [n for n in captions if n not in images]
  notes = {"fidelity.png": "no fidelity metrics recorded", "trigger.png": "no trigger metrics recorded",
           "detection.png": "no client was ever flagged", "samples_strip.png": "no sample grids",
           "samples.gif": "no sample grids", "weights.png": "no aggregation weights",
           "losses.png": "no per-client losses"}
  if missing:
    out.append("<p class='muted'>Not drawn: " + "; ".join(f"{n} ({notes[n]})" for n in missing) + ".</p>")

  out.append("<h2>Config</h2><details><summary>config.json</summary><pre>"
             + html.escape(json.dumps(cfg, indent=2, sort_keys=True)) + "</pre></details>")
  if s.get("data"):
    out.append("<details><summary>data</summary><pre>" + html.escape(json.dumps(s["data"], indent=2, sort_keys=True))
               + "</pre></details>")
  out.append("</body></html>")
  return "\n".join(out)


def write_run_report(workdir: str) -> list[str]:
  """Writes plots, a samples strip/GIF and ``report.html`` into ``<workdir>/report/``.

  Args:
    workdir: A run directory (holds ``metrics.jsonl``).

  Returns:
    Paths of the files written.

  Raises:
    NotARunError: ``workdir`` has no ``metrics.jsonl``.
  """
  if not is_run_dir(workdir):
    raise NotARunError(f"{workdir!r} is not a run directory: it has no metrics.jsonl "
                       "(expected the --workdir of `python -m fedgan_jax.main`).")
  run = _Run(workdir)
  out_dir = os.path.join(workdir, REPORT_DIR)
  os.makedirs(out_dir, exist_ok=True)
  samples = run.samples()
  makers = [
      ("fidelity.png", lambda p: _plot_fidelity(run, p)),
      ("trigger.png", lambda p: _plot_trigger(run, p)),
      ("weights.png", lambda p: _plot_weights(run, p)),
      ("losses.png", lambda p: _plot_losses(run, p)),
      ("detection.png", lambda p: _plot_detection(run, p)),
      ("samples_strip.png", lambda p: _plot_strip(samples, p)),
      ("samples.gif", lambda p: _write_gif(samples, p)),
  ]
  images: dict[str, str] = {}
  for name, make in makers:
    path = os.path.join(out_dir, name)
    if make(path):
      images[name] = path
    elif os.path.exists(path):
      os.remove(path)  # A stale plot from an earlier report of this dir.
  html_path = os.path.join(out_dir, "report.html")
  with open(html_path, "w", encoding="utf-8") as f:
    f.write(_run_html(run, images))
  return list(images.values()) + [html_path]


# ----------------------------------------------------------------------------- sweeps


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out: dict[str, Any] = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: d}


def _cell(v: Any) -> str:
  if isinstance(v, (list, tuple, dict)):
    return json.dumps(v)
  return "" if v is None else str(v)


_MISSING = object()


def _sweep_rows(sweep_dir: str, runs: list[str]) -> tuple[list[str], list[str], list[dict[str, Any]]]:
  """(differing config keys, metric keys, one row dict per run)."""
  loaded = []
  for p in runs:
    cfg = _read_json(os.path.join(p, "config.json")) or {}
    summ = _read_json(os.path.join(p, "summary.json")) or {}
    loaded.append((os.path.relpath(p, sweep_dir), _flatten(cfg), summ, p))
  all_keys = sorted({k for _, f, _, _ in loaded for k in f})
  differ = [k for k in all_keys if len({json.dumps(f.get(k, "<missing>"), sort_keys=True)
                                        for _, f, _, _ in loaded}) > 1]
  metric_keys: list[str] = []
  for k in ("eval/trigger_rate", "eval/trigger_strength", "eval/swd"):
    if any(k in (s.get("final") or {}) for _, _, s, _ in loaded):
      metric_keys.append(k)
  extra = sorted({k for _, _, s, _ in loaded for k in (s.get("final") or {})
                  if k.startswith(("eval/fid@", "eval/kid@", "eval/precision@", "eval/recall@"))})
  metric_keys += extra + ["detect_tpr_mean", "detect_fpr_mean", "first_flag_round"]
  rows = []
  for name, flat, summ, path in loaded:
    final = summ.get("final") or {}
    row: dict[str, Any] = {"run": name, "_path": path}
    for k in differ:
      row[k] = flat.get(k)
    for k in metric_keys:
      if k.startswith("eval/"):
        row[k] = final.get(k)
    tpr, fpr = summ.get("detect_tpr_mean", _MISSING), summ.get("detect_fpr_mean", _MISSING)
    if (tpr is _MISSING or fpr is _MISSING) and is_run_dir(path):
      r = _Run(path)
      tpr = _nanmean(r.series("eval/detect_tpr")[1]) if tpr is _MISSING else tpr
      fpr = _nanmean(r.series("eval/detect_fpr")[1]) if fpr is _MISSING else fpr
    row["detect_tpr_mean"] = None if tpr is _MISSING else tpr
    row["detect_fpr_mean"] = None if fpr is _MISSING else fpr
    ff = summ.get("first_flag_round") or {}
    flagged = [v for v in ff.values() if isinstance(v, (int, float))]
    row["first_flag_round"] = int(min(flagged)) if flagged else None
    row["first_flag_rounds"] = "; ".join(f"client {c}: {'never' if v is None else v}" for c, v in
                                         sorted(ff.items(), key=lambda kv: int(kv[0])))
    rows.append(row)
  return differ, metric_keys, rows


def _nanmean(x: np.ndarray) -> float | None:
  x = np.asarray(x, float)
  x = x[np.isfinite(x)]
  return float(x.mean()) if len(x) else None


def _plot_sweep(rows: list[dict[str, Any]], metric_keys: list[str], path: str) -> str | None:
  keys = [k for k in metric_keys if any(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) for r in rows)]
  if not keys:
    return None
  ncols = min(3, len(keys))
  nrows = int(math.ceil(len(keys) / ncols))
  n = len(rows)
  label_w = min(max(len(r["run"]) for r in rows) * 0.065, 3.5)
  fig = _figure(label_w + 3.4 * ncols, nrows * max(2.0, 0.28 * n + 1.0))
  axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False, sharey=True)).ravel()
  y = np.arange(n)
  for i, (ax, k) in enumerate(zip(axes, keys)):
    vals = np.array([r[k] if isinstance(r.get(k), (int, float)) else np.nan for r in rows], float)
    ax.barh(y, np.nan_to_num(vals), color="#1f77b4", height=0.7)
    finite = vals[np.isfinite(vals)]
    span = float(np.max(np.abs(finite))) if len(finite) else 0.0
    lo = min(0.0, float(np.min(finite)) * 1.15) if len(finite) else 0.0
    hi = span * 1.3 if span > 0 else 1.0
    ax.set_xlim(lo, hi)
    for yi, v in zip(y, vals):
      ax.text(max(v, 0.0) + 0.015 * (hi - lo) if np.isfinite(v) else 0.015 * (hi - lo), yi,
              _fmt(float(v)) if np.isfinite(v) else "n/a", va="center", fontsize=7)
    ax.set_title(metric_label(k), fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.tick_params(axis="x", labelsize=7)
    if i % ncols == 0:
      ax.set_yticks(y)
      ax.set_yticklabels([r["run"] for r in rows], fontsize=8)
  axes[0].set_ylim(n - 0.5, -0.5)
  for ax in axes[len(keys):]:
    ax.set_visible(False)
  fig.suptitle("Final metrics per run", fontsize=11)
  return _save(fig, path)


def write_sweep_report(sweep_dir: str) -> list[str]:
  """Writes ``comparison.csv``, ``comparison.html`` and ``final_metrics.png`` into ``<sweep_dir>/report/``.

  One row per run: its relative path, the config fields that differ between
  runs (flattened ``config.json``), and its final metrics.

  Args:
    sweep_dir: A directory whose children (or grandchildren) are run directories
      with ``summary.json`` and ``config.json``.

  Returns:
    Paths of the files written.

  Raises:
    NotARunError: no run directories were found.
  """
  runs = find_runs(sweep_dir) if os.path.isdir(sweep_dir) else []
  if not runs:
    raise NotARunError(f"{sweep_dir!r} is not a sweep directory: no subdirectory (or sub-subdirectory) "
                       "holds both summary.json and config.json.")
  differ, metric_keys, rows = _sweep_rows(sweep_dir, runs)
  out_dir = os.path.join(sweep_dir, REPORT_DIR)
  os.makedirs(out_dir, exist_ok=True)
  written = []

  csv_path = os.path.join(out_dir, "comparison.csv")
  cols = ["run"] + differ + metric_keys + ["first_flag_rounds"]
  with open(csv_path, "w", newline="") as f:
    wr = csv.writer(f)
    wr.writerow(cols)
    for r in rows:
      wr.writerow([_cell(r.get(c)) for c in cols])
  written.append(csv_path)

  png_path = os.path.join(out_dir, "final_metrics.png")
  have_png = _plot_sweep(rows, metric_keys, png_path) is not None
  if have_png:
    written.append(png_path)

  html_path = os.path.join(out_dir, "comparison.html")
  head = ["run"] + [f"<code>{html.escape(k)}</code>" for k in differ] + [
      f"{html.escape(metric_label(k))}<br><code class='muted'>{html.escape(k)}</code>" for k in metric_keys]
  body = []
  for r in rows:
    link = os.path.join(r["_path"], REPORT_DIR, "report.html")
    name = html.escape(r["run"])
    if os.path.exists(link):
      name = f"<a href='{html.escape(os.path.relpath(link, out_dir))}'>{name}</a>"
    cells = [name] + [html.escape(_cell(r.get(k))) for k in differ]
    cells += [_num(r.get(k)) if k != "first_flag_round" else
              f"<td class='num' title='{html.escape(r['first_flag_rounds'])}'>"
              f"{html.escape('n/a' if r.get(k) is None else str(r[k]))}</td>" for k in metric_keys]
    body.append(_row(cells))
  page = [f"<!doctype html><html><head><meta charset='utf-8'><title>fedgan_jax sweep: "
          f"{html.escape(os.path.basename(os.path.abspath(sweep_dir)))}</title><style>{_CSS}</style></head><body>",
          f"<h1>fedgan_jax sweep comparison ({len(rows)} runs)</h1>",
          f"<div class='muted'>{html.escape(os.path.abspath(sweep_dir))}</div>",
          "<p>Config fields that differ between runs: "
          + (", ".join(f"<code>{html.escape(k)}</code>" for k in differ) or "none") + ".</p>",
          "<table>" + _row(head, header=True) + "".join(body) + "</table>",
          "<p class='muted'>Final values are the last recorded ones (evaluation metrics from the last "
          "evaluation round); detection rates are means over rounds where defined; first flag round is the "
          "earliest round any attacker was flagged (hover for each attacker). Only "
          "<code>fid@inception_v3</code> is the standard FID.</p>"]
  if have_png:
    page.append("<img src='final_metrics.png' alt='final_metrics.png'>")
  page.append("</body></html>")
  with open(html_path, "w", encoding="utf-8") as f:
    f.write("\n".join(page))
  written.append(html_path)
  return written


# ----------------------------------------------------------------------------- CLI


def write_report(path: str) -> list[str]:
  """A run report if ``path`` is a run directory, else a sweep report.

  Args:
    path: A run or sweep directory.

  Returns:
    Paths of the files written.

  Raises:
    NotARunError: ``path`` is neither.
  """
  if not os.path.isdir(path):
    raise NotARunError(f"{path!r} does not exist or is not a directory.")
  if is_run_dir(path):
    return write_run_report(path)
  if find_runs(path):
    return write_sweep_report(path)
  raise NotARunError(f"{path!r} is neither a run directory (no metrics.jsonl) nor a sweep directory "
                     "(no subdirectory with summary.json and config.json).")


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m fedgan_jax.report --workdir DIR``."""
  parser = argparse.ArgumentParser(prog="python -m fedgan_jax.report", description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a run directory or a sweep directory")
  args = parser.parse_args(argv)
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  try:
    paths = write_report(args.workdir)
  except NotARunError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for p in paths:
    print(p)
  return 0


if __name__ == "__main__":
  sys.exit(main())
