"""The report of a sweep: the sweep table as ``comparison.csv``, ``comparison.html`` and ``final_metrics.png``."""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedgan_jax.io.rundir import read_json, read_summary
from fedgan_jax.report import draw, markup, table
from fedgan_jax.report.labels import format_value, metric_label
from fedgan_jax.report.runs import REPORT_DIR, NotARunError, find_runs


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out: dict[str, Any] = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: d}


def differing_settings(configs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Per run, the (flattened, dotted) config fields whose values are not the same in every run.

  Args:
    configs: Each run's ``config.json``.

  Returns:
    One ``{dotted key: value}`` per run, keys sorted (None where a run lacks the field).
  """
  flats = [_flatten(c) for c in configs]
  all_keys = sorted({k for f in flats for k in f})
  differ = [k for k in all_keys if len({json.dumps(f.get(k, "<missing>"), sort_keys=True) for f in flats}) > 1]
  return [{k: f.get(k) for k in differ} for f in flats]


def sweep_rows(sweep_dir: str, runs: Sequence[str]) -> tuple[list[str], list[table.Row]]:
  """The sweep table of a directory of runs.

  Args:
    sweep_dir: The sweep directory (rows are named by paths relative to it).
    runs: Its run directories (``find_runs``).

  Returns:
    ``(setting keys, rows)``: the config fields that differ between runs, and one row per run.
  """
  settings = differing_settings([read_json(os.path.join(p, "config.json")) or {} for p in runs])
  # find_runs lists only runs with a summary.json; an unreadable one still gives a row (values from metrics.jsonl).
  rows = [
    table.sweep_row(os.path.relpath(p, sweep_dir), s, read_summary(p) or {}, run_dir=p) for p, s in zip(runs, settings)
  ]
  return (list(settings[0]) if settings else []), rows


def _number(v: Any) -> float:
  return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.nan


def plot_sweep(rows: Sequence[table.Row], columns: Sequence[table.Column], path: str) -> str | None:
  """One horizontal bar chart per metric column with a finite value, one bar per run.

  Args:
    rows: The sweep table.
    columns: The metric columns.
    path: Where the PNG goes.

  Returns:
    ``path``, or None when no column has a finite value.
  """
  columns = [c for c in columns if any(math.isfinite(_number(c.get(r))) for r in rows)]
  if not columns:
    return None
  ncols = min(3, len(columns))
  nrows = int(math.ceil(len(columns) / ncols))
  n = len(rows)
  label_w = min(max(len(r["name"]) for r in rows) * 0.065, 3.5)
  fig = draw.figure(label_w + 3.4 * ncols, nrows * max(2.0, 0.28 * n + 1.0))
  axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False, sharey=True)).ravel()
  y = np.arange(n)
  for i, (ax, col) in enumerate(zip(axes, columns)):
    vals = np.array([_number(col.get(r)) for r in rows], float)
    ax.barh(y, np.nan_to_num(vals), color="#1f77b4", height=0.7)
    finite = vals[np.isfinite(vals)]
    span = float(np.max(np.abs(finite))) if len(finite) else 0.0
    lo = min(0.0, float(np.min(finite)) * 1.15) if len(finite) else 0.0
    hi = span * 1.3 if span > 0 else 1.0
    ax.set_xlim(lo, hi)
    for yi, v in zip(y, vals):
      ax.text(
        max(v, 0.0) + 0.015 * (hi - lo) if np.isfinite(v) else 0.015 * (hi - lo),
        yi,
        format_value(float(v)) if np.isfinite(v) else "n/a",
        va="center",
        fontsize=7,
      )
    ax.set_title(metric_label(col.header), fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.tick_params(axis="x", labelsize=7)
    if i % ncols == 0:
      ax.set_yticks(y)
      ax.set_yticklabels([r["name"] for r in rows], fontsize=8)
  axes[0].set_ylim(n - 0.5, -0.5)
  for ax in axes[len(columns) :]:
    ax.set_visible(False)
  fig.suptitle("Final metrics per run", fontsize=11)
  return draw.save(fig, path)


def _comparison_html(
  sweep_dir: str,
  out_dir: str,
  runs: Sequence[str],
  setting_keys: Sequence[str],
  rows: Sequence[table.Row],
  metric_columns: Sequence[table.Column],
  have_png: bool,
) -> str:
  head = (
    ["run"]
    + [f"<code>{html.escape(k)}</code>" for k in setting_keys]
    + [
      f"{html.escape(metric_label(c.header))}<br><code class='muted'>{html.escape(c.header)}</code>"
      for c in metric_columns
    ]
  )
  body = []
  for path, r in zip(runs, rows):
    link = os.path.join(path, REPORT_DIR, "report.html")
    name = html.escape(r["name"])
    if os.path.exists(link):
      name = f"<a href='{html.escape(os.path.relpath(link, out_dir))}'>{name}</a>"
    cells = [name] + [html.escape(table.cell_text(r.get(k))) for k in setting_keys]
    # The earliest flag round carries each attacker's round as hover text.
    cells += [
      markup.num(c.get(r), title=table.flag_text(r) if c.header == "first_flag_round" else None) for c in metric_columns
    ]
    body.append(markup.row(cells))
  sweep_name = os.path.basename(os.path.abspath(sweep_dir))
  page = [
    markup.head(f"fedgan_jax sweep: {sweep_name}"),
    f"<h1>fedgan_jax sweep comparison ({len(rows)} runs)</h1>",
    f"<div class='muted'>{html.escape(os.path.abspath(sweep_dir))}</div>",
    "<p>Config fields that differ between runs: "
    + (", ".join(f"<code>{html.escape(k)}</code>" for k in setting_keys) or "none")
    + ".</p>",
    "<table>" + markup.row(head, header=True) + "".join(body) + "</table>",
    "<p class='muted'>Final values are the last recorded ones (evaluation metrics from the last "
    "evaluation round); detection rates are means over rounds where defined; first flag round is the "
    "earliest round any attacker was flagged (hover for each attacker). Only "
    "<code>fid@inception_v3</code> is the standard FID.</p>",
  ]
  if have_png:
    page.append("<img src='final_metrics.png' alt='final_metrics.png'>")
  page.append("</body></html>")
  return "\n".join(page)


def write_sweep_report(sweep_dir: str) -> list[str]:
  """Writes ``comparison.csv``, ``comparison.html`` and ``final_metrics.png`` into ``<sweep_dir>/report/``.

  One row per run: its relative path, the config fields that differ between
  runs (flattened ``config.json``), and its final metrics (``table.comparison_columns``).

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
    raise NotARunError(
      f"{sweep_dir!r} is not a sweep directory: no subdirectory (or sub-subdirectory) "
      "holds both summary.json and config.json."
    )
  setting_keys, rows = sweep_rows(sweep_dir, runs)
  columns = table.comparison_columns(rows, setting_keys)
  metric_columns = table.metric_columns(rows)
  out_dir = os.path.join(sweep_dir, REPORT_DIR)
  os.makedirs(out_dir, exist_ok=True)

  csv_path = os.path.join(out_dir, "comparison.csv")
  table.write_csv(csv_path, rows, columns)
  written = [csv_path]
  png_path = os.path.join(out_dir, "final_metrics.png")
  have_png = plot_sweep(rows, metric_columns, png_path) is not None
  if have_png:
    written.append(png_path)
  html_path = os.path.join(out_dir, "comparison.html")
  with open(html_path, "w", encoding="utf-8") as f:
    f.write(_comparison_html(sweep_dir, out_dir, runs, setting_keys, rows, metric_columns, have_png))
  written.append(html_path)
  return written
