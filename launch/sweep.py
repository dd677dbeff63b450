"""Sweeps: expand a grid of config overrides and run every point, resumably.

    python -m launch.sweep --config configs/paper_sweep.py --workdir runs/sweep \\
        [--parallel N] [--dry-run] [--subprocess] [--batch-seeds] [--pack [--pack-size N]]

The config file defines ``get_config()`` (the base run) and ``get_sweep()``
(a list of dicts of dotted overrides, e.g. ``{'attack.malicious': (0,),
'seed': 1}``; build it with ``product`` and ``zipped`` below). Each point runs
in ``<workdir>/<name>`` where ``name`` is read off its overrides
(``malicious-0__defense-gp__seed-1``). A point whose ``summary.json`` reports
``rounds == num_rounds`` is skipped, so rerunning the command resumes the
sweep (a point interrupted mid-run resumes from its last checkpoint). At the
end ``<workdir>/results.csv`` has one row per point (its overrides, status,
final metrics, detection means and first flagged rounds) and a summary table is
printed; ``python -m fedgan_jax.report --workdir <workdir>`` builds its
comparison from the same rows (``fedgan_jax.report.table``).

A config file may also define ``get_base()`` (a dict of overrides, e.g.
``{'attack.malicious': (), 'num_rounds': 50}``): the sweep then trains that
clean base once per seed group (``<workdir>/base__seed-<s>``) before any
point, and every point starts from its checkpoint (``init_from``; see
``fedgan_jax/fork.py``): the canonical "attack a converged federation" setup.

Keys starting with ``_`` are labels, not config fields: ``{'_defense': 'gp',
'train.loss': 'wgan', ...}`` names the point ``defense-gp`` instead of
spelling out the keys that the label stands for.

* default: points run one after another in this process (``experiment.run``);
  programs that differ only in seed or attack mask share compilations through
  the persistent JAX cache in ``<workdir>/.jax_cache``.
* ``--parallel N``: N points at a time, each ``python -m fedgan_jax.main`` in
  its own process (on a 2-core CPU N > 1 does not help: one run already uses
  both cores).
* ``--dry-run``: print the exact ``python -m fedgan_jax.main ...`` commands,
  one per line, to hand to a scheduler; runs nothing.
* ``--batch-seeds``: points that differ only in consecutive ``seed`` values
  run as ONE vmapped program (``config.num_replicas``) in
  ``<workdir>/<name without seed>__seeds-0-2/``, each replica writing
  ``seed_<s>/`` like a single run (printed commands carry
  ``--config.num_replicas=K``).
* ``--pack``: points whose configs differ only in array inputs of the round
  (who is malicious, trigger pattern and size, poison rate, mimic, the
  upload attack and its window, seed, ...) train as ONE program over a leading point axis
  (``fedgan_jax/pack.py``, ``launch/packing.py``); every point still writes
  ``<workdir>/<name>`` exactly as its own run, so packed and unpacked sweeps
  resume each other. The printed plan names the programs formed and why a
  point runs alone (with ``--dry-run``: the plan only). ``--pack-size N``
  caps the points per program (an accelerator's memory). For accelerators:
  on a 2-core CPU one point already fills the cores, and a packed sweep ran
  at 0.88x the points per hour of the same points one by one
  (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax

from fedgan_jax import config_lib, experiment
from fedgan_jax.io.rundir import read_summary
from fedgan_jax.report import table
from launch import packing
from launch.grid import _HIDE, Point, _fmt_value, check_names, overrides, point_name, product, zipped  # noqa: F401

SUMMARY_COLUMNS = table.SUMMARY_COLUMNS


# --------------------------------------------------------------------------- configs


def load_module(path: str):
  """Imports a config file (``get_config`` / ``get_sweep``) by path."""
  if not os.path.isfile(path):
    raise ValueError(f"--config={path!r}: no such file.")
  spec = importlib.util.spec_from_file_location(f"sweep_cfg_{abs(hash(path))}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  for fn in ("get_config", "get_sweep"):
    if not callable(getattr(mod, fn, None)):
      raise ValueError(f"--config={path!r} must define {fn}() (see launch/sweep.py).")
  return mod


def apply_overrides(config, point: Point):
  """A copy of ``config`` with a point's overrides set (new ``aggregation.kwargs`` allowed).

  Raises:
    ValueError: an override names a field the config does not have.
  """
  config = copy.deepcopy(config)
  for dotted, value in overrides(point).items():
    config_lib.set_field(config, dotted, value)
  return config


def _cli_value(v: Any) -> str:
  """A value as ``--config.x=<value>`` text that ``config_lib.parse_value`` reads back as ``v``."""
  if isinstance(v, (tuple, list)):  # Strings inside a tuple are quoted, or they would not parse back.
    return "(" + "".join(f"{repr(x) if isinstance(x, str) else _cli_value(x)}," for x in v) + ")"
  if isinstance(v, float) and math.isfinite(v):
    return repr(v)
  return str(v)


def command(
  config_path: str, workdir: str, point: Point, python: str = "python", base: dict[str, Any] | None = None
) -> list[str]:
  """The ``python -m fedgan_jax.main`` argv that runs ``point`` (after the sweep-wide ``base`` overrides)."""
  argv = [python, "-m", "fedgan_jax.main", f"--config={config_path}", f"--workdir={workdir}"]
  argv += [f"--config.{k}={_cli_value(v)}" for k, v in {**(base or {}), **overrides(point)}.items()]
  return argv


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
  """``--set field=value`` arguments as ``{field: value}`` (values parsed as on the command line of a run).

  Raises:
    ValueError: an item without ``=`` or naming an unknown field.
  """
  out = {}
  for item in items:
    field, eq, text = item.partition("=")
    if not eq or not field:
      raise ValueError(f"--set {item!r}: expected field=value, e.g. --set data.source=folder.")
    config_lib.check_field(field)
    out[field] = config_lib.parse_value(text)
  return out


# --------------------------------------------------------------------------- status and results


def is_finished(run_dir: str, num_rounds: int) -> bool:
  """True when the run's ``summary.json`` reports ``rounds >= num_rounds``."""
  s = read_summary(run_dir)
  return bool(s) and int(s.get("rounds", 0) or 0) >= num_rounds


def point_settings(point: Point) -> dict[str, Any]:
  """A point's overrides and labels as table cells: labels lose their ``_``, lists read as in names (``0-1``)."""
  return {k.lstrip("_"): _fmt_value(v) if isinstance(v, (tuple, list)) else v for k, v in point.items() if k != _HIDE}


def result_row(name: str, point: Point, summary: dict | None, run_dir: str | None = None) -> dict[str, Any]:
  """One results.csv row: name, overrides, status, and the run's final scalar metrics.

  Args:
    name: The point's name.
    point: Its overrides (and labels).
    summary: Its run's ``summary.json``, or None (status ``missing``).
    run_dir: Its run directory (read only for what ``summary`` lacks).

  Returns:
    A row of the sweep table (``fedgan_jax.report.table.sweep_row``).
  """
  return table.sweep_row(name, point_settings(point), summary, run_dir=run_dir)


def write_results(path: str, rows: Sequence[dict[str, Any]]) -> list[str]:
  """Writes ``rows`` to CSV (columns: union, first-seen order); returns the columns."""
  return table.write_csv(path, rows)


format_table = table.text_table  # The printed summary: name, status, headline metrics, detection means.


# --------------------------------------------------------------------------- seeds as replicas


def seed_groups(points: Sequence[Point]) -> list[list[int]]:
  """Indices of points grouped by everything but ``seed`` (for ``--batch-seeds``).

  A group's seeds must be consecutive (``s, s+1, ...``), as replicas run seeds
  ``seed + k``; otherwise the group is split.
  """
  groups: dict[str, list[int]] = {}
  for i, p in enumerate(points):
    key = json.dumps({k: repr(v) for k, v in overrides(p).items() if k != "seed"}, sort_keys=True)
    groups.setdefault(key, []).append(i)
  out = []
  for idx in groups.values():
    idx = sorted(idx, key=lambda i: points[i].get("seed", 0))
    run = [idx[0]]
    for i in idx[1:]:
      if points[i].get("seed", 0) == points[run[-1]].get("seed", 0) + 1:
        run.append(i)
      else:
        out.append(run)
        run = [i]
    out.append(run)
  return sorted(out)


# --------------------------------------------------------------------------- running


def _run_in_process(config, run_dir: str, num_replicas: int = 1) -> None:
  """``experiment.run`` of one point, or of ``num_replicas`` consecutive seeds as one program."""
  config = copy.deepcopy(config)
  with config.unlocked():
    config.num_replicas = num_replicas
  experiment.run(config, run_dir)


def group_name(point: Point, seeds: Sequence[int]) -> str:
  """The directory name of a group of seeds run as replicas: ``<name without seed>__seeds-0-2``."""
  rest = {k: v for k, v in point.items() if k != "seed"}
  base = point_name(rest)
  span = f"{min(seeds)}" if len(seeds) == 1 else f"{min(seeds)}-{max(seeds)}"
  return f"{base}__seeds-{span}"


class SweepPlan(NamedTuple):
  """A sweep expanded: its points, their validated configs, and where each runs.

  Attributes:
    points: the points of ``get_sweep()``.
    base: sweep-wide overrides (``--set``) applied to ``get_config()`` under every point.
    names: each point's directory name.
    configs: each point's validated config.
    seeds: each point's seed.
    groups: indices of the points run as one program (one point each, or the
      consecutive seeds of a point with ``batch_seeds``).
    group_dirs: each group's directory.
    dirs: each point's run directory (``<group>/seed_<s>`` with ``batch_seeds``).
  """

  points: list[Point]
  base: dict[str, Any]
  names: list[str]
  configs: list[Any]
  seeds: list[int]
  groups: list[list[int]]
  group_dirs: list[str]
  dirs: list[str]
  bases: list[tuple[Any, str, int, dict[str, Any]]] = []  # get_base(): (config, dir, replicas, overrides).


def plan_sweep(
  config_path: str, workdir: str, batch_seeds: bool = False, base_overrides: dict[str, Any] | None = None
) -> SweepPlan:
  """Expands the sweep of ``config_path`` into validated points and their run directories.

  Args:
    config_path: file with ``get_config()`` and ``get_sweep()``.
    workdir: the sweep directory.
    batch_seeds: group consecutive seeds of a point into one program.
    base_overrides: ``{field: value}`` set on ``get_config()`` before every point's own overrides
      (e.g. ``data.source`` and ``data.path`` to run the same settings on a folder of real images).

  Raises:
    ValueError: bad config file, overrides or names.
  """
  mod = load_module(config_path)
  base = mod.get_config()
  base_overrides = dict(base_overrides or {})
  for dotted, value in base_overrides.items():
    config_lib.set_field(base, dotted, value)
  points = list(mod.get_sweep())
  if not points:
    raise ValueError(f"--config={config_path!r}: get_sweep() returned no points.")
  names = check_names(points)
  configs = []
  for n, p in zip(names, points):
    try:
      configs.append(config_lib.validate(apply_overrides(base, p)))
    except ValueError as e:
      raise ValueError(f"sweep point {n}: {e}") from e
  seeds = [c.seed for c in configs]
  if batch_seeds:
    groups = seed_groups([dict(overrides(p), seed=s) for p, s in zip(points, seeds)])
    group_dirs = [os.path.join(workdir, group_name(points[g[0]], [seeds[i] for i in g])) for g in groups]
    dirs = [""] * len(points)
    for g, gdir in zip(groups, group_dirs):
      for i in g:
        dirs[i] = os.path.join(gdir, f"seed_{seeds[i]}")  # Where experiment.run writes replica i.
  else:
    groups = [[i] for i in range(len(points))]
    group_dirs = [os.path.join(workdir, n) for n in names]
    dirs = list(group_dirs)
  bases = _plan_bases(mod, base, workdir, groups, configs, seeds, batch_seeds)
  return SweepPlan(points, base_overrides, names, configs, seeds, groups, group_dirs, dirs, bases)


def _plan_bases(mod, base, workdir: str, groups, configs, seeds, batch_seeds: bool) -> list:
  """``get_base()``: one clean base run per seed group, trained first; every point forks from its group's.

  The base is ``get_config()`` (with ``--set``) under ``get_base()``'s overrides, its ``num_rounds`` the
  round the points fork at; its seeds (and replicas, with ``batch_seeds``) are the group's, so each seed's
  point forks from the same seed's base. Sets ``init_from`` on the points' configs.
  """
  get_base = getattr(mod, "get_base", None)
  if not callable(get_base):
    return []
  over = dict(get_base())
  try:
    base_config = config_lib.validate(apply_overrides(base, over))
  except ValueError as e:
    raise ValueError(f"get_base(): {e}") from e
  bases, seen = [], {}
  for g in groups:
    seed, k = seeds[g[0]], len(g) if batch_seeds else 1
    if (seed, k) not in seen:
      d = os.path.join(workdir, f"base__seeds-{seed}-{seed + k - 1}" if k > 1 else f"base__seed-{seed}")
      bc = copy.deepcopy(base_config)
      bc.seed = seed
      seen[(seed, k)] = d
      bases.append((bc, d, k, dict(over, seed=seed)))
    for i in g:
      if configs[i].num_rounds <= base_config.num_rounds:
        raise ValueError(
          f"get_base(): num_rounds={base_config.num_rounds} leaves nothing to train for a point with "
          f"num_rounds={configs[i].num_rounds} (points fork at the base's last round)."
        )
      configs[i].init_from = f"{seen[(seed, k)]}@{base_config.num_rounds}"
  return bases


def _base_finished(config, d: str, k: int) -> bool:
  return is_finished(os.path.join(d, f"seed_{config.seed}") if k > 1 else d, config.num_rounds)


def run_sweep(
  config_path: str,
  workdir: str,
  parallel: int = 1,
  dry_run: bool = False,
  use_subprocess: bool = False,
  batch_seeds: bool = False,
  python: str = sys.executable,
  out=sys.stdout,
  base_overrides: dict[str, Any] | None = None,
  pack: bool = False,
  pack_size: int = 0,
) -> list[dict[str, Any]]:
  """Expands, runs (skipping finished points) and summarizes a sweep.

  Args:
    config_path: file with ``get_config()`` and ``get_sweep()``.
    workdir: the sweep directory (one subdirectory per point, results.csv).
    parallel: points run at once (> 1 implies subprocesses).
    dry_run: print the commands (one per line) and run nothing.
    use_subprocess: run each point as ``python -m fedgan_jax.main``.
    batch_seeds: run points differing only in seed as replicas of one program.
    python: interpreter for subprocesses and printed commands.
    out: where commands and the table are printed.
    base_overrides: sweep-wide ``{field: value}`` set under every point (``--set``).
    pack: train the points that share a program as one (``launch/packing.py``), in this process.
    pack_size: with ``pack``, at most this many points per program (0: no limit).

  Returns:
    The results rows (also written to ``<workdir>/results.csv``), or ``[]`` on a dry run.

  Raises:
    ValueError: bad config file, overrides, names, or flags.
  """
  if parallel < 1:
    raise ValueError(f"--parallel={parallel} must be >= 1.")
  if pack and (batch_seeds or parallel > 1 or use_subprocess):
    raise ValueError("--pack trains in this process and packs seeds too: drop --batch-seeds, --parallel, --subprocess.")
  if pack_size < 0:
    raise ValueError(f"--pack-size={pack_size} must be >= 0 (0: no limit).")
  plan = plan_sweep(config_path, workdir, batch_seeds, base_overrides)
  points, names, configs, seeds = plan.points, plan.names, plan.configs, plan.seeds
  groups, group_dirs, dirs = plan.groups, plan.group_dirs, plan.dirs

  def group_point(g: list[int]) -> Point:
    fork = {"init_from": configs[g[0]].init_from} if plan.bases else {}
    if not batch_seeds:
      return dict(points[g[0]], **fork)
    return dict(overrides(points[g[0]]), seed=seeds[g[0]], num_replicas=len(g), **fork)

  def base_point(over: dict[str, Any], k: int) -> Point:
    return dict(over, num_replicas=k) if k > 1 else over

  if dry_run and pack:
    packing.print_plan(plan, out, pack_size)
    return []
  if dry_run:
    for _, d, k, over in plan.bases:
      print(shlex.join(command(config_path, d, base_point(over, k), "python", plan.base)), file=out)
    for g, gdir in zip(groups, group_dirs):
      print(shlex.join(command(config_path, gdir, group_point(g), "python", plan.base)), file=out)
    return []

  os.makedirs(workdir, exist_ok=True)
  todo = [i for i, (c, d) in enumerate(zip(configs, dirs)) if not is_finished(d, c.num_rounds)]
  todo_groups = [k for k, g in enumerate(groups) if any(i in todo for i in g)]
  print(
    f"sweep: {len(points)} points, {len(points) - len(todo)} finished, {len(todo)} to run"
    + (f" in {len(todo_groups)} replica groups" if batch_seeds else ""),
    file=out,
    flush=True,
  )
  cache = os.path.join(workdir, ".jax_cache")
  failures: list[str] = []
  if pack and todo:
    jax.config.update("jax_compilation_cache_dir", cache)
    bases = [(bc, d) for bc, d, k, _ in plan.bases if not _base_finished(bc, d, k)]
    failures += packing.run_plan(plan, todo, bases, _run_in_process, out, pack_size)
    todo_groups = []  # All run: nothing is left for the loops below.
  for bc, d, k, over in [] if pack else plan.bases:  # The clean bases every point forks from, trained once.
    if _base_finished(bc, d, k) or not todo:
      continue
    print(f"base: {os.path.basename(d)} ({bc.num_rounds} rounds; the points fork from it)", file=out, flush=True)
    try:
      if parallel == 1 and not use_subprocess:
        jax.config.update("jax_compilation_cache_dir", cache)
        _run_in_process(bc, d, k)
      else:
        argv = command(config_path, d, base_point(over, k), python, plan.base)
        subprocess.run(argv, check=True, env=dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache))
    except (Exception, subprocess.CalledProcessError) as e:
      raise ValueError(f"the base run {d} failed ({e}); its points were not run") from e
  if parallel == 1 and not use_subprocess:
    jax.config.update("jax_compilation_cache_dir", cache)
    for n, k in enumerate(todo_groups):
      g = groups[k]
      label = os.path.basename(group_dirs[k])
      print(f"[{n + 1}/{len(todo_groups)}] {label}", file=out, flush=True)
      try:
        _run_in_process(configs[g[0]], group_dirs[k], len(g) if batch_seeds else 1)
      except Exception as e:  # One bad point must not stop the sweep; it is reported.
        failures.append(f"{label}: {type(e).__name__}: {e}")
        print(f"  failed: {e}", file=out, flush=True)
  else:
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache)
    running: list[tuple[int, subprocess.Popen, Any]] = []
    queue = list(todo_groups)
    while queue or running:
      while queue and len(running) < parallel:
        k = queue.pop(0)
        os.makedirs(group_dirs[k], exist_ok=True)
        log = open(os.path.join(group_dirs[k], "sweep.log"), "a")
        argv = command(config_path, group_dirs[k], group_point(groups[k]), python, plan.base)
        print(f"start {os.path.basename(group_dirs[k])}: {shlex.join(argv)}", file=out, flush=True)
        running.append((k, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env), log))
      time.sleep(0.5)
      for item in list(running):
        k, proc, log = item
        if proc.poll() is not None:
          log.close()
          running.remove(item)
          label = os.path.basename(group_dirs[k])
          if proc.returncode:
            failures.append(f"{label}: exit {proc.returncode} (see {group_dirs[k]}/sweep.log)")
          print(f"{'done' if proc.returncode == 0 else 'FAILED'}: {label}", file=out, flush=True)

  rows = [result_row(n, p, read_summary(d), run_dir=d) for n, p, d in zip(names, points, dirs)]
  write_results(os.path.join(workdir, "results.csv"), rows)
  print(format_table(rows), file=out)
  print(f"results: {os.path.join(workdir, 'results.csv')}", file=out)
  if failures:
    print("failed points:\n  " + "\n  ".join(failures), file=out)
  return rows


def main(argv: list[str] | None = None) -> None:
  """Command line (see the module docstring)."""
  p = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__.split("\n")[0])
  p.add_argument("--config", required=True, help="file with get_config() and get_sweep()")
  p.add_argument("--workdir", required=True, help="sweep directory")
  p.add_argument("--parallel", type=int, default=1, help="points at once (each in its own process)")
  p.add_argument("--dry-run", action="store_true", help="print the commands, one per line; run nothing")
  p.add_argument("--subprocess", action="store_true", help="run each point in its own process")
  p.add_argument("--batch-seeds", action="store_true", help="run the seeds of a point as replicas of one program")
  p.add_argument("--pack", action="store_true", help="train points that share a program as one (see --dry-run)")
  p.add_argument("--pack-size", type=int, default=0, help="with --pack: at most N points per program (0: all)")
  p.add_argument(
    "--set", action="append", default=[], metavar="FIELD=VALUE", help="a config override under every point"
  )
  a = p.parse_args(argv)
  try:
    base = parse_sets(a.set)
    rows = run_sweep(
      a.config,
      a.workdir,
      a.parallel,
      a.dry_run,
      a.subprocess,
      a.batch_seeds,
      base_overrides=base,
      pack=a.pack,
      pack_size=a.pack_size,
    )
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if any(r.get("status") != "done" for r in rows):
    sys.exit(1)


if __name__ == "__main__":
  main()
