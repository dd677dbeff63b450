"""launch.device_check: the plan, the report, and the whole --tiny check end to end (as CI runs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from launch import device_check


def test_plan_full_gpu_and_peer_skips(tmp_path):
  steps = device_check.plan(False, "gpu", None, str(tmp_path))
  names = [s.name for s in steps]
  assert names[:3] == ["c64_gemm_f32", "c64_xla_f32", "c64_peer_f32"]  # Most important first.
  assert {
    "c64_gemm_bf16",
    "c64_xla_bf16",
    "r256_auto_bf16",
    "r256_peer_f32",
    "scale_c4",
    "scale_c256",
    "main_default",
    "packed_sweep",
  } <= set(names)
  assert "c64_fast_cpu_f32" not in names  # The CPU lowering is not run on accelerators.
  assert all(s.skip for s in steps if s.kind == "peer")  # No peer script given.
  big = next(s for s in steps if s.name == "r256_auto_bf16")
  assert big.argv[big.argv.index("--clients") + 1] == "16" and "--precision" in big.argv
  peer = device_check.plan(False, "gpu", "/x/peer.py", str(tmp_path))[2]
  assert peer.argv[1] == "/x/peer.py" and peer.argv[-1] == "cuda"
  assert sum(s.limit for s in steps if not s.skip) > 450  # The budget, not the limits, bounds the check.


def test_budget_skips_steps_that_would_start_too_late(tmp_path):
  steps = [
    device_check.Step("a", "g", "bench", (sys.executable, "-c", "print('{\"sec_per_round\": 1.0}')"), 30),
    device_check.Step("b", "g", "bench", (sys.executable, "-c", "import time; time.sleep(30)"), 2),
    device_check.Step("c", "g", "bench", (sys.executable, "-c", "raise SystemExit(3)"), 30),
    device_check.Step("d", "g", "peer", ("x",), 30, skip="torch is not installed"),
  ]
  recs = device_check.run_all(steps, str(tmp_path), budget=60)
  assert [r["status"] for r in recs] == ["ok", "timeout", "error", "skipped"]
  assert recs[0]["result"] == {"sec_per_round": 1.0} and "exit code 3" in recs[2]["detail"]
  late = device_check.run_all(steps[:1], str(tmp_path), budget=5)
  assert late[0]["status"] == "skipped" and "budget" in late[0]["detail"]
  lines = (tmp_path / "device_check.jsonl").read_text().splitlines()
  assert len(lines) == 1  # Rewritten by each check.


def _fake_record(step) -> dict:
  """What run_all writes for a finished step, with a result of the step's kind."""
  if step.kind == "main":
    result = {"rounds": 2, "wall_sec_process": 30.0, "first_round_sec": 20.0, "time_sec": {"training": 1.0}}
  elif step.kind == "peer":
    result = {"sec_per_round": 0.5}
  elif step.kind == "pack":
    arm = {"points_per_hour": 100.0, "achieved_tflops": 0.01, "fraction_of_peak": None, "load": [[1.0, 2.5]]}
    result = {"points": 2, "rounds": 2, "packed": arm, "single": dict(arm, points_per_hour=50.0), "packed_speedup": 2.0}
  else:
    hlo = {"convolution": 0 if "gemm" in step.name else 4, "lhs_dilated_convolution": 0, "dot_general": 9}
    impl = step.argv[step.argv.index("--conv-impl") + 1]
    common = {"hlo_ops": hlo, "compile_sec": 5.0, "achieved_tflops": 0.01, "fraction_of_peak": 0.01}
    result = dict(common, sec_per_round=0.1, vmap_speedup=2.0, conv_impl_resolved=impl, client_steps_per_sec=40.0)
    result.update(precision="f32", loop=dict(common, sec_per_round=0.2))
  status = "skipped" if step.skip else "ok"
  return {"step": step.name, "group": step.group, "command": "x", "status": status, "seconds": 1.0, "result": result}


def test_report_of_every_tiny_step_has_every_section(tmp_path):
  """The whole --tiny plan rendered from records (the subprocess run below runs two of its steps)."""
  steps = device_check.plan(True, "cpu", None, str(tmp_path))
  md = device_check.report([_fake_record(s) for s in steps], {"platform": "cpu", "count": 1}, 450, True)
  for text in ("## C = 2, 32 px, B = 4, L = 1", "## scaling in C", "## the main job", "## Targets", "c2_gemm_bf16"):
    assert text in md, text
  assert "| packed_sweep | ok | 2 x 2 | 100 | 50 | 2 | 0.01 | - | 2.5 |" in md
  pack = next(s for s in steps if s.name == "packed_sweep")
  assert pack.argv[pack.argv.index("--points") + 1] == "2" and "eval.extractor=none" in pack.argv
  assert {s.name for s in steps} >= {"c2_gemm_f32", "c2_xla_f32", "c2_fast_cpu_bf16", "scale_c4", "main_default"}


@pytest.mark.slow
def test_tiny_device_check_writes_both_files(tmp_path):
  """One step end to end in a subprocess, as on a device (the main-job steps run the same main job as
  tests/test_experiment.py; their selection and rendering are tested above without running them)."""
  out = tmp_path / "dc"
  proc = subprocess.run(
    [sys.executable, "-m", "launch.device_check", "--tiny", "--only", "c2_gemm_f32", "--out", str(out)],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "step 1/1" in proc.stdout and "wrote" in proc.stdout
  recs = [json.loads(line) for line in (out / "device_check.jsonl").read_text().splitlines()]
  by = {r["step"]: r for r in recs}
  assert set(by) == {"c2_gemm_f32"}
  for r in recs:
    assert set(r) >= {"step", "group", "command", "status", "seconds", "result"}
    assert r["status"] == "ok", r
  gemm = by["c2_gemm_f32"]["result"]
  assert gemm["hlo_ops"]["convolution"] == 0 and gemm["loop"]["hlo_ops"]["convolution"] == 0
  md = (out / "device_check.md").read_text()
  for text in ("## C = 2, 32 px, B = 4, L = 1", "## Targets", "c2_gemm_f32"):
    assert text in md, text
  assert os.path.isdir(out / "jax_cache")
