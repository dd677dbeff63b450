"""launch.cluster: a sweep through submitit's local executor (each point a task), failures reported by name."""

from __future__ import annotations

import csv
import os

import pytest

from conftest import ROOT
from launch import cluster

_SWEEP = """
import importlib.util, os
spec = importlib.util.spec_from_file_location("t", os.path.join({root!r}, "configs", "test.py"))
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
def get_config():
  config = mod.get_config()
  config.num_rounds = 1
  return config
def get_sweep():
  return [{{"_point": "ok"}}, {{"_point": "broken", "data.source": "folder", "data.path": "/nonexistent/images"}}]
"""


def test_bad_flags_and_a_missing_config_are_clear_errors(tmp_path, capsys):
  assert cluster.main(["--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path / "w")]) == 2
  assert "no such file" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cluster.main(["--config", "c.py", "--workdir", "w", "--executor", "kubernetes"])


@pytest.mark.slow
def test_local_executor_runs_each_point_and_reports_the_failed_one(tmp_path, capsys, monkeypatch):
  # submitit configures logging at import onto the sys.stdout/stderr of that moment, here pytest's capture
  # streams, which are closed after the test: its own switch leaves logging alone.
  monkeypatch.setenv("SUBMITIT_LOG_LEVEL", "NOCONFIG")
  pytest.importorskip("submitit")
  cfg = tmp_path / "sweep.py"
  cfg.write_text(_SWEEP.format(root=ROOT))
  work = tmp_path / "w"
  argv = ["--config", str(cfg), "--workdir", str(work), "--executor", "local", "--timeout-min", "10"]
  assert cluster.main(argv) == 1
  out = capsys.readouterr().out
  assert "cluster: 2 programs, 2 submitted (local)" in out and "done: point-ok" in out
  broken = "point-broken__source-folder__path--nonexistent-images"
  assert f"FAILED: {broken}" in out and "failed points (rerun the same command" in out
  assert f"{broken}: FileNotFoundError: data.path='/nonexistent/images'" in out
  with open(work / "results.csv") as f:
    rows = {r["name"]: r for r in csv.DictReader(f)}
  assert rows["point-ok"]["status"] == "done" and rows[broken]["status"] != "done"
  assert os.path.exists(work / "point-ok" / "summary.json")
  # Rerun: the finished point is not submitted again; only the broken one is.
  assert cluster.main(argv) == 1
  out = capsys.readouterr().out
  assert (
    "cluster: 2 programs, 1 submitted (local)" in out and f"FAILED: {broken}" in out and "done: point-ok" not in out
  )
  # --gather submits nothing and writes results.csv from what has finished.
  assert cluster.main(argv + ["--gather"]) == 0
  assert "submitted" not in capsys.readouterr().out
