"""The per-run figures: fidelity, trigger, aggregation weights, local training, detection.

Each ``plot_*`` function draws one PNG from a loaded ``Run`` and returns its
path, or None when the run has nothing to draw for it (the caller then
removes a stale file of that name).
"""

from __future__ import annotations

import math

import numpy as np

from fedgan_jax.report import draw
from fedgan_jax.report.labels import metric_label
from fedgan_jax.report.runs import Run

FIDELITY_PREFIXES = ("eval/swd", "eval/fid@", "eval/kid@", "eval/precision@", "eval/recall@")
_LOSS_KEYS = ("train/g_loss", "train/d_loss", "train/update_norm")
_REPORTED = "train/reported_g_loss"


def plot_fidelity(run: Run, path: str) -> str | None:
  """Fidelity metrics vs round, one panel each (evaluation rounds only)."""
  keys = [k for k in run.keys() if k.startswith(FIDELITY_PREFIXES)]
  order = {p: i for i, p in enumerate(FIDELITY_PREFIXES)}
  keys.sort(key=lambda k: (min(order[p] for p in FIDELITY_PREFIXES if k.startswith(p)), k))
  data = [(k, *run.series(k)) for k in keys]
  data = [d for d in data if len(d[1])]
  if not data:
    return None
  ncols = min(3, len(data))
  nrows = int(math.ceil(len(data) / ncols))
  fig = draw.figure(max(4.2 * ncols, 6.5), 3.0 * nrows + 0.3)
  axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
  for ax, (k, x, y) in zip(axes, data):
    ax.plot(x, y, "o-", color="#1f77b4", ms=4)
    better = "higher" if k.startswith(("eval/precision", "eval/recall")) else "lower"
    ax.set_title(f"{metric_label(k)}\n({better} is better)", fontsize=9.5)
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)
    draw.round_axis(ax, x)
  for ax in axes[len(data) :]:
    ax.set_visible(False)
  fig.suptitle("Global generator vs clean held-out images", fontsize=11)
  return draw.save(fig, path)


def plot_trigger(run: Run, path: str) -> str | None:
  """The implant (generated minus clean amplitude, with its CI) and the above-clean-p99 fraction vs round."""
  amp = run.series("eval/implant_amplitude")
  above = run.series("eval/implant_above_p99")
  if not len(amp[0]) and not len(above[0]):
    return None
  fig = draw.figure(9.0, 3.2)
  ax1, ax2 = fig.subplots(1, 2)
  if len(amp[0]):
    lo, hi = run.series("eval/implant_amplitude_lo"), run.series("eval/implant_amplitude_hi")
    ax1.plot(*amp, "o-", color=draw.ATTACKER_COLOR, ms=4, label="generated − clean (median)")
    if len(lo[0]) == len(amp[0]) and len(hi[0]) == len(amp[0]):
      ax1.fill_between(amp[0], lo[1], hi[1], color=draw.ATTACKER_COLOR, alpha=0.2, lw=0, label="95 % bootstrap CI")
    top = max(0.1, float(np.max(hi[1] if len(hi[0]) else amp[1])))
    ax1.set_ylim(min(-0.05, float(np.min(lo[1] if len(lo[0]) else amp[1]))), top * 1.1)
  ax1.axhline(0.0, color="0.4", ls=":", lw=1, label="0 = as clean real images")
  ax1.set_title("implant: trigger amplitude (1 = pasted)", fontsize=9.5)
  ax1.set_xlabel("round")
  ax1.legend(fontsize=8, loc="best")
  if len(above[0]):
    ax2.plot(*above, "o-", color="#9467bd", ms=4, label="generated images")
  floor = ((run.calibration.get("templates") or {}).get("run") or {}).get("fpr_out_of_sample")
  if isinstance(floor, (int, float)):
    ax2.axhline(floor, color="0.4", ls=":", lw=1.2, label=f"clean real images, out of sample ({float(floor):.1%})")
  ax2.set_ylim(-0.03, 1.03)
  ax2.set_title("fraction of samples above the clean 99th percentile", fontsize=9.5)
  ax2.set_xlabel("round")
  ax2.legend(fontsize=8, loc="best")
  for ax, s in ((ax1, amp), (ax2, above)):
    ax.grid(alpha=0.3)
    draw.round_axis(ax, s[0] if len(s[0]) else run.rounds)
  return draw.save(fig, path)


def plot_weights(run: Run, path: str) -> str | None:
  """Aggregation weight per client and round (heatmap), and the attackers' total share."""
  w = run.matrix("agg/weights")
  if w is None or not len(run.rounds):
    return None
  c = run.num_clients
  xe = draw.edges(run.rounds)
  with_share = bool(run.malicious) and c > 1
  h = draw.heat_height(c) + (1.9 if with_share else 0.0)
  fig = draw.figure(9.0, h + 0.8)
  if with_share:
    ax, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=[draw.heat_height(c), 1.9])
  else:
    ax = fig.subplots(1, 1)
  vmax = float(np.nanmax(w)) if np.isfinite(w).any() else 1.0
  mesh = ax.pcolormesh(
    xe, np.arange(c + 1) - 0.5, np.ma.masked_invalid(w), cmap="viridis", vmin=0.0, vmax=max(vmax, 1e-12)
  )
  cb = fig.colorbar(mesh, ax=ax, pad=0.01)
  cb.set_label("weight", fontsize=8)
  draw.client_axis(ax, c, run.malicious)
  draw.mark_attacker_rows(ax, xe, run.malicious)
  ax.set_title(
    f"Aggregation weight per client and round (uniform = 1/C = {1.0 / max(c, 1):.3g}"
    + ("; attackers outlined in red)" if run.malicious else "; no attackers)"),
    fontsize=9.5,
  )
  if with_share:
    share = np.nansum(w[run.malicious], axis=0)
    ax2.plot(
      run.rounds,
      share,
      "-",
      color=draw.ATTACKER_COLOR,
      lw=1.8,
      marker="o" if len(run.rounds) < 30 else draw.marker_for(share),
      ms=3,
      label="attackers' total weight",
    )
    ax2.axhline(
      len(run.malicious) / c,
      color="0.3",
      ls="--",
      lw=1,
      label=f"their uniform share |M|/C = {len(run.malicious) / c:.3g}",
    )
    top = max(float(np.nanmax(share)) if np.isfinite(share).any() else 0.0, len(run.malicious) / c) * 1.15
    ax2.set_ylim(-0.03 * top, top)
    ax2.set_ylabel("weight", fontsize=8)
    ax2.legend(fontsize=8, loc="best")
    ax2.grid(alpha=0.3)
    ax2.set_xlabel("round")
  else:
    ax.set_xlabel("round")
  draw.round_axis(ax, run.rounds)
  ax.set_xlim(xe[0], xe[-1])
  return draw.save(fig, path)


def _reported_differs(run: Run) -> bool | None:
  """Whether clients reported other G losses than their true ones (None: no reported losses logged)."""
  true, reported = run.matrix("train/g_loss"), run.matrix(_REPORTED)
  if true is None or reported is None:
    return None
  return not np.allclose(true, reported, equal_nan=True)


def plot_losses(run: Run, path: str) -> str | None:
  """True local losses and update norms per client, plus the reported G loss where it differs."""
  differs = _reported_differs(run)
  keys = _LOSS_KEYS + ((_REPORTED,) if differs else ())
  panels = [(k, run.matrix(k)) for k in keys]
  panels = [(k, m) for k, m in panels if m is not None and np.isfinite(m).any()]
  if not panels:
    return None
  styles = draw.client_styles(run.num_clients, run.malicious)
  marker = "o" if len(run.rounds) <= 20 else None
  fig = draw.figure(4.3 * len(panels), 3.4)
  axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)).ravel()
  # Honest first, attackers on top.
  order = [c for c in range(run.num_clients) if c not in run.malicious] + list(run.malicious)
  for ax, (k, m) in zip(axes, panels):
    for c in order:
      ax.plot(run.rounds, m[c], marker=draw.marker_for(m[c], marker), ms=3, **styles[c])
    ax.set_title(metric_label(k), fontsize=10)
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)
    draw.round_axis(ax, run.rounds)
  handles, labels = axes[0].get_legend_handles_labels()
  if handles:
    by_label = dict(zip(labels, handles))
    fig.legend(list(by_label.values()), list(by_label.keys()), loc="outside right upper", fontsize=8)
  # train/g_loss is each client's true loss; the server only sees train/reported_g_loss (a mimic
  # attacker reports the honest median), so the title says which one is drawn.
  title = "Local training per client: true losses (train/g_loss)"
  if differs:
    title += " and what clients reported to the server (train/reported_g_loss)"
  elif differs is not None:
    title += "; the reported losses are the same"
  fig.suptitle(title, fontsize=11)
  return draw.save(fig, path)


def plot_detection(run: Run, path: str) -> str | None:
  """Who was flagged when (heatmap), anomaly scores, and detection TPR/FPR vs round."""
  flagged = run.matrix("agg/flagged")
  if flagged is None or not np.nansum(flagged) > 0:
    return None
  from matplotlib.colors import ListedColormap  # pylint: disable=import-outside-toplevel

  c = run.num_clients
  xe = draw.edges(run.rounds)
  scores = run.matrix("agg/scores")
  has_scores = scores is not None and np.isfinite(scores).any()
  tpr, fpr = run.series("eval/detect_tpr"), run.series("eval/detect_fpr")
  has_rates = bool(len(tpr[0]) or len(fpr[0]))
  ratios = [draw.heat_height(c)] + ([2.2] if has_scores else []) + ([1.8] if has_rates else [])
  fig = draw.figure(9.0, sum(ratios) + 0.8)
  axes = np.atleast_1d(fig.subplots(len(ratios), 1, sharex=True, height_ratios=ratios, squeeze=False)).ravel()
  ax = axes[0]
  ax.pcolormesh(
    xe,
    np.arange(c + 1) - 0.5,
    np.ma.masked_invalid(flagged),
    cmap=ListedColormap(["#eeeeee", "#ff7f0e"]),
    vmin=0,
    vmax=1,
  )
  nonfinite = run.matrix("agg/nonfinite")
  if nonfinite is not None and np.nansum(nonfinite) > 0:
    cc, jj = np.nonzero(nonfinite > 0.5)
    ax.plot(run.rounds[jj], cc, "kx", ms=5, label="non-finite update")
    ax.legend(fontsize=8, loc="upper right")
  draw.client_axis(ax, c, run.malicious)
  draw.mark_attacker_rows(ax, xe, run.malicious)
  n_flag = np.nansum(flagged, axis=1).astype(int)
  title = "Flagged by the server's detector (orange); " + (
    "attackers outlined in red" if run.malicious else "no attackers in this run"
  )
  if c <= 8:
    title += f" — times flagged: {', '.join(f'c{i}={n}' for i, n in enumerate(n_flag) if n)}"
  ax.set_title(title, fontsize=9)
  i = 1
  if has_scores:
    styles = draw.client_styles(c, run.malicious)
    for k in [k for k in range(c) if k not in run.malicious] + list(run.malicious):
      axes[i].plot(run.rounds, scores[k], marker=draw.marker_for(scores[k]), ms=3, **styles[k])
    axes[i].set_ylabel("anomaly score", fontsize=8)
    axes[i].grid(alpha=0.3)
    h, lb = axes[i].get_legend_handles_labels()
    d = dict(zip(lb, h))
    if len(d) <= 10:
      axes[i].legend(d.values(), d.keys(), fontsize=7, loc="best", ncol=2)
    i += 1
  if has_rates:
    if len(tpr[0]):
      axes[i].plot(
        *tpr,
        "-",
        color=draw.ATTACKER_COLOR,
        lw=1.5,
        marker=draw.marker_for(tpr[1]),
        ms=4,
        label="TPR (attackers flagged)",
      )
    if len(fpr[0]):
      axes[i].plot(
        *fpr, "-", color="#1f77b4", lw=1.5, marker=draw.marker_for(fpr[1]), ms=4, label="FPR (honest flagged)"
      )
    axes[i].set_ylim(-0.05, 1.05)
    axes[i].set_ylabel("rate", fontsize=8)
    axes[i].legend(fontsize=8, loc="best")
    axes[i].grid(alpha=0.3)
  axes[-1].set_xlabel("round")
  draw.round_axis(axes[-1], run.rounds)
  axes[0].set_xlim(xe[0], xe[-1])
  return draw.save(fig, path)
