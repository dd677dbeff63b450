"""The accelerator check in one call: every throughput figure the docs quote, side by side.

    python -m launch.device_check --out DIR [--tiny] [--budget SEC] [--peer PATH]

Runs a fixed list of steps, each a subprocess under its own time limit, all
within ``--budget`` seconds (default 450: under 8 minutes on one H100 or
H200, start-up included), printing progress as it goes, and writes

* ``DIR/device_check.jsonl``: one object per step: ``step``, ``group``,
  ``command``, ``status`` (``ok`` | ``timeout`` | ``error`` | ``skipped``),
  ``seconds``, ``result`` (the step's own JSON: the bench record, the
  PyTorch peer's line, or the main job's summary), and ``detail`` (why it was
  skipped, or the end of its stderr);
* ``DIR/device_check.md``: the tables and the targets, met or not.

The steps, most important first (a step that would start with too little
budget left is ``skipped``, so the check always ends in time):

1. C = 64 clients, 64 px, B = 32, L = 5, width 64: for each lowering
   (``gemm`` and stock ``xla``; on a CPU also ``fast_cpu``) and each
   precision (f32, bf16), our vmapped round and our jitted one-client step
   looped from Python (``fedgan_jax.bench --mode both``); and the PyTorch
   sequential peer in f32.
2. C = 16, 256 px, B = 32, bf16: our vmapped round (``conv_impl='auto'``)
   and the peer (f32; it has no bf16 mode).
3. Scaling in C: 4, 16, 64, 256 clients at 64 px, bf16, vmapped.
4. The default main job (``configs/default.py``), wall time.
5. The CPU-sized paper grid (``configs/paper_sweep.py``: 32 px DCGAN, 4
   clients, B = 32) as a sweep: the first 6 points of its largest pack
   (clean, no defense, the 4 and 8 px triggers, seeds 0-2: two trigger
   sizes in one program) packed into one program against the same points one by one
   (``launch.pack_bench``, 20 rounds, no feature-network FID): points per
   hour, and the packed training's TFLOP/s and share of peak. It comes last:
   give it ``--only packed_sweep`` (or a larger ``--budget``) to run it.

``--tiny`` shrinks every step to seconds on a CPU (2 clients, 32 px, batch 4,
one local step, width 8; the main job is ``configs/test.py``; the packed sweep
2 points of width 8, B = 8, 2 rounds); CI runs it.
The peer is a PyTorch script of the original sequential design, used as a
measuring stick only: ``--peer PATH`` (default: ``$FEDGAN_PEER``, else
``shared/peers/torch_fedgan_seq.py`` or ``../shared/peers/...`` from the
working directory); its steps are ``skipped`` when it or ``torch`` is
missing. Subprocesses share a JAX compilation cache in ``DIR/jax_cache``, so
a program compiled by two steps is compiled once.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from launch.device_report import FULL, TINY, report

BENCH = [sys.executable, "-m", "fedgan_jax.bench"]
MAIN = [sys.executable, "-m", "fedgan_jax.main"]
PACK_BENCH = [sys.executable, "-m", "launch.pack_bench", "--config", "configs/paper_sweep.py"]
# --tiny: the paper grid's points shrunk to seconds on a CPU.
_TINY_SWEEP = ("model.g_width=8", "model.d_width=8", "train.batch_size=8", "train.local_steps=1")
_TINY_SWEEP += ("eval.num_samples=64", "data.num_images=256", "data.heldout=64")
_MIN_START_SEC = 10  # A step is not started with less budget than this left.


class Step(NamedTuple):
  """One measurement: a command, its group in the report, its own time limit (s)."""

  name: str
  group: str
  kind: str  # 'bench' | 'peer' | 'main' | 'pack'
  argv: tuple[str, ...]
  limit: int
  skip: str = ""  # Non-empty: why the step is not run.


def _say(msg: str) -> None:
  print(f"[device_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def find_peer(path: str | None) -> str | None:
  """The PyTorch peer script: ``path``, ``$FEDGAN_PEER``, or ``[../]shared/peers/torch_fedgan_seq.py``."""
  candidates = (
    [path]
    if path
    else [os.environ.get("FEDGAN_PEER", ""), "shared/peers/torch_fedgan_seq.py", "../shared/peers/torch_fedgan_seq.py"]
  )
  for c in candidates:
    if c and os.path.isfile(c):
      return os.path.abspath(c)
  return None


def probe_platform() -> dict[str, Any]:
  """The JAX backend and devices, read in a subprocess (this process never holds the device)."""
  code = (
    "import jax, json; d = jax.devices(); print(json.dumps({'platform': d[0].platform, "
    "'device_kind': d[0].device_kind, 'count': len(d), 'jax': jax.__version__}))"
  )
  try:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])
  except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as e:
    return {"platform": "unknown", "device_kind": "unknown", "count": 0, "error": str(e)}


def plan(tiny: bool, platform: str, peer: str | None, out_dir: str) -> list[Step]:
  """The fixed list of steps for this platform (see the module docstring)."""
  if tiny:
    size = dict(res=32, batch=4, steps=1, width=8, latent=8, rounds=1, warmup=1)
  else:
    size = dict(res=64, batch=32, steps=5, width=64, latent=100, rounds=3, warmup=1)
  c_main, r_big, c_big, c_scale = TINY if tiny else FULL
  # --tiny (CI, CPU): generous limits, a shared 2-core runner can take minutes to compile what takes seconds alone.
  lim = (lambda full: max(240, full // 2)) if tiny else (lambda full: full)
  impls = ("gemm", "xla", "fast_cpu") if platform == "cpu" else ("gemm", "xla")

  def bench(clients, res, precision, impl, mode):
    return tuple(BENCH) + (
      "--clients",
      str(clients),
      "--resolution",
      str(res),
      "--batch",
      str(size["batch"]),
      "--local-steps",
      str(size["steps"]),
      "--width",
      str(size["width"]),
      "--latent-dim",
      str(size["latent"]),
      "--rounds",
      str(size["rounds"]),
      "--warmup",
      str(size["warmup"]),
      "--precision",
      precision,
      "--conv-impl",
      impl,
      "--mode",
      mode,
    )

  torch_ok = importlib.util.find_spec("torch") is not None
  peer_skip = (
    "no peer script (--peer PATH or $FEDGAN_PEER)" if peer is None else "" if torch_ok else "torch is not installed"
  )

  def peer_cmd(clients, res):
    device = "cuda" if platform == "gpu" else "cpu"
    return (
      sys.executable,
      peer or "<peer>",
      "--res",
      str(res),
      "--clients",
      str(clients),
      "--batch",
      str(size["batch"]),
      "--local-steps",
      str(size["steps"]),
      "--ngf",
      str(size["width"]),
      "--ndf",
      str(size["width"]),
      "--nz",
      str(size["latent"]),
      "--rounds",
      str(size["rounds"]),
      "--warmup",
      str(size["warmup"]),
      "--device",
      device,
    )

  g1 = f"C = {c_main}, {size['res']} px, B = {size['batch']}, L = {size['steps']}"
  steps = []
  for precision in ("f32", "bf16"):
    for impl in impls:
      steps.append(
        Step(
          f"c{c_main}_{impl}_{precision}", g1, "bench", bench(c_main, size["res"], precision, impl, "both"), lim(110)
        )
      )
    if precision == "f32":
      steps.append(Step(f"c{c_main}_peer_f32", g1, "peer", peer_cmd(c_main, size["res"]), lim(60), peer_skip))
  g2 = f"C = {c_big}, {r_big} px, B = {size['batch']}, bf16"
  steps.append(Step(f"r{r_big}_auto_bf16", g2, "bench", bench(c_big, r_big, "bf16", "auto", "vmap"), lim(150)))
  steps.append(Step(f"r{r_big}_peer_f32", g2, "peer", peer_cmd(c_big, r_big), lim(60), peer_skip))
  g3 = f"scaling in C, {size['res']} px, bf16, vmapped"
  for c in c_scale:
    steps.append(Step(f"scale_c{c}", g3, "bench", bench(c, size["res"], "bf16", "auto", "vmap"), lim(70)))
  workdir = os.path.join(out_dir, "main_default")
  config = "configs/test.py" if tiny else "configs/default.py"
  steps.append(
    Step("main_default", "the main job", "main", tuple(MAIN) + ("--config", config, "--workdir", workdir), lim(120))
  )
  points, rounds = (2, 2) if tiny else (6, 20)
  sets = (*(_TINY_SWEEP if tiny else ()), "eval.extractor=none")  # FID's network: the same cost per point.
  pack_argv = tuple(PACK_BENCH) + ("--points", str(points), "--rounds", str(rounds))
  pack_argv += tuple(a for x in sets for a in ("--set", x)) + ("--out", os.path.join(out_dir, "packed_sweep"))
  steps.append(Step("packed_sweep", f"packed sweep: {points} points of the paper grid", "pack", pack_argv, lim(360)))
  return steps


def _last_json(text: str) -> dict[str, Any] | None:
  for line in reversed(text.strip().splitlines()):
    line = line.strip()
    if line.startswith("{"):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        return None
  return None


def _tail(text: str, lines: int = 6) -> str:
  return "\n".join((text or "").strip().splitlines()[-lines:])


def run_step(step: Step, timeout: float, env: dict[str, str]) -> dict[str, Any]:
  """Runs one step under ``timeout`` seconds; returns its record (without ``step``/``group``)."""
  if step.kind == "main":
    workdir = step.argv[step.argv.index("--workdir") + 1]
    shutil.rmtree(workdir, ignore_errors=True)  # A fresh run, not a resumed one.
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(list(step.argv), capture_output=True, text=True, timeout=timeout, env=env)
  except subprocess.TimeoutExpired as e:
    err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    return {
      "status": "timeout",
      "seconds": round(time.perf_counter() - t0, 1),
      "result": None,
      "detail": f"killed after {timeout:.0f} s; last output:\n{_tail(err or out)}",
    }
  seconds = round(time.perf_counter() - t0, 1)
  if proc.returncode != 0:
    return {
      "status": "error",
      "seconds": seconds,
      "result": None,
      "detail": f"exit code {proc.returncode}:\n{_tail(proc.stderr or proc.stdout, 12)}",
    }
  if step.kind == "main":
    with open(os.path.join(workdir, "summary.json")) as f:
      summary = json.load(f)
    result = {
      "wall_sec_process": seconds,
      "wall_sec": summary.get("wall_sec"),
      "first_round_sec": summary.get("first_round_sec"),
      "rounds": summary.get("rounds"),
      "time_sec": summary.get("time_sec"),  # Setup, first round, training, evaluation, checkpoints.
    }
  else:
    result = _last_json(proc.stdout)
    if result is None:
      return {
        "status": "error",
        "seconds": seconds,
        "result": None,
        "detail": f"no JSON line on stdout:\n{_tail(proc.stdout)}",
      }
  return {"status": "ok", "seconds": seconds, "result": result, "detail": ""}


def run_all(steps: Sequence[Step], out_dir: str, budget: float) -> list[dict[str, Any]]:
  """Runs ``steps`` in order within ``budget`` seconds, appending each record to the JSONL as it ends."""
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(out_dir, "jax_cache"))
  path = os.path.join(out_dir, "device_check.jsonl")
  open(path, "w").close()
  deadline = time.monotonic() + budget
  records = []
  for i, step in enumerate(steps, 1):
    remaining = deadline - time.monotonic()
    head = {"step": step.name, "group": step.group, "command": shlex.join(step.argv)}
    if step.skip:
      rec = {**head, "status": "skipped", "seconds": 0.0, "result": None, "detail": step.skip}
    elif remaining < _MIN_START_SEC:
      rec = {
        **head,
        "status": "skipped",
        "seconds": 0.0,
        "result": None,
        "detail": f"time budget spent ({budget:.0f} s)",
      }
    else:
      timeout = min(step.limit, remaining)
      _say(f"step {i}/{len(steps)} {step.name} (limit {timeout:.0f} s): {rec_cmd(step)}")
      rec = {**head, **run_step(step, timeout, env)}
    _say(
      f"step {i}/{len(steps)} {step.name}: {rec['status']} in {rec['seconds']} s"
      + (f" ({rec['detail'].splitlines()[0]})" if rec["detail"] else "")
      + _headline(rec)
    )
    records.append(rec)
    with open(path, "a") as f:
      f.write(json.dumps(rec) + "\n")
  return records


def rec_cmd(step: Step) -> str:
  return " ".join(a if i else "python" for i, a in enumerate(step.argv))


def _headline(rec: dict[str, Any]) -> str:
  r = rec.get("result") or {}
  if "vmap_speedup" in r:
    return f": vmap {r['sec_per_round']} s/round, loop {r['loop']['sec_per_round']} s/round ({r['vmap_speedup']}x)"
  if "sec_per_round" in r:
    return f": {r['sec_per_round']} s/round"
  if "wall_sec_process" in r:
    return f": {r['wall_sec_process']} s wall"
  if "packed_speedup" in r:
    one, packed = r["single"]["points_per_hour"], r["packed"]["points_per_hour"]
    return f": packed {packed} points/h, one by one {one} points/h ({r['packed_speedup']}x)"
  return ""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m launch.device_check",
    description=__doc__.split("\n")[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument("--out", required=True, help="output folder (created): device_check.jsonl and device_check.md")
  p.add_argument("--tiny", action="store_true", help="every step shrunk to seconds on a CPU (CI)")
  p.add_argument(
    "--budget",
    type=float,
    default=450.0,
    help="seconds for all steps together; a step never starts with under 10 s left",
  )
  p.add_argument(
    "--peer",
    default=None,
    help="the PyTorch peer script (default: $FEDGAN_PEER, else [../]shared/peers/torch_fedgan_seq.py)",
  )
  p.add_argument("--only", default="", help="comma-separated step names to run (default: all)")
  args = p.parse_args(argv)
  if args.budget <= 0:
    p.error(f"--budget={args.budget} must be > 0 seconds")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    os.makedirs(args.out, exist_ok=True)
  except OSError as e:
    print(f"error: --out={args.out!r}: cannot create it ({e.strerror})", file=sys.stderr)
    return 2
  out_dir = os.path.abspath(args.out)
  t0 = time.monotonic()
  info = probe_platform()
  _say(f"device: {info.get('device_kind')} x{info.get('count')} ({info.get('platform')}), jax {info.get('jax')}")
  steps = plan(args.tiny, info.get("platform", "cpu"), find_peer(args.peer), out_dir)
  if args.only:
    wanted = set(args.only.split(","))
    unknown = wanted - {s.name for s in steps}
    if unknown:
      print(f"error: --only: unknown steps {sorted(unknown)}; known: {[s.name for s in steps]}", file=sys.stderr)
      return 2
    steps = [s for s in steps if s.name in wanted]
  records = run_all(steps, out_dir, args.budget - (time.monotonic() - t0))
  md = report(records, info, args.budget, args.tiny)
  with open(os.path.join(out_dir, "device_check.md"), "w") as f:
    f.write(md)
  _say(
    f"wrote {os.path.join(out_dir, 'device_check.jsonl')} and device_check.md "
    f"({sum(r['status'] == 'ok' for r in records)} of {len(records)} steps ok)"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
