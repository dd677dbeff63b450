"""A sweep's points on a cluster: a SLURM job array through ``submitit`` (``pip install -e ".[cluster]"``).

    # One array task per point (per seed group with --batch-seeds), 8 running at once, one GPU each:
    python -m launch.cluster --config configs/paper_sweep.py --workdir runs/paper_sweep --batch-seeds \\
        --partition gpu --gpus-per-node 1 --timeout-min 240 --max-parallel 8
    # The same on this machine (submitit's local executor: subprocesses), e.g. to try a sweep first:
    python -m launch.cluster --config configs/paper_sweep.py --workdir runs/paper_sweep --executor local
    # Submit and return (print the job ids); later, gather results.csv from what has finished:
    python -m launch.cluster ... --no-wait
    python -m launch.cluster ... --gather

Each task runs its point exactly as ``python -m launch.sweep`` does
(``experiment.run`` into the point's directory, compilations shared through
``<workdir>/.jax_cache``), so the directories, ``summary.json`` files and
``results.csv`` are the sweep's. Points already finished are not submitted;
an interrupted or failed point resumes from its last checkpoint when the
same command is run again. When the array ends, ``results.csv`` is written
and every failed point is printed by name with the first line of its error
(the full log: ``<workdir>/.submitit/<job id>_*``); the exit status is 1 if
any failed. One run across several hosts stays ``jax.distributed`` (README).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from launch import sweep


def run_group(config_path: str, workdir: str, group: int, batch_seeds: bool, base: dict[str, Any]) -> str:
  """One array task: group ``group`` of the sweep's plan, trained in this process. Returns its directory."""
  import jax

  plan = sweep.plan_sweep(config_path, workdir, batch_seeds, base)
  g = plan.groups[group]
  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, ".jax_cache"))
  sweep._run_in_process(plan.configs[g[0]], plan.group_dirs[group], len(g) if batch_seeds else 1)
  return plan.group_dirs[group]


def executor(kind: str, folder: str, args: argparse.Namespace):
  """A submitit executor (``slurm`` or ``local``) with the job's resources."""
  try:
    import submitit
  except ImportError as e:
    raise ValueError('--executor needs the submitit package: pip install -e ".[cluster]"') from e
  if kind == "local":
    ex = submitit.LocalExecutor(folder=folder)
    ex.update_parameters(timeout_min=args.timeout_min, gpus_per_node=args.gpus_per_node)
  else:
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    params: dict[str, Any] = dict(
      timeout_min=args.timeout_min,
      gpus_per_node=args.gpus_per_node,
      cpus_per_task=args.cpus_per_task,
      slurm_array_parallelism=args.max_parallel,
      name=args.job_name,
    )
    if args.partition:
      params["slurm_partition"] = args.partition
    ex.update_parameters(**params)
  return ex


def _first_line(e: BaseException) -> str:
  """The error a task raised: submitit's FailedJobError carries the task's traceback and then log paths."""
  lines = [ln.strip() for ln in str(e).splitlines()]
  errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b.*", ln)]
  return (errors[-1] if errors else (lines[0] if lines else type(e).__name__))[:300]


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m launch.cluster", description=__doc__.split("\n")[0])
  p.add_argument("--config", required=True, help="the sweep (get_config + get_sweep), as for launch.sweep")
  p.add_argument("--workdir", required=True, help="the sweep directory (shared by every node)")
  p.add_argument("--batch-seeds", action="store_true", help="consecutive seeds of a point as one vmapped program")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override under every point")
  p.add_argument("--executor", choices=("slurm", "local"), default="slurm")
  p.add_argument("--partition", default="", help="SLURM partition ('' = the cluster's default)")
  p.add_argument("--gpus-per-node", type=int, default=0)
  p.add_argument("--cpus-per-task", type=int, default=4)
  p.add_argument("--timeout-min", type=int, default=240, help="per task; a task past it resumes on the next call")
  p.add_argument("--max-parallel", type=int, default=16, help="array tasks running at once (SLURM)")
  p.add_argument("--job-name", default="fedgan_jax")
  p.add_argument("--no-wait", action="store_true", help="submit, print the job ids and return")
  p.add_argument("--gather", action="store_true", help="submit nothing: write results.csv from finished points")
  args = p.parse_args(argv)
  try:
    base = sweep.parse_sets(args.set)
    plan = sweep.plan_sweep(args.config, args.workdir, args.batch_seeds, base)
    finished = [sweep.is_finished(d, c.num_rounds) for c, d in zip(plan.configs, plan.dirs)]
    todo = [k for k, g in enumerate(plan.groups) if not all(finished[i] for i in g)]
    labels = [os.path.basename(plan.group_dirs[k]) for k in todo]
    failures: list[str] = []
    if todo and not args.gather:
      os.makedirs(args.workdir, exist_ok=True)
      ex = executor(args.executor, os.path.join(args.workdir, ".submitit"), args)
      n = len(todo)
      jobs = ex.map_array(run_group, [args.config] * n, [args.workdir] * n, todo, [args.batch_seeds] * n, [base] * n)
      print(f"cluster: {len(plan.groups)} programs, {n} submitted ({args.executor})", flush=True)
      for label, job in zip(labels, jobs):
        print(f"  {job.job_id}: {label}", flush=True)
      if args.no_wait:
        print(f"rerun with --gather when they finish (squeue, or {args.workdir}/.submitit/)", flush=True)
        return 0
      for label, job in zip(labels, jobs):
        try:
          job.result()
          print(f"done: {label}", flush=True)
        except Exception as e:  # One failed point must not hide the others; it is reported by name.
          failures.append(f"{label}: {_first_line(e)}")
          print(f"FAILED: {label}", flush=True)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  rows = [
    sweep.result_row(n, pt, sweep.read_summary(d), run_dir=d) for n, pt, d in zip(plan.names, plan.points, plan.dirs)
  ]
  sweep.write_results(os.path.join(args.workdir, "results.csv"), rows)
  print(sweep.format_table(rows))
  print(f"results: {os.path.join(args.workdir, 'results.csv')}")
  unfinished = [
    os.path.basename(plan.group_dirs[k])
    for k, g in enumerate(plan.groups)
    if not all(sweep.is_finished(plan.dirs[i], plan.configs[i].num_rounds) for i in g)
  ]
  if failures:
    print(
      "failed points (rerun the same command: finished points are skipped, the rest resume):\n  "
      + "\n  ".join(failures)
    )
  elif unfinished:
    print("unfinished points:\n  " + "\n  ".join(unfinished))
  return 1 if failures or (unfinished and not args.gather) else 0


if __name__ == "__main__":
  sys.exit(main())
