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
COLUMNS = (
  "setting",
  "seed",
  "rounds",
  "resolution",
  "trigger_px",
  "trigger_area_pct",
  "trigger_rate",
  "trigger_strength",
  "swd",
  "trigger_rate_late",
  "trigger_strength_late",
  "swd_late",
  "attacker_weight",
  "honest_weight_min",
  "honest_weight_max",
  "detect_tpr_after_warmup",
  "detect_fpr_after_warmup",
  "rounds_with_a_flag_after_warmup",
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
  # The second half's evaluations: the trigger comes and goes between rounds, one snapshot is noisy.
  late = [r for r in records if r["round"] > config.num_rounds // 2 and "eval/trigger_rate" in r]
  row: dict[str, Any] = {
    "setting": setting,
    "seed": config.seed,
    "rounds": summary["rounds"],
    "resolution": config.resolution,
    "trigger_px": size,
    "trigger_area_pct": round(100.0 * size * size / config.resolution**2, 3),
    "trigger_rate": final.get("eval/trigger_rate"),
    "trigger_strength": final.get("eval/trigger_strength"),
    "swd": final.get("eval/swd"),
    "trigger_rate_late": _mean([r.get("eval/trigger_rate") for r in late]),
    "trigger_strength_late": _mean([r.get("eval/trigger_strength") for r in late]),
    "swd_late": _mean([r.get("eval/swd") for r in late]),
    "attacker_weight": float(weights[is_mal].max()) if is_mal.any() else None,
    "honest_weight_min": float(weights[~is_mal].min()),
    "honest_weight_max": float(weights[~is_mal].max()),
    "wall_sec": round(summary.get("wall_sec") or 0.0, 1),
  }
  if config.aggregation.name == "detect":
    det = summary.get("detection") or {}
    row["detect_tpr_after_warmup"] = det.get("tpr_after_warmup")
    row["detect_fpr_after_warmup"] = det.get("fpr_after_warmup")
    row["rounds_with_a_flag_after_warmup"] = det.get("rounds_with_a_flag_after_warmup")
    first = (summary.get("first_flag_round") or {}).values()
    row["attacker_first_flagged"] = min((v for v in first if v is not None), default=None) if is_mal.any() else None
  return row


def collect(workdir: str, config_path: str = CONFIG) -> list[dict[str, Any]]:
  """The rows of every finished run of the sweep (in the sweep's order)."""
  plan = sweep.plan_sweep(config_path, workdir, batch_seeds=True)
  rows = []
  for point, config, run_dir in zip(plan.points, plan.configs, plan.dirs):
    row = run_row(point.get("_setting", os.path.basename(run_dir)), config, run_dir)
    if row is not None:
      rows.append(row)
  return rows


def write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS)
    w.writeheader()
    for r in rows:
      w.writerow({k: ("" if r.get(k) is None else r[k]) for k in COLUMNS})


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


def provenance(workdir: str, wall_sec: float | None) -> dict[str, Any]:
  """Where the numbers come from: commit, date, machine, the command and how long the runs took."""

  def git(*args: str) -> str:
    out = subprocess.run(["git", *args], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "unknown"

  # The files this command writes do not make the tree dirty (a regeneration rewrites them).
  dirty = bool(
    git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs/results.csv", ":!docs/results.md")
  )
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
    "command": f"python -m launch.results --workdir {workdir}",
    "wall_sec": wall_sec,
  }


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m launch.results", description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="runs/results", help="where the runs live (resumable)")
  p.add_argument("--out", default="docs", help="folder for results.csv and results.md")
  p.add_argument("--no-run", action="store_true", help="do not train; rewrite the files from finished runs")
  p.add_argument("--config", default=CONFIG, help="the sweep (get_config + get_sweep)")
  args = p.parse_args(argv)
  wall = None
  try:
    if not args.no_run:
      finished_before = len(collect(args.workdir, args.config))
      t0 = time.perf_counter()
      sweep.run_sweep(args.config, args.workdir, batch_seeds=True)
      # End to end only when this call trained everything (a resumed call's time says nothing).
      wall = None if finished_before else time.perf_counter() - t0
    rows = collect(args.workdir, args.config)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if not rows:
    print(f"error: no finished run under {args.workdir}; run without --no-run first.", file=sys.stderr)
    return 2
  os.makedirs(args.out, exist_ok=True)
  write_csv(os.path.join(args.out, "results.csv"), rows)
  page = results_page.render(rows, provenance(args.workdir, wall))
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(page)
  print(f"wrote {len(rows)} runs to {os.path.join(args.out, 'results.csv')} and results.md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
