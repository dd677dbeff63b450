"""The sweep table: one row per run of a sweep, written as CSV and printed as text.

One row builder (``sweep_row``) and one CSV writer (``write_csv``) serve both
users of the table:

* ``launch.sweep`` writes ``<workdir>/results.csv`` (every column of every
  row: ``results_columns``) and prints ``text_table``; its rows are keyed by
  the point's name and carry the point's overrides.
* ``python -m fedgan_jax.report`` on a sweep directory writes
  ``report/comparison.csv`` (``comparison_columns``: the run's path, the
  config fields that differ between runs, the final metrics, detection means
  and first flagged rounds) and the same columns as ``comparison.html`` and
  ``final_metrics.png``.

A row holds only defined values: ``name``, the settings, ``status``
(``done``: the run wrote ``summary.json``; ``missing``: it did not), and for a
done run ``rounds``, every scalar ``eval/*`` final metric, the detection means,
the wall times, and ``first_flag_round`` (``{attacker: first round flagged or
None}`` as in ``summary.json``).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from fedgan_jax.io.rundir import read_records
from fedgan_jax.metrics.detection import mean_rate

Row = dict[str, Any]

# The headline metrics, in order.
SUMMARY_COLUMNS = ("eval/implant_amplitude", "eval/implant_above_p99", "eval/diversity", "eval/swd")
DETECTION_MEANS = ("detect_tpr_mean", "detect_fpr_mean")
_TIMES = ("wall_sec", "first_round_sec")
# Feature-space metrics, one column per extractor found (sorted), after the headline ones.
_FEATURE_PREFIXES = ("eval/fid@", "eval/kid@", "eval/precision@", "eval/recall@")
# Membership inference and downstream utility (evaluation.py), after the feature-space metrics, when present.
PRIVACY_UTILITY_COLUMNS = (
  "eval/mia_auc",
  "eval/tstr_acc",
  "eval/tstr_bacc",
  "eval/tstr_auc",
  "eval/trtr_acc",
  "eval/trtr_bacc",
  "eval/trtr_auc",
  "eval/trigger_transfer",
  "eval/trigger_transfer_real",
  "eval/trigger_target_rate",
  "eval/trigger_target_rate_real",
)


def _is_scalar(v: Any) -> bool:
  return isinstance(v, (bool, int, float))


def sweep_row(
  name: str, settings: Mapping[str, Any], summary: Mapping[str, Any] | None, run_dir: str | None = None
) -> Row:
  """One row of the sweep table.

  Args:
    name: The row's name (a sweep point's name, or a run's path relative to the sweep).
    settings: What sets this run apart (a point's overrides, or the config fields that differ).
    summary: The run's ``summary.json``, or None when it has none (status ``missing``).
    run_dir: The run directory; its ``metrics.jsonl`` supplies detection means that
      ``summary`` lacks (summaries written before they existed).

  Returns:
    ``{"name", **settings, "status", ...}`` with only defined values (see the module docstring).
  """
  row: Row = {"name": name, **settings}
  if summary is None:
    row["status"] = "missing"
    return row
  row["status"] = "done"
  row["rounds"] = summary.get("rounds")
  final = summary.get("final") or {}
  row.update({k: v for k, v in final.items() if k.startswith("eval/") and _is_scalar(v)})
  records = None
  for k in DETECTION_MEANS:
    if k in summary:
      v = summary[k]
    elif run_dir is not None:
      if records is None:
        records = read_records(os.path.join(run_dir, "metrics.jsonl"))
      v = mean_rate(r.get("eval/" + k[: -len("_mean")]) for r in records)
    else:
      v = None
    if _is_scalar(v):
      row[k] = v
  row.update({k: summary[k] for k in _TIMES if _is_scalar(summary.get(k))})
  if summary.get("first_flag_round"):
    row["first_flag_round"] = dict(summary["first_flag_round"])
  return row


def earliest_flag(row: Mapping[str, Any]) -> int | None:
  """The earliest round any attacker was flagged, or None (never, or no attackers)."""
  flagged = [v for v in (row.get("first_flag_round") or {}).values() if _is_scalar(v)]
  return int(min(flagged)) if flagged else None


def flag_text(row: Mapping[str, Any]) -> str:
  """Each attacker's first flagged round, e.g. ``"client 0: 3; client 2: never"`` (``""`` without attackers)."""
  ff = row.get("first_flag_round") or {}
  return "; ".join(
    f"client {c}: {'never' if v is None else v}" for c, v in sorted(ff.items(), key=lambda kv: int(kv[0]))
  )


class Column(NamedTuple):
  """A table column: its header and how a row's cell is read."""

  header: str
  get: Callable[[Mapping[str, Any]], Any]


def column(key: str, header: str | None = None) -> Column:
  """The column showing ``row[key]`` (None where absent), headed ``header`` (default ``key``)."""
  return Column(header or key, lambda row: row.get(key))


def results_columns(rows: Iterable[Mapping[str, Any]]) -> list[Column]:
  """Every key of any row, in first-seen order (``results.csv``)."""
  keys: dict[str, None] = {}
  for r in rows:
    keys.update(dict.fromkeys(r))
  return [column(k) for k in keys]


def metric_columns(rows: Sequence[Mapping[str, Any]]) -> list[Column]:
  """The metric columns of a comparison, in order.

  Args:
    rows: ``sweep_row`` rows.

  Returns:
    The headline metrics, the feature-space metrics (sorted), and the
    membership-inference and utility metrics that some row has, then the
    detection means and ``first_flag_round`` (the earliest attacker's,
    ``earliest_flag``) always.
  """
  present = {k for r in rows for k in r}
  keys = [k for k in SUMMARY_COLUMNS if k in present]
  keys += sorted(k for k in present if k.startswith(_FEATURE_PREFIXES))
  keys += [k for k in PRIVACY_UTILITY_COLUMNS if k in present]
  return [column(k) for k in keys + list(DETECTION_MEANS)] + [Column("first_flag_round", earliest_flag)]


def comparison_columns(rows: Sequence[Mapping[str, Any]], setting_keys: Sequence[str]) -> list[Column]:
  """The layout of ``comparison.csv``: ``run`` (the row's name), the settings, ``metric_columns``,
  and ``first_flag_rounds`` (``flag_text``).

  Args:
    rows: ``sweep_row`` rows.
    setting_keys: The settings to show (the config fields that differ between runs).

  Returns:
    The columns.
  """
  return [
    column("name", "run"),
    *(column(k) for k in setting_keys),
    *metric_columns(rows),
    Column("first_flag_rounds", flag_text),
  ]


def cell_text(v: Any) -> str:
  """A value as CSV/HTML text: ``""`` for None, JSON for lists and dicts, else ``str``."""
  if isinstance(v, (list, tuple, dict)):
    return json.dumps(v, sort_keys=True)
  return "" if v is None else str(v)


def write_csv(path: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[Column] | None = None) -> list[str]:
  """Writes the table as CSV.

  Args:
    path: The CSV file.
    rows: ``sweep_row`` rows.
    columns: The layout (default ``results_columns(rows)``).

  Returns:
    The headers written.
  """
  columns = results_columns(rows) if columns is None else columns
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow([c.header for c in columns])
    for r in rows:
      w.writerow([cell_text(c.get(r)) for c in columns])
  return [c.header for c in columns]


def text_table(
  rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = ("status",) + SUMMARY_COLUMNS + DETECTION_MEANS
) -> str:
  """A plain-text table of the key results, one line per row (the sweep's printed summary).

  Args:
    rows: ``sweep_row`` rows.
    columns: Row keys to show after the name (``eval/`` is dropped from the headers).

  Returns:
    The table, lines joined by newlines.
  """

  def cell(v):
    if isinstance(v, float):
      return f"{v:.3f}"
    return "" if v is None else str(v)

  header = ["name"] + [c.replace("eval/", "") for c in columns]
  body = [[r["name"]] + [cell(r.get(c)) for c in columns] for r in rows]
  widths = [max(len(x) for x in col) for col in zip(header, *body)]
  return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in [header] + body)
