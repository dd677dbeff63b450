"""One- and two-round end-to-end runs of the tiny config: outputs, resume, CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, tiny_config
from fedgan_jax import experiment
from fedgan_jax.io import writers


def _strip_timing(records):
  return [{k: v for k, v in r.items() if not k.startswith("z/")} for r in records]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  summary = experiment.run(tiny_config(), workdir)
  return workdir, summary


def test_run_writes_every_output(full_run):
  workdir, summary = full_run
  for name in ("config.json", "metrics.jsonl", "summary.json", "samples", "checkpoints"):
    assert os.path.exists(os.path.join(workdir, name)), name
  records = writers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["round"] for r in records] == [1, 2]
  for r in records:
    assert len(r["train/g_loss"]) == 2 and len(r["agg/weights"]) == 2
    assert np.isclose(sum(r["agg/weights"]), 1.0)
    assert all(k.split("/")[0] in {"round", "train", "agg", "eval", "z"} for k in r)
    assert "eval/trigger_rate" in r and "eval/swd" in r and r["eval/detect_tpr"] in (0.0, 1.0)
  grids = sorted(os.listdir(os.path.join(workdir, "samples")))
  assert grids == ["round_000001.png", "round_000002.png"]
  img = np.asarray(Image.open(os.path.join(workdir, "samples", grids[-1])))
  assert img.ndim == 3 and img.shape[-1] == 3 and img.std() > 0
  cfg = json.load(open(os.path.join(workdir, "config.json")))
  assert cfg["num_clients"] == 2 and cfg["attack"]["malicious"] == [0]
  assert summary["rounds"] == 2 and summary["data"]["poisoned_per_client"] == [32, 0]
  assert json.load(open(os.path.join(workdir, "summary.json")))["final"]["round"] == 2


def test_interrupted_and_resumed_run_equals_uninterrupted(full_run, tmp_path):
  workdir, _ = full_run
  resumed = str(tmp_path / "resumed")
  experiment.run(tiny_config(num_rounds=1), resumed)       # "Interrupted" after round 1.
  summary = experiment.run(tiny_config(num_rounds=2), resumed)  # Same command, more rounds: resumes.
  assert summary["resumed_from"] == 1
  a = _strip_timing(writers.read_jsonl(os.path.join(workdir, "metrics.jsonl")))
  b = _strip_timing(writers.read_jsonl(os.path.join(resumed, "metrics.jsonl")))
  assert a == b
  grid_a = np.asarray(Image.open(os.path.join(workdir, "samples", "round_000002.png")))
  grid_b = np.asarray(Image.open(os.path.join(resumed, "samples", "round_000002.png")))
  np.testing.assert_array_equal(grid_a, grid_b)


def _cli(*args, cwd=ROOT):
  return subprocess.run([sys.executable, "-m", "fedgan_jax.main", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("override,match", [
    ("--config.num_clients=0", "config.num_clients=0"),
    ("--config.nonsense=1", "config has no field 'nonsense'"),
    ("--config.attack.malicious=(3,)", "attack.malicious=(3,)"),
    ("--config.aggregation.name=nope", "aggregation.name='nope'"),
    ("--config.attack.trigger_size=64", "does not fit"),
])
def test_cli_bad_input_is_one_clear_line(tmp_path, override, match):
  p = _cli("--config", "configs/test.py", "--workdir", str(tmp_path / "w"), override)
  assert p.returncode == 2, p.stderr[-2000:]
  assert match in p.stderr
  assert "Traceback" not in p.stderr
