"""Points per hour of a sweep packed (``launch.sweep --pack``) against the same points one by one.

    python -m launch.pack_bench --config configs/paper_sweep.py --points 4 --rounds 5 \\
        [--repeats 2] [--set FIELD=VALUE ...] [--out DIR]

Takes the largest group of the sweep's points that pack into one program
(``fedgan_jax.pack.plan``), its first ``--points``, and runs them with
``--rounds`` rounds each as a user would: ``python -m launch.sweep`` on a sweep
file of just those points, once with ``--pack`` and once without, each in a
fresh workdir (so with a fresh compilation cache: the packed arm compiles its
one program, the other arm compiles for its first point and hits the cache for
the rest, as a new sweep does). Everything a point costs counts: start-up,
data, compilation, rounds, evaluations, checkpoints, reports. With
``--repeats`` > 1 the arms alternate (packed first, then one by one first, ...),
so load that drifts on a shared machine hits both alike; the 1-minute load
average is recorded before and after each arm.

stdout gets one JSON line (progress goes to stderr): per arm, each repeat's
wall seconds and the median points per hour; the training seconds (the
summaries' ``time_sec.training``: the rounds after the first); and the
achieved TFLOP/s of that training with its share of the device's dense peak
(FLOPs counted from one point's round, ``fedgan_jax.flops``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

_SWEEP_FILE = """# Written by launch.pack_bench: the points {names} of {path}.
import importlib.util

from launch.grid import point_name

_spec = importlib.util.spec_from_file_location("pack_bench_base", {path!r})
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
get_config = _mod.get_config
_KEEP = {names!r}


def get_sweep():
  return [p for p in _mod.get_sweep() if point_name(p) in _KEEP]
"""


def _say(msg: str) -> None:
  print(f"[pack_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def select(config_path: str, sets: Sequence[str], points: int) -> tuple[list[str], list[Any]]:
  """The names and configs of the first ``points`` points of the sweep's largest pack.

  Raises:
    ValueError: a bad sweep, a sweep with ``get_base()``, or no two points that pack.
  """
  from fedgan_jax import pack  # pylint: disable=import-outside-toplevel
  from launch import sweep  # pylint: disable=import-outside-toplevel

  plan = sweep.plan_sweep(config_path, tempfile.gettempdir(), base_overrides=sweep.parse_sets(sets))
  if plan.bases:
    raise ValueError(f"--config={config_path!r}: sweeps with get_base() are not measured here.")
  group = max(pack.plan(plan.configs, plan.names).groups, key=len)[:points]
  if len(group) < 2:
    raise ValueError(f"--config={config_path!r} with --points={points}: no two points pack into one program.")
  return [plan.names[i] for i in group], [plan.configs[i] for i in group]


def write_sweep_file(out: str, config_path: str, names: Sequence[str]) -> str:
  """``<out>/pack_bench_sweep.py``: the sweep of ``config_path`` restricted to the points ``names``."""
  path = os.path.join(out, "pack_bench_sweep.py")
  with open(path, "w") as f:
    f.write(_SWEEP_FILE.format(names=list(names), path=os.path.abspath(config_path)))
  return path


def run_arm(sweep_file: str, workdir: str, sets: Sequence[str], rounds: int, names: Sequence[str], packed: bool):
  """One ``python -m launch.sweep`` of the points (``--pack`` or not) in a fresh ``workdir``; its timings.

  Raises:
    RuntimeError: the sweep failed (the end of its output).
  """
  argv = [sys.executable, "-m", "launch.sweep", "--config", sweep_file, "--workdir", workdir]
  argv += [a for s in [*sets, f"num_rounds={rounds}"] for a in ("--set", s)] + (["--pack"] if packed else [])
  load = os.getloadavg()[0]
  t0 = time.perf_counter()
  proc = subprocess.run(argv, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if proc.returncode:
    raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n" + (proc.stdout + proc.stderr)[-3000:])
  summaries = []
  for n in names:
    with open(os.path.join(workdir, n, "summary.json")) as f:
      summaries.append(json.load(f))
  trains = [s["time_sec"]["training"] for s in summaries]
  return {
    "wall_sec": round(wall, 2),
    # Packed points share one program: each summary's training time is the program's.
    "training_sec": round(trains[0] if packed else sum(trains), 3),
    "load_before": load,
    "load_after": os.getloadavg()[0],
    "argv": argv,
  }


def _round_flops(config) -> float:
  """One point's round FLOPs (``fedgan_jax.bench.round_flops``), counted after the arms ran."""
  import jax  # pylint: disable=import-outside-toplevel

  from fedgan_jax import assemble, bench  # pylint: disable=import-outside-toplevel

  data = assemble.setup_data(config)[0]
  program, _, _ = assemble.build_program(config, assemble.local_steps(config, data.counts))
  return float(bench.round_flops(config, program.init(jax.random.key(0)), data, jax.random.key(1)).total)


def measure(config_path: str, points: int, rounds: int, repeats: int, sets: Sequence[str], out: str) -> dict:
  """Both arms ``repeats`` times, alternating; the JSON record (see the module docstring)."""
  names, configs = select(config_path, sets, points)
  os.makedirs(out, exist_ok=True)
  sweep_file = write_sweep_file(out, config_path, names)
  _say(f"{len(names)} points of one program, {rounds} rounds each: {', '.join(names)}")
  arms: dict[str, list[dict]] = {"packed": [], "single": []}
  for r in range(repeats):
    for arm in ("packed", "single") if r % 2 == 0 else ("single", "packed"):
      wd = os.path.join(out, f"repeat{r}", arm)
      shutil.rmtree(wd, ignore_errors=True)  # A new sweep: an old one's finished points would be skipped.
      _say(f"repeat {r + 1}/{repeats}: {arm} (load {os.getloadavg()[0]:.2f})...")
      rec = run_arm(sweep_file, wd, sets, rounds, names, arm == "packed")
      arms[arm].append(rec)
      _say(f"repeat {r + 1}/{repeats}: {arm}: {rec['wall_sec']:.1f} s, training {rec['training_sec']:.1f} s")
  from fedgan_jax import hardware  # pylint: disable=import-outside-toplevel

  flops = _round_flops(configs[0])
  result: dict[str, Any] = {
    "points": len(names),
    "names": names,
    "rounds": rounds,
    "repeats": repeats,
    "config": config_path,
    "sets": list(sets),
    "flops_per_point_round": flops,
  }
  for arm, recs in arms.items():
    wall = statistics.median(r["wall_sec"] for r in recs)
    train = statistics.median(r["training_sec"] for r in recs)
    tflops = len(names) * flops * (rounds - 1) / train / 1e12 if train > 0 and rounds > 1 else None
    result[arm] = {
      "wall_sec": [r["wall_sec"] for r in recs],
      "points_per_hour": round(len(names) * 3600 / wall, 2),
      "training_sec": [r["training_sec"] for r in recs],
      "achieved_tflops": None if tflops is None else round(tflops, 5),
      **hardware.peak_fields(configs[0].train.precision, tflops),
      "load": [(r["load_before"], r["load_after"]) for r in recs],
      "command": " ".join(recs[0]["argv"][1:]),
    }
  result["packed_speedup"] = round(result["packed"]["points_per_hour"] / result["single"]["points_per_hour"], 3)
  result["device"] = hardware.device_info()
  result["date"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
  return result


def main(argv: Sequence[str] | None = None) -> int:
  """Command line (see the module docstring)."""
  p = argparse.ArgumentParser(prog="python -m launch.pack_bench", description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/paper_sweep.py", help="sweep file (get_config, get_sweep)")
  p.add_argument("--points", type=int, default=4, help="points of the largest pack measured (>= 2)")
  p.add_argument("--rounds", type=int, default=5, help="rounds per point (num_rounds)")
  p.add_argument("--repeats", type=int, default=1, help="times each arm runs, alternating which goes first")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a config override (every point)")
  p.add_argument("--out", default="", help="work folder (default: a new temporary folder)")
  a = p.parse_args(argv)
  for name, v, low in (("--points", a.points, 2), ("--rounds", a.rounds, 1), ("--repeats", a.repeats, 1)):
    if v < low:
      p.error(f"{name}={v} must be >= {low}")
  out = a.out or tempfile.mkdtemp(prefix="pack_bench_")
  try:
    result = measure(a.config, a.points, a.rounds, a.repeats, a.set, out)
  except (ValueError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  _say(
    f"packed {result['packed']['points_per_hour']} points/h, one by one {result['single']['points_per_hour']} "
    f"points/h ({result['packed_speedup']}x); work in {out}"
  )
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
