"""docs/results.csv and docs/results.md, regenerated from HEAD by one command.

    python -m launch.results --workdir runs/results            # run what is missing, then write both files
    python -m launch.results --workdir runs/results --no-run   # only rewrite them from finished runs

Runs the sweep of ``configs/results.py`` (resumable; the seeds of a setting
train as one vmapped program), reads every run directory back and writes one
CSV row per run (setting, seed, trigger size and area, final metrics,
detection rates after the warm-up, the attacker's and the honest clients'
final weights) and a markdown page of means and spreads over seeds, with the
commit the runs came from.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedgan_jax import config_lib
from fedgan_jax.io import rundir
from launch import results_page, sweep

CONFIG = "configs/results.py"
COMMIT_FILE = "COMMIT"  # <workdir>/COMMIT: the commit the runs were trained from (written when training starts).
SIZES = (2, 4, 8)  # The templates every run is scored with (configs/results.py: eval.implant_sizes).
# Final-evaluation keys read as ``<key>_final`` columns (evaluation.py; empty where a run has none).
UTILITY_KEYS = (
  "mia_auc",
  "tstr_acc",
  "tstr_bacc",
  "tstr_auc",
  "trtr_acc",
  "trtr_bacc",
  "trtr_auc",
  "trigger_transfer",
  "trigger_transfer_real",
  "trigger_target_rate",
  "trigger_target_rate_real",
)
UTILITY_COLUMNS = tuple(f"{k}_final" for k in UTILITY_KEYS)
COLUMNS = (
  "setting",
  "seed",
  "rounds",
  "resolution",
  "width",
  "trigger_px",
  "trigger_area_pct",
  # The run's own trigger: eval/implant_amplitude, mean over the second half's evaluations, and final.
  "implant",
  "implant_final",
  "implant_lo_final",
  "implant_hi_final",
  # Every template, second-half mean (the run's own size equals ``implant``): a clean run's noise floor per size.
  *(f"implant_{s}px" for s in SIZES),
  "above_p99",
  "above_p99_clean_fpr",
  "diversity",
  "diversity_final",
  "swd",
  "swd_final",
  "attacker_weight",
  "honest_weight_min",
  "honest_weight_max",
  # Final evaluation: membership inference (every run) and, conditional runs only, downstream utility.
  *UTILITY_COLUMNS,
  "tpr_flagged",
  "fpr_flagged",
  "rounds_flagged",
  "tpr_acted",
  "fpr_acted",
  "rounds_acted",
  "attacker_first_flagged",
  "wall_sec",
)


def _mean(xs: Sequence[float]) -> float | None:
  xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
  return float(np.mean(xs)) if xs else None


def run_row(setting: str, config, run_dir: str) -> dict[str, Any] | None:
  """One CSV row from a finished run directory, or None if it is not finished."""
  summary = rundir.read_summary(run_dir)
  records = rundir.read_records(os.path.join(run_dir, "metrics.jsonl"))
  if not summary or not records or summary.get("rounds") != config.num_rounds:
    return None
  final = summary.get("final", {})
  size, _ = config_lib.trigger_geometry(config)
  is_mal = np.zeros(config.num_clients, bool)
  is_mal[list(config.attack.malicious)] = True
  weights = np.asarray(records[-1]["agg/weights"], float)
  # The second half's evaluations: the implant comes and goes between rounds, one snapshot is noisy.
  late = [r for r in records if r["round"] > config.num_rounds // 2 and "eval/implant_amplitude" in r]
  late_mean = lambda key: _mean([r.get(key) for r in late])
  floor = ((summary.get("trigger_calibration") or {}).get("templates") or {}).get("run") or {}
  row: dict[str, Any] = {
    "setting": setting,
    "seed": config.seed,
    "rounds": summary["rounds"],
    "resolution": config.resolution,
    "width": config.model.g_width,
    "trigger_px": size,
    "trigger_area_pct": round(100.0 * size * size / config.resolution**2, 3),
    "implant": late_mean("eval/implant_amplitude"),
    "implant_final": final.get("eval/implant_amplitude"),
    "implant_lo_final": final.get("eval/implant_amplitude_lo"),
    "implant_hi_final": final.get("eval/implant_amplitude_hi"),
    "above_p99": late_mean("eval/implant_above_p99"),
    "above_p99_clean_fpr": floor.get("fpr_out_of_sample"),
    "diversity": late_mean("eval/diversity"),
    "diversity_final": final.get("eval/diversity"),
    "swd": late_mean("eval/swd"),
    "swd_final": final.get("eval/swd"),
    "attacker_weight": float(weights[is_mal].max()) if is_mal.any() else None,
    "honest_weight_min": float(weights[~is_mal].min()),
    "honest_weight_max": float(weights[~is_mal].max()),
    "wall_sec": round(summary.get("wall_sec") or 0.0, 1),
  }
  row.update({f"{k}_final": final.get(f"eval/{k}") for k in UTILITY_KEYS})
  for s in SIZES:
    row[f"implant_{s}px"] = row["implant"] if s == size else late_mean(f"eval/implant_amplitude@{s}px")
  if config.aggregation.name == "detect":
    det = summary.get("detection") or {}
    for k in ("tpr_flagged", "fpr_flagged", "rounds_flagged", "tpr_acted", "fpr_acted", "rounds_acted"):
      row[k] = det.get(k)
    first = (summary.get("first_flag_round") or {}).values()
    row["attacker_first_flagged"] = min((v for v in first if v is not None), default=None) if is_mal.any() else None
  return row


def collect(
  workdir: str, config_path: str = CONFIG, base_overrides: dict[str, Any] | None = None, row_fn=run_row
) -> list[dict[str, Any]]:
  """The rows of every finished run of the sweep (in the sweep's order); ``row_fn(setting, config, run_dir)``."""
  plan = sweep.plan_sweep(config_path, workdir, batch_seeds=True, base_overrides=base_overrides)
  rows = []
  for point, config, run_dir in zip(plan.points, plan.configs, plan.dirs):
    row = row_fn(point.get("_setting", os.path.basename(run_dir)), config, run_dir)
    if row is not None:
      rows.append(row)
  return rows


def write_csv(path: str, rows: Sequence[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> None:
  """One row per run, ``columns`` in order (None as an empty cell)."""
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(columns))
    w.writeheader()
    for r in rows:
      w.writerow({k: ("" if r.get(k) is None else r[k]) for k in columns})


def read_csv(path: str) -> list[dict[str, Any]]:
  """Rows of a results CSV with numbers parsed (empty cells are None)."""

  def parse(v: str) -> Any:
    if v == "":
      return None
    try:
      return int(v)
    except ValueError:
      try:
        return float(v)
      except ValueError:
        return v

  with open(path, newline="") as f:
    return [{k: parse(v) for k, v in r.items()} for r in csv.DictReader(f)]


def git(*args: str) -> str:
  """``git <args>``'s stripped output in the current directory, or ``unknown``."""
  out = subprocess.run(["git", *args], capture_output=True, text=True)
  return out.stdout.strip() if out.returncode == 0 else "unknown"


def record_commit(workdir: str, commit: str, fresh: bool) -> None:
  """Notes in ``<workdir>/COMMIT`` the commit that trains cells now (one line per commit, oldest first).

  A fresh matrix starts the file; a resumed one (new cells added to the config) appends its commit when it
  differs from the last, so the page names every commit its cells came from.
  """
  path = os.path.join(workdir, COMMIT_FILE)
  known = [] if fresh else run_commits(workdir)
  if known and known[-1] == commit:
    return
  with open(path, "w") as f:
    f.write("".join(c + "\n" for c in known + [commit]))


def run_commits(workdir: str) -> list[str]:
  """The commits recorded by ``record_commit`` (empty when there is no record)."""
  try:
    with open(os.path.join(workdir, COMMIT_FILE)) as f:
      return [line.strip() for line in f if line.strip()]
  except OSError:
    return []


def provenance(
  workdir: str,
  wall_sec: float | None,
  outputs: Sequence[str] = ("docs/results.csv", "docs/results.md"),
  module: str = "launch.results",
) -> dict[str, Any]:
  """Where the numbers come from: commit, date, machine, the command and how long the runs took.

  ``outputs``: the files the command writes; they do not make the tree dirty (a regeneration rewrites them).
  ``module``: the command's ``python -m`` module.
  """

  dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", *(f":!{o}" for o in outputs)))
  cpu = platform.processor() or ""
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
  except OSError:
    pass
  return {
    "commit": git("rev-parse", "--short", "HEAD") + (" (with uncommitted changes)" if dirty else ""),
    "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
    "machine": f"{cpu}, {os.cpu_count()} cores",
    "command": f"python -m {module} --workdir {workdir}",
    "wall_sec": wall_sec,
  }


def main(
  argv: Sequence[str] | None = None,
  *,
  name: str = "results",
  config: str = CONFIG,
  render=None,
  row_fn=run_row,
  columns: Sequence[str] = COLUMNS,
  doc: str = __doc__,
) -> int:
  """The command: run the sweep of ``config`` (resumable), then write ``<out>/<name>.csv`` and ``<name>.md``.

  Args:
    argv: command-line arguments (None: ``sys.argv``).
    name: the pages' file name and the ``launch.<name>`` module of the command the page quotes.
    config: the sweep (``get_config`` + ``get_sweep``).
    render: ``render(rows, provenance) -> markdown`` (None: ``results_page.render``).
    row_fn: ``row_fn(setting, config, run_dir) -> row | None`` (one CSV row per finished run).
    columns: the CSV's columns.
    doc: the command's description (its first line).

  Returns:
    The exit status: 0, or 2 after a message on stderr.
  """
  render = render or results_page.render
  p = argparse.ArgumentParser(prog=f"python -m launch.{name}", description=doc.split("\n")[0])
  p.add_argument("--workdir", default=f"runs/{name}", help="where the runs live (resumable)")
  p.add_argument("--out", default="docs", help=f"folder for {name}.csv and {name}.md")
  p.add_argument("--no-run", action="store_true", help="do not train; rewrite the files from finished runs")
  p.add_argument("--config", default=config, help="the sweep (get_config + get_sweep)")
  p.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="FIELD=VALUE",
    help="a config override under every setting, e.g. --set data.source=folder --set data.path=/data/ISIC",
  )
  args = p.parse_args(argv)
  wall = None
  try:
    base = sweep.parse_sets(args.set)
    if not args.no_run:
      finished_before = len(collect(args.workdir, args.config, base, row_fn))
      os.makedirs(args.workdir, exist_ok=True)
      record_commit(args.workdir, git("rev-parse", "--short", "HEAD"), fresh=not finished_before)
      t0 = time.perf_counter()
      sweep.run_sweep(args.config, args.workdir, batch_seeds=True, base_overrides=base)
      # End to end only when this call trained everything (a resumed call's time says nothing).
      wall = None if finished_before else time.perf_counter() - t0
    rows = collect(args.workdir, args.config, base, row_fn)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if not rows:
    print(f"error: no finished run under {args.workdir}; run without --no-run first.", file=sys.stderr)
    return 2
  os.makedirs(args.out, exist_ok=True)
  csv_path, md_path = os.path.join(args.out, f"{name}.csv"), os.path.join(args.out, f"{name}.md")
  write_csv(csv_path, rows, columns)
  prov = provenance(args.workdir, wall, (f"docs/{name}.csv", f"docs/{name}.md"), f"launch.{name}")
  prov["command"] += "".join(f" --set {s}" for s in args.set)
  prov["data"] = base.get("data.source", "synthetic")
  prov["runs_commit"] = ", ".join(run_commits(args.workdir)) or None
  page = render(rows, prov)
  with open(md_path, "w") as f:
    f.write(page)
  print(f"wrote {len(rows)} runs to {csv_path} and {name}.md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
