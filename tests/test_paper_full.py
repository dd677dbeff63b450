"""configs/paper_full.py: each setting is the paper's run, and one round of it trains (at 32 px) end to end."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from conftest import ROOT
from fedgan_jax import config_lib, experiment


def _mod():
  spec = importlib.util.spec_from_file_location("paper_full", os.path.join(ROOT, "configs", "paper_full.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize("setting", ["clean", "attack", "detect", "gp", "both"])
def test_each_setting_is_the_papers_run(setting):
  c = config_lib.validate(_mod().get_config(setting))
  facts = (c.model.name, c.resolution, c.num_clients, c.train.batch_size, c.num_rounds, c.train.local_steps)
  assert facts == ("stylegan2", 256, 4, 32, 200, 0)  # StyleGAN2 G, 256 px, 4 clients, batch 32, 200 epochs.
  assert (c.model.latent_dim, c.model.sg2.w_dim, c.model.d_width) == (64, 128, 64)
  assert c.aggregation.weighting == "uniform" and c.attack.trigger_range == "unit"
  assert config_lib.trigger_geometry(c) == (16, 5)  # Rows/cols 235-250.
  assert tuple(c.attack.malicious) == (() if setting == "clean" else (0,))
  detect, gp = setting in ("detect", "both"), setting in ("gp", "both")
  assert (c.aggregation.name == "detect") == detect
  if detect:
    assert tuple(c.aggregation.kwargs.features) == ("g_loss_last",) and c.aggregation.kwargs.mode == "persistent"
  assert (c.train.regularizers.gradient_penalty == 10.0) == gp
  if gp:
    assert (c.train.optimizer, c.train.rmsprop, c.train.gp_interpolation, c.model.d_norm) == (
      "rmsprop",
      "pytorch",
      "normal",
      "instance",
    )
  else:
    assert (c.train.optimizer, c.train.b1, c.train.b2) == ("adam", 0.9, 0.999)
  with pytest.raises(ValueError, match="paper_full.py:nope"):
    _mod().get_config("nope")


@pytest.mark.slow
def test_one_round_of_both_trains_under_vmap_and_writes_every_output(tmp_path):
  """configs/paper_full.py:both shrunk to 32 px, a tiny StyleGAN2 and a tiny epoch: 4 clients, one round."""
  c = _mod().get_config("both")
  for dotted, v in {
    "resolution": 32,
    "num_rounds": 1,
    "data.num_images": 32,
    "data.heldout": 32,
    "train.batch_size": 8,
    "model.sg2.channel_base": 256,
    "model.sg2.channel_max": 16,
    "model.sg2.w_dim": 16,
    "model.sg2.mapping_layers": 2,
    "model.d_width": 8,
    "model.latent_dim": 16,
    "attack.trigger_size": 4,
    "attack.trigger_margin": 1,
    "eval.num_samples": 32,
    "eval.grid_size": 2,
    "eval.extractor": "none",
    "train.client_chunk": 4,
    "train.unroll": "false",  # Compiles in half the time (the run is one round).
  }.items():
    config_lib.set_field(c, dotted, v)
  summary = experiment.run(config_lib.validate(c), str(tmp_path / "run"))
  assert summary["rounds"] == 1 and summary["data"]["client_counts"] == [32, 32, 32, 32]  # partition 'full'.
  for name in (
    "config.json",
    "metrics.jsonl",
    "summary.json",
    "trigger_calibration.json",
    "samples",
    "checkpoints",
    "report",
  ):
    assert (tmp_path / "run" / name).exists(), name
  record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
  assert record["agg/weights"] == [0.25] * 4 and len(record["train/g_loss"]) == 4
