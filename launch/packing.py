"""``launch.sweep --pack``: the sweep's points that share a program, trained as one (``fedgan_jax/pack.py``).

Points are grouped by their program signature (the config without the fields
that are array inputs of the round: who is malicious, the trigger pattern
and size (at a fixed location), poison rate, mimic reports, the upload
attack and its window, the seed, ...; the learning rates and nonzero
regularizer weights, traced per point) and by the round their checkpoints
are at; each group of two or more trains
as one program over a leading point axis and writes every point's directory
as its own run would, so a packed sweep and an unpacked one are
interchangeable (either resumes the other). A group that cannot train
exactly as its points' own runs (``pack.NotPackableError``), or that diverges
(one point's NaN stops its program), runs its points one by one instead, each
from its own last checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from fedgan_jax import pack


def print_plan(plan, out, max_size: int = 0) -> None:
  """``--pack --dry-run``: the programs the bases (if any) and the points form, and why a point runs alone.

  Args:
    plan: ``launch.sweep.plan_sweep``'s ``SweepPlan``.
    out: where the plan is printed.
    max_size: at most this many points per program (0: no limit).
  """
  if plan.bases:
    configs, dirs = [b[0] for b in plan.bases], [b[1] for b in plan.bases]
    print("bases:", file=out)
    print("\n".join(pack.plan_lines(pack.plan(configs, _names(dirs), dirs, max_size), _names(dirs))), file=out)
  p = pack.plan(plan.configs, plan.names, plan.dirs, max_size)
  print("\n".join(pack.plan_lines(p, plan.names)), file=out)


def run_plan(plan, todo: Sequence[int], bases: Sequence[tuple[Any, str]], run_one, out, max_size: int = 0):
  """Runs a sweep packed: the unfinished bases (packed, first), then the points to run (``todo``).

  Args:
    plan: ``launch.sweep.plan_sweep``'s ``SweepPlan``.
    todo: indices of the points to run.
    bases: ``(config, run_dir)`` of each base run still to train (the points fork from them).
    run_one: ``(config, run_dir) -> None``, the sweep's run of one point.
    out: where the plan and progress are printed.
    max_size: at most this many points per program (0: no limit).

  Returns:
    ``'<name>: <error>'`` per failed point.

  Raises:
    ValueError: a base run failed (no point was run).
  """
  if bases:
    print(f"bases: {len(bases)} (the points fork from them)", file=out, flush=True)
    configs, dirs = [c for c, _ in bases], [d for _, d in bases]
    bad = run_groups(configs, dirs, _names(dirs), run_one, out, max_size)
    if bad:
      raise ValueError(f"base runs failed ({'; '.join(bad)}); the points were not run")
  pick = lambda xs: [xs[i] for i in todo]
  return run_groups(pick(plan.configs), pick(plan.dirs), pick(plan.names), run_one, out, max_size)


def run_groups(
  configs: Sequence[Any],
  dirs: Sequence[str],
  names: Sequence[str],
  run_one: Callable[[Any, str], None],
  out,
  max_size: int = 0,
) -> list[str]:
  """Runs points grouped by ``pack.plan``: each group as one program, a point alone with ``run_one``.

  Args:
    configs: the points to run (validated configs).
    dirs: their run directories.
    names: their names (printed).
    run_one: ``(config, run_dir) -> None``, the sweep's run of one point.
    out: where the plan and progress are printed.
    max_size: at most this many points per program (0: no limit).

  Returns:
    ``'<name>: <error>'`` per failed point (a failure stops no other group).
  """
  p = pack.plan(configs, names, dirs, max_size)
  for line in pack.plan_lines(p, names):
    print(line, file=out, flush=True)
  failures: list[str] = []

  def alone(i: int) -> None:
    try:
      run_one(configs[i], dirs[i])
    except Exception as e:  # One bad point must not stop the sweep; it is reported.
      failures.append(f"{names[i]}: {type(e).__name__}: {e}")
      print(f"  failed: {names[i]}: {e}", file=out, flush=True)

  for n, g in enumerate(p.groups):
    what = f"{len(g)} points packed" if len(g) > 1 else names[g[0]]
    print(f"[{n + 1}/{len(p.groups)}] {what}", file=out, flush=True)
    if len(g) == 1:
      alone(g[0])
      continue
    try:
      pack.run_packed([configs[i] for i in g], [dirs[i] for i in g])
    except (pack.NotPackableError, FloatingPointError) as e:
      # Not packable: nothing was written. Diverged: each point resumes alone from its last checkpoint and
      # the one that diverges fails by itself.
      print(f"  not packed ({e}); its {len(g)} points run one by one", file=out, flush=True)
      for i in g:
        alone(i)
    except Exception as e:  # The whole program failed: every point of it is reported.
      for i in g:
        failures.append(f"{names[i]}: {type(e).__name__}: {e}")
      print(f"  failed: {e}", file=out, flush=True)
  return failures


def _names(dirs: Sequence[str]) -> list[str]:
  return [os.path.basename(os.path.normpath(d)) for d in dirs]
