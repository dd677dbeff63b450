"""Tracking and profiles: the W&B writer (a recording stand-in, and real W&B offline) and profile_rounds."""

from __future__ import annotations

import glob
import os
import sys
import types

import numpy as np
import pytest

from conftest import tiny_config
from fedgan_jax import config_lib, experiment
from fedgan_jax.io import wandb_writer


@pytest.mark.parametrize(
  "text, expected", [("", None), ("1:1", (1, 1)), ("2:3", (2, 3)), ("4:1", (4, 1)), (" 2 : 2 ", (2, 2))]
)
def test_profile_window_parses(text, expected):
  assert config_lib.profile_window(tiny_config(num_rounds=4, profile_rounds=text)) == expected


@pytest.mark.parametrize("text", ["3", "a:b", "0:1", "1:0", "4:2", "1:2:3", "-1:2"])
def test_profile_window_rejects_bad_values(text):
  with pytest.raises(ValueError, match=r"config.profile_rounds=.* 'k:n' traces rounds k..k\+n-1.*num_rounds=4"):
    tiny_config(num_rounds=4, profile_rounds=text)


def test_wandb_mode_is_checked():
  with pytest.raises(ValueError, match=r"config.wandb.mode='cloud'"):
    tiny_config(**{"wandb.mode": "cloud"})


class _FakeRun:
  def __init__(self, **kwargs):
    self.init, self.logs, self.finished = kwargs, [], False

  def log(self, data, step):
    self.logs.append((step, data))

  def finish(self):
    self.finished = True


def test_writer_logs_what_metrics_jsonl_gets(monkeypatch, tmp_path):
  runs = []
  fake = types.SimpleNamespace(init=lambda **kw: runs.append(_FakeRun(**kw)) or runs[-1], Image=lambda a: ("img", a))
  monkeypatch.setitem(sys.modules, "wandb", fake)
  config = tiny_config(**{"wandb.project": "p", "wandb.group": "g", "wandb.mode": "offline"})
  w = wandb_writer.WandbWriter(config, str(tmp_path / "run"))
  w.scalars(3, {"round": 3, "train/g_loss": [1.0, 2.0], "agg/flagged": [True, False], "eval/swd": float("nan")})
  grid = np.zeros((4, 4, 3), np.uint8)
  w.image(3, "samples", grid)
  w.close()
  (run,) = runs
  assert run.init["project"] == "p" and run.init["group"] == "g" and run.init["mode"] == "offline"
  assert run.init["id"] == wandb_writer.run_id(str(tmp_path / "run")) and run.init["resume"] == "allow"
  assert run.init["config"]["aggregation.name"] == "mean" and run.init["config"]["attack.malicious"] == [0]
  assert run.logs[0] == (3, {"train/g_loss/client_0": 1.0, "train/g_loss/client_1": 2.0, "agg/flagged/client_0": 1.0,
                             "agg/flagged/client_1": 0.0})  # fmt: skip
  assert run.logs[1][0] == 3 and run.logs[1][1]["samples"][1] is grid and run.finished
  # Off: no import, no run.
  monkeypatch.setitem(sys.modules, "wandb", None)
  assert not wandb_writer.WandbWriter(tiny_config(), str(tmp_path / "off")).active
  with pytest.raises(ValueError, match=r"config.wandb.project='p' needs the wandb package: pip install"):
    wandb_writer.WandbWriter(config, str(tmp_path / "run"))


@pytest.mark.slow
def test_a_run_writes_a_profile_and_an_offline_wandb_run(tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_SILENT", "true")
  workdir = str(tmp_path / "run")
  config = tiny_config(profile_rounds="2:1", **{"wandb.project": "fedgan_jax_test", "wandb.mode": "offline"})
  experiment.run(config, workdir)
  traces = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  (offline,) = glob.glob(os.path.join(workdir, "wandb", "offline-run-*"))
  assert os.path.getsize(os.path.join(offline, f"run-{wandb_writer.run_id(workdir)}.wandb")) > 0
