"""Forks (config.init_from): a run that starts from another run's checkpoint equals resuming that run."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from conftest import tiny_config
from fedgan_jax import experiment, fork
from fedgan_jax.io import rundir


def test_parse_and_config_errors():
  assert fork.parse("runs/base") == ("runs/base", None)
  assert fork.parse("runs/base@12") == ("runs/base", 12)
  assert fork.parse("/a@b/c@3") == ("/a@b/c", 3)
  with pytest.raises(ValueError, match=r"config.init_from='@3' is invalid: accepted ''"):
    tiny_config(init_from="@3")
  with pytest.raises(fork.ForkError, match=r"config.init_from='@3' is invalid"):
    fork.parse("@3")


def test_missing_base_is_a_clear_error(tmp_path):
  with pytest.raises(fork.ForkError, match=r"init_from='.*nope'.*does not exist \(train the base run first\)"):
    experiment.run(tiny_config(init_from=str(tmp_path / "nope")), str(tmp_path / "fork"))


def _records(workdir: str) -> list[dict]:
  return rundir.read_records(os.path.join(workdir, "metrics.jsonl"))


@pytest.mark.slow
def test_a_fork_equals_resuming_its_base_and_takes_its_own_defense(tmp_path):
  base = str(tmp_path / "base")
  experiment.run(tiny_config(num_rounds=2), base)
  # Resuming the base itself for one more round ...
  cont = str(tmp_path / "cont")
  shutil.copytree(base, cont)
  experiment.run(tiny_config(num_rounds=3), cont)
  # ... is what a fork of it at round 2 with the same config trains: round 3 only.
  same = str(tmp_path / "fork_same")
  experiment.run(tiny_config(num_rounds=3, init_from=f"{base}@2"), same)
  (rec,) = _records(same)
  ref = _records(cont)[-1]
  assert rec["round"] == ref["round"] == 3
  for key in ("train/g_loss", "train/d_loss", "agg/weights"):
    np.testing.assert_allclose(rec[key], ref[key], rtol=1e-5, atol=1e-6)
  assert rundir.read_summary(same)["forked_from"] == f"{base}@2"
  # The fork's own defense, with an aggregator state of another shape (FoolsGold's history), from round 1.
  fg = str(tmp_path / "fork_foolsgold")
  experiment.run(tiny_config(num_rounds=3, init_from=f"{base}@1", **{"aggregation.name": "foolsgold"}), fg)
  assert [r["round"] for r in _records(fg)] == [2, 3]
  # Drift that changes the carried shapes, a round that was not saved, nothing left to train.
  with pytest.raises(fork.ForkError, match=r"config.model.d_width is 8 in the base, 16 now"):
    experiment.run(tiny_config(num_rounds=3, init_from=base, **{"model.d_width": 16}), str(tmp_path / "bad"))
  with pytest.raises(fork.ForkError, match=r"no checkpoint of round 7; saved rounds: \[1, 2\]"):
    experiment.run(tiny_config(num_rounds=9, init_from=f"{base}@7"), str(tmp_path / "bad2"))
  with pytest.raises(fork.ForkError, match=r"the base is at round 2, config.num_rounds=2 leaves nothing"):
    experiment.run(tiny_config(num_rounds=2, init_from=base), str(tmp_path / "bad3"))
