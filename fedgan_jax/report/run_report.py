"""The report of one run: its figures, a samples strip/GIF, and ``report.html`` linking them."""

from __future__ import annotations

import html
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from fedgan_jax import privacy
from fedgan_jax.metrics import diversity
from fedgan_jax.report import markup, plots
from fedgan_jax.report.labels import clients_phrase, metric_label
from fedgan_jax.report.runs import REPORT_DIR, Run
from fedgan_jax.report.samples import plot_strip, write_gif
from fedgan_jax.report.table import PRIVACY_UTILITY_COLUMNS

# Figure file -> caption on the page, in page order.
CAPTIONS = {
  "fidelity.png": "Fidelity vs round (evaluation rounds only).",
  "trigger.png": "The backdoor in the global generator's samples. Left: the implant, the median amount of "
  "the trigger blended into its region (0 = none, 1 = fully pasted) in generated images minus the same "
  "on clean real images, with its 95 % bootstrap CI. Right: the fraction of samples whose amount exceeds "
  "the clean images' 99th percentile (a steep function of the amount: a faint ghost in every sample can "
  "read anywhere from a few % to nearly all), with the clean images' own out-of-sample rate.",
  "weights.png": "Aggregation weights.",
  "losses.png": "True local losses (train/g_loss, train/d_loss) and update norms per client; where clients "
  "reported other G losses to the server (train/reported_g_loss, e.g. a mimic attacker), "
  "those too.",
  "detection.png": "Server-side detection.",
  "samples_strip.png": "Sample grids at fixed noise (at most 8 rounds).",
  "samples.gif": "All sample grids, animated.",
}
# Why a figure is absent.
_NOT_DRAWN = {
  "fidelity.png": "no fidelity metrics recorded",
  "trigger.png": "no trigger metrics recorded",
  "detection.png": "no client was ever flagged",
  "samples_strip.png": "no sample grids",
  "samples.gif": "no sample grids",
  "weights.png": "no aggregation weights",
  "losses.png": "no per-client losses",
}


def _final_metric_keys(final: dict[str, Any]) -> list[str]:
  first = ["eval/implant_amplitude", "eval/implant_above_p99", "eval/diversity", "eval/swd"]
  keys = [k for k in first if k in final]
  keys += sorted(k for k in final if k.startswith(("eval/fid@", "eval/kid@", "eval/precision@", "eval/recall@")))
  keys += [k for k in PRIVACY_UTILITY_COLUMNS if k in final]
  keys += [k for k in ("eval/detect_tpr", "eval/detect_fpr", "eval/nonfinite_samples") if k in final]
  keys += sorted(k for k in final if k.startswith("eval/") and k not in keys)
  return keys


def _wall(run: Run) -> str:
  wall = run.summary.get("wall_sec")
  if not isinstance(wall, (int, float)) and run.records:
    wall = run.records[-1].get("z/wall_sec")
  return f"{wall:.1f} s" if isinstance(wall, (int, float)) else "n/a"


def _facts(run: Run) -> list[tuple[str, Any]]:
  s, cfg = run.summary, run.config
  agg = cfg.get("aggregation") or {}
  facts = [
    ("rounds", s.get("rounds", int(run.rounds[-1]) if len(run.rounds) else 0)),
    ("clients", run.num_clients),
    # Indices spelled "client 0", so that one attacker never reads as "0 attackers".
    ("malicious clients", clients_phrase(run.malicious, none="none (clean run)")),
    ("aggregation", f"{agg.get('name', '?')} {json.dumps(agg.get('kwargs') or {})}"),
    ("loss / D norm", f"{(cfg.get('train') or {}).get('loss', '?')} / {(cfg.get('model') or {}).get('d_norm', '?')}"),
    (
      "data",
      f"{(s.get('data') or {}).get('source', (cfg.get('data') or {}).get('source', '?'))}, "
      f"{cfg.get('resolution', '?')} px",
    ),
    ("wall time", _wall(run)),
  ]
  if not s:
    facts.append(
      ("status", "no summary.json: the run is in progress or was interrupted; values are from metrics.jsonl so far")
    )
  return facts


def _final_metrics_section(run: Run) -> list[str]:
  final, s = run.final, run.summary
  out = ["<h2>Final metrics</h2>"]
  keys = _final_metric_keys(final)
  rows = [markup.row(["metric", "key", "value"], header=True)]
  for k in keys:
    rows.append(markup.row([html.escape(metric_label(k)), f"<code>{html.escape(k)}</code>", markup.num(final.get(k))]))
  for k in ("detect_tpr_mean", "detect_fpr_mean"):
    if k in s:
      rows.append(markup.row([html.escape(metric_label(k)), f"<code>{k}</code>", markup.num(s.get(k))]))
  if len(rows) == 1:
    out.append("<p>No evaluation metrics were recorded.</p>")
  else:
    out.append("<table>" + "".join(rows) + "</table>")
  if any(k.startswith(("eval/fid@", "eval/kid@")) for k in keys):
    out.append(
      "<p class='muted'>Only <code>fid@inception_v3</code> is the standard FID; Fréchet distances "
      "in other feature spaces (FD) are not comparable with published FID numbers.</p>"
    )
  return out


def _privacy_section(run: Run) -> list[str]:
  """The (ε, δ) of a ``dp_mean`` or DP-SGD run (``summary.json``'s ``privacy``); nothing for other runs."""
  block = run.summary.get("privacy")
  if not block:
    return []
  out = ["<h2>Differential privacy</h2>"]
  if "epsilon" in block:
    out += _client_level_privacy(block)
  if block.get("dp_sgd"):
    out += _dp_sgd_privacy(block["dp_sgd"])
  return out


def _client_level_privacy(block: dict) -> list[str]:
  rows = [markup.row(["field", "value"], header=True)]
  for k in ("epsilon", "delta", "noise_multiplier", "clip_norm", "rounds", "accountant", "unit", "note"):
    if k in block:
      v = block[k]
      cell = markup.num(v) if isinstance(v, (int, float)) else f"<td>{html.escape(str(v))}</td>"
      if k == "epsilon":  # inf (no noise) reads as such, not as n/a.
        cell = markup.num(privacy.epsilon_text(float(v)), title=repr(v))
      rows.append(markup.row([f"<code>{k}</code>", cell]))
  return [
    f"<p><b>{html.escape(privacy.guarantee_text(block))}</b> (accountant: {html.escape(str(block.get('accountant')))}; "
    "dp_accounting).</p>",
    "<table>" + "".join(rows) + "</table>",
    "<p class='muted'>Central DP (DP-FedAvg, McMahan et al. 2018): each client's update is clipped to L2 norm "
    "<code>clip_norm</code> and the mean over the client slots gets Gaussian noise of std "
    "<code>noise_multiplier * clip_norm / C</code>. The guarantee covers what the server sends out (the global "
    "models, and the samples and metrics computed from them), with one client's data as the unit; not the "
    "server's own view or logs (per-client norms and losses in metrics.jsonl). Discriminators that are never "
    "uploaded (the paper's setting) release nothing.</p>",
  ]


def _dp_sgd_privacy(block: dict) -> list[str]:
  """Per-client ε of DP-SGD on the discriminators (``privacy.dp_sgd``)."""
  rows = [markup.row(["client", "ε", "sampling q", "D steps"], header=True)]
  for c, (eps, q, steps) in enumerate(zip(block["epsilon"], block["sampling_prob"], block["steps"])):
    cells = [markup.num(privacy.epsilon_text(float(eps)), title=repr(eps)), markup.num(q), markup.num(steps)]
    rows.append(markup.row([str(c), *cells]))
  facts = ", ".join(
    f"<code>{k}</code> {html.escape(str(block[k]))}" for k in ("noise_multiplier", "clip_norm", "delta", "accountant")
  )
  return [
    f"<p><b>{html.escape(privacy.dp_sgd_text(block))}</b> ({facts}; dp_accounting).</p>",
    "<table>" + "".join(rows) + "</table>",
    "<p class='muted'>DP-SGD (Abadi et al. 2016) on every client's discriminator: each real image's gradient "
    "(its real and paired fake terms and its gradient-penalty interpolate) clipped to L2 norm <code>clip_norm</code>, "
    "Gaussian noise of std <code>noise_multiplier * clip_norm</code> on their sum. The unit is one image of a "
    "client; the generator learns only through the private discriminator, so what a client uploads is covered. "
    "Each D step is accounted as Poisson sampling at q = batch size / the client's images, the standard "
    "approximation of the program's fixed-size batches (not a proof; see fedgan_jax/privacy.py). The reported "
    "losses and clipped fractions are not covered.</p>",
  ]


def _detection_section(run: Run) -> list[str]:
  out = ["<h2>Detection: first round each attacker was flagged</h2>"]
  ff = run.first_flag_rounds()
  if ff:
    out.append(
      "<table>"
      + markup.row(["attacker", "first flagged"], header=True)
      + "".join(
        markup.row([f"client {c}", html.escape("never" if r is None else str(r))], cls="attacker")
        for c, r in sorted(ff.items())
      )
      + "</table>"
    )
  else:
    out.append("<p>No malicious clients in this run.</p>")
  return out


def _clients_section(run: Run) -> list[str]:
  final = run.final
  w, fl = run.matrix("agg/weights"), run.matrix("agg/flagged")
  nf = run.matrix("agg/nonfinite")
  g, d = final.get("train/g_loss"), final.get("train/d_loss")
  rows = [
    markup.row(
      [
        "client",
        "role",
        "final weight",
        "mean weight",
        "rounds flagged",
        "non-finite rounds",
        "final G loss",
        "final D loss",
      ],
      header=True,
    )
  ]

  def at(v, c):
    return v[c] if isinstance(v, list) and c < len(v) else None

  for c in range(run.num_clients):
    mal = c in run.malicious
    rows.append(
      markup.row(
        [
          f"client {c}",
          "attacker" if mal else "honest",
          markup.num(float(w[c, -1]) if w is not None else None),
          markup.num(float(np.nanmean(w[c])) if w is not None and np.isfinite(w[c]).any() else None),
          markup.num(int(np.nansum(fl[c])) if fl is not None else None),
          markup.num(int(np.nansum(nf[c])) if nf is not None else None),
          markup.num(at(g, c)),
          markup.num(at(d, c)),
        ],
        cls="attacker" if mal else "",
      )
    )
  return ["<h2>Per-client summary</h2>", "<table>" + "".join(rows) + "</table>"]


def _curves_section(images: dict[str, str]) -> list[str]:
  out = ["<h2>Curves</h2>"]
  for name, cap in CAPTIONS.items():
    if name in images:
      out.append(f"<h3 style='font-size:1em'>{html.escape(cap)}</h3><img src='{name}' alt='{name}'>")
  missing = [n for n in CAPTIONS if n not in images]
  if missing:
    out.append("<p class='muted'>Not drawn: " + "; ".join(f"{n} ({_NOT_DRAWN[n]})" for n in missing) + ".</p>")
  return out


def run_html(run: Run, images: dict[str, str]) -> str:
  """``report.html`` of a run.

  Args:
    run: The loaded run.
    images: File name -> path of the figures that were drawn (linked by name, next to the page).

  Returns:
    The page.
  """
  title = os.path.basename(os.path.abspath(run.workdir))
  out = [
    markup.head(f"fedgan_jax report: {title}"),
    f"<h1>fedgan_jax run report: {html.escape(title)}</h1>",
    f"<div class='muted'>{html.escape(os.path.abspath(run.workdir))}</div>",
    "<table>" + "".join(markup.row([html.escape(k), html.escape(str(v))]) for k, v in _facts(run)) + "</table>",
  ]
  collapsed = diversity.collapse_warning(run.summary.get("final") or {})
  if collapsed:
    out.append(f"<p class='warn'><b>Warning:</b> {html.escape(collapsed)}.</p>")
  out += _privacy_section(run)
  out += _final_metrics_section(run)
  out += _detection_section(run)
  out += _clients_section(run)
  out += _curves_section(images)
  out.append(
    "<h2>Config</h2><details><summary>config.json</summary><pre>"
    + html.escape(json.dumps(run.config, indent=2, sort_keys=True))
    + "</pre></details>"
  )
  if run.summary.get("data"):
    out.append(
      "<details><summary>data</summary><pre>"
      + html.escape(json.dumps(run.summary["data"], indent=2, sort_keys=True))
      + "</pre></details>"
    )
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
  run = Run(workdir)
  out_dir = os.path.join(workdir, REPORT_DIR)
  os.makedirs(out_dir, exist_ok=True)
  samples = run.samples()
  makers: list[tuple[str, Callable[[str], str | None]]] = [
    ("fidelity.png", lambda p: plots.plot_fidelity(run, p)),
    ("trigger.png", lambda p: plots.plot_trigger(run, p)),
    ("weights.png", lambda p: plots.plot_weights(run, p)),
    ("losses.png", lambda p: plots.plot_losses(run, p)),
    ("detection.png", lambda p: plots.plot_detection(run, p)),
    ("samples_strip.png", lambda p: plot_strip(samples, p)),
    ("samples.gif", lambda p: write_gif(samples, p)),
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
    f.write(run_html(run, images))
  return list(images.values()) + [html_path]
