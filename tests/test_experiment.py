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
from fedgan_jax.io import rundir


def _strip_timing(records):
  return [{k: v for k, v in r.items() if not k.startswith("z/")} for r in records]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  summary = experiment.run(_with_features(), workdir)
  return workdir, summary


def _with_features(**overrides):
  """The tiny config with FD/KID/precision/recall in EfficientNet-Lite0 space every round."""
  return tiny_config(**{"eval.extractor": "effnet_lite0", "eval.fid_every": 1, **overrides})


@pytest.mark.slow
def test_run_writes_every_output(full_run):
  workdir, summary = full_run
  for name in (
    "config.json",
    "metrics.jsonl",
    "summary.json",
    "samples",
    "checkpoints",
    "trigger_calibration.json",
    "tb",
    "report/report.html",
    "report/losses.png",
  ):
    assert os.path.exists(os.path.join(workdir, name)), name
  records = rundir.read_records(os.path.join(workdir, "metrics.jsonl"))
  assert [r["round"] for r in records] == [1, 2]
  for r in records:
    assert len(r["train/g_loss"]) == 2 and len(r["agg/weights"]) == 2
    assert np.isclose(sum(r["agg/weights"]), 1.0)
    assert all(k.split("/")[0] in {"round", "train", "agg", "eval", "z"} for k in r)
    assert "eval/implant_amplitude" in r and "eval/swd" in r and r["eval/detect_tpr"] in (0.0, 1.0)
    assert r["eval/implant_amplitude_lo"] <= r["eval/implant_amplitude"] <= r["eval/implant_amplitude_hi"]
    assert 0.0 <= r["eval/implant_above_p99"] <= 1.0 and r["eval/diversity"] > 0
    assert r["eval/fid@effnet_lite0"] > 0 and 0 <= r["eval/precision@effnet_lite0"] <= 1
    assert 0.0 <= r["eval/mia_auc"] <= 1.0  # With the feature metrics (every round here), in their space.
    assert not any(k.startswith(("eval/tstr", "eval/trtr")) for k in r)  # Unconditional: no utility metrics.
  calibration = json.load(open(os.path.join(workdir, "trigger_calibration.json")))
  assert calibration["real_poisoned_amplitude"] == pytest.approx(1.0, abs=1e-5)  # Sanity: pasted reads as 1.
  floor = calibration["templates"]["run"]
  assert (
    floor["baseline_p05"] <= floor["baseline_median"] <= floor["baseline_p95"] and floor["fpr_out_of_sample"] <= 0.1
  )
  det = summary["detection"]
  assert det["warmup_rounds"] == 0 and len(det["honest_final_weights"]) == 1 and len(det["attacker_final_weights"]) == 1
  grids = sorted(os.listdir(os.path.join(workdir, "samples")))
  assert grids == ["round_000001.png", "round_000002.png"]
  img = np.asarray(Image.open(os.path.join(workdir, "samples", grids[-1])))
  assert img.ndim == 3 and img.shape[-1] == 3 and img.std() > 0
  cfg = json.load(open(os.path.join(workdir, "config.json")))
  assert cfg["num_clients"] == 2 and cfg["attack"]["malicious"] == [0]
  assert summary["rounds"] == 2 and summary["data"]["poisoned_per_client"] == [32, 0]
  # Members: client 1's 32 clean images (client 0's are all poisoned), against 32 held-out ones.
  assert summary["eval_references"] == {"membership": {"members": 32, "nonmembers": 32, "space": "effnet_lite0"}}
  assert json.load(open(os.path.join(workdir, "summary.json")))["final"]["round"] == 2
  # Where the time went: the parts cover the run's wall time (rounded to 0.01 s each).
  t = summary["time_sec"]
  assert set(t) == {"setup", "first_round", "training", "evaluation", "checkpoints"}
  assert all(v >= 0 for v in t.values()) and t["first_round"] == pytest.approx(summary["first_round_sec"], abs=0.01)
  assert sum(t.values()) == pytest.approx(summary["wall_sec"], abs=0.1)
  assert t["evaluation"] > 0 and t["checkpoints"] > 0  # FD every round, two checkpoints.


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
  # Without the feature network (the full run above checks it) and the membership inference, which the
  # "interrupted" run computes at its final round 1; the three runs share one compiled round.
  workdir, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
  cfg = lambda n: tiny_config(num_rounds=n, **{"eval.mia_samples": 0})
  experiment.run(cfg(2), workdir)
  experiment.run(cfg(1), resumed)  # "Interrupted" after round 1.
  summary = experiment.run(cfg(2), resumed)  # Same command, more rounds: resumes.
  assert summary["resumed_from"] == 1
  a = _strip_timing(rundir.read_records(os.path.join(workdir, "metrics.jsonl")))
  b = _strip_timing(rundir.read_records(os.path.join(resumed, "metrics.jsonl")))
  assert a == b
  grid_a = np.asarray(Image.open(os.path.join(workdir, "samples", "round_000002.png")))
  grid_b = np.asarray(Image.open(os.path.join(resumed, "samples", "round_000002.png")))
  np.testing.assert_array_equal(grid_a, grid_b)


def _cli(*args, cwd=ROOT):
  return subprocess.run(
    [sys.executable, "-m", "fedgan_jax.main", *args], cwd=cwd, capture_output=True, text=True, timeout=300
  )


@pytest.mark.parametrize(
  "override,match",
  [
    ("--config.num_clients=0", "config.num_clients=0"),
    ("--config.nonsense=1", "config.nonsense is not a known field"),
    ("--config.attack.malicious=(3,)", "attack.malicious=(3,)"),
    ("--config.aggregation.name=nope", "aggregation.name='nope'"),
    ("--config.attack.trigger_size=64", "does not fit"),
  ],
)
def test_cli_bad_input_is_one_clear_line(tmp_path, override, match):
  p = _cli("--config", "configs/test.py", "--workdir", str(tmp_path / "w"), override)
  assert p.returncode == 2, p.stderr[-2000:]
  assert match in p.stderr
  assert len(p.stderr.strip().splitlines()) == 1 and not p.stdout, p.stderr[-2000:]  # One line, nothing else.
  assert not os.path.exists(tmp_path / "w" / "config.json")  # Nothing written for a run that never started.


def _write_pngs(root, n, size=40, gray_every=5):
  """n small PNG files (some grayscale), in nested folders, as users unpack archives."""
  rng = np.random.default_rng(0)
  os.makedirs(root, exist_ok=True)
  for i in range(n):
    sub = os.path.join(root, f"part_{i % 2}")
    os.makedirs(sub, exist_ok=True)
    if i % gray_every == 0:
      Image.fromarray(rng.integers(0, 256, (size, size + 8), dtype=np.uint8), "L").save(f"{sub}/ISIC_{i:07d}.png")
    else:
      Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(f"{sub}/ISIC_{i:07d}.png")


def test_two_round_run_on_a_folder_source(tmp_path):
  data_dir = tmp_path / "isic"
  _write_pngs(str(data_dir), 128)
  with open(tmp_path / "labels.csv", "w") as f:
    f.write("image_name,target\n" + "".join(f"ISIC_{i:07d},{i % 2}\n" for i in range(128)))
  config = tiny_config(
    **{
      "data.source": "folder",
      "data.path": str(data_dir),
      "data.labels_csv": str(tmp_path / "labels.csv"),
      "data.cache_dir": str(tmp_path / "cache"),
    }
  )
  summary = experiment.run(config, str(tmp_path / "run"))
  assert summary["rounds"] == 2
  assert summary["data"]["num_train"] == 64 and summary["data"]["num_heldout"] == 64
  assert summary["data"]["class_names"] == ["benign", "malignant"] or summary["data"]["num_classes"] == 2
  records = rundir.read_records(str(tmp_path / "run" / "metrics.jsonl"))
  assert all(np.isfinite(r["train/g_loss"]).all() for r in records)


def test_two_round_run_on_an_npz_source(tmp_path):
  rng = np.random.default_rng(1)
  path = tmp_path / "pneumoniamnist.npz"
  np.savez(
    path,
    train_images=rng.integers(0, 256, (64, 28, 28), dtype=np.uint8),
    train_labels=rng.integers(0, 2, (64, 1)),
    val_images=rng.integers(0, 256, (8, 28, 28), dtype=np.uint8),
    val_labels=np.zeros((8, 1), int),
    test_images=rng.integers(0, 256, (64, 28, 28), dtype=np.uint8),
    test_labels=np.zeros((64, 1), int),
  )
  config = tiny_config(**{"data.source": "npz", "data.path": str(path), "data.channels": 1})
  summary = experiment.run(config, str(tmp_path / "run"))
  assert summary["rounds"] == 2 and summary["data"]["num_train"] == 64
  grid = np.asarray(Image.open(tmp_path / "run" / "samples" / "round_000002.png"))
  assert grid.ndim == 2  # Grayscale samples for a grayscale source.


def test_diverged_run_stops_with_a_clear_error(tmp_path):
  config = tiny_config(**{"train.g_lr": 1e38, "train.d_lr": 1e38, "num_rounds": 3})
  with pytest.raises(FloatingPointError, match=r"round \d: training diverged.*train.g_lr"):
    experiment.run(config, str(tmp_path / "run"))
