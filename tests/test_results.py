"""launch.results: rows read back from a real run, and the page rendered from rows (numbers and verdicts)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import tiny_config
from fedgan_jax import experiment
from launch import results, results_page


def _rows(attack_rate: float) -> list[dict]:
  rows = []
  base = {"rounds": 100, "resolution": 32, "trigger_px": 4, "trigger_area_pct": 1.562, "swd": 40.0, "wall_sec": 60.0}
  for setting, rate in (
    ("clean", 0.02),
    ("attack", attack_rate),
    ("attack+detect", 0.03),
    ("attack+gp", 0.5),
    ("attack+both", 0.02),
    ("clean+detect", 0.02),
    ("attack_trigger2", 0.05),
  ):
    for seed in range(3):
      row = dict(base, setting=setting, seed=seed, trigger_rate=rate, trigger_rate_late=rate + 0.01 * seed)
      row.update(trigger_strength_late=0.05 * (rate > 0.2), swd_late=40.0)
      if setting == "attack_trigger2":
        row.update(trigger_px=2, trigger_area_pct=0.391)
      if "detect" in setting:
        row.update(
          detect_tpr_after_warmup=0.9,
          detect_fpr_after_warmup=0.1,
          rounds_with_a_flag_after_warmup=0.5,
          honest_weight_min=0.2,
          honest_weight_max=0.4,
        )
      rows.append(row)
  return rows


def test_page_numbers_and_verdicts_follow_the_rows():
  prov = {
    "command": "python -m launch.results --workdir w",
    "commit": "abc1234",
    "date": "2026-11-27",
    "machine": "cpu",
    "wall_sec": 600.0,
  }
  page = results_page.render(_rows(attack_rate=0.7), prov)
  assert "commit `abc1234`" in page and "## The paper's settings" in page and "## What agrees" in page
  assert "| 1 attacker (client 0), no defense (`attack`) | 3 | 0.71 ± 0.01 |" in page  # Mean ± sd of 0.70, 0.71, 0.72.
  assert "0.39 % (the paper: 16×16 on 256×256)" in page
  # 7 settings of one 60 s program each (3 seeds vmapped): 7 min, not 21.
  assert "adds up to 7 min; this regeneration took 10 min end to end" in page
  assert (
    "**The attack implants the backdoor** (the paper: the poisoned discriminator corrupts the global generator). Agrees"
    in page
  )
  assert "**WGAN-GP alone (defense 2)** does not remove the backdoor here in 100 rounds: trigger rate 0.51" in page
  weak = results_page.render(_rows(attack_rate=0.05), prov)
  assert (
    "implants the backdoor** (the paper: the poisoned discriminator corrupts the global generator). Not clearly" in weak
  )


def test_stat_and_fmt():
  rows = [{"setting": "a", "seed": s, "x": v} for s, v in enumerate([1.0, 2.0, 3.0])] + [{"setting": "a", "seed": 9}]
  assert results_page.stat(rows, "a", "x") == (2.0, 1.0, 3)
  assert results_page.fmt((0.25, 0.05, 3), pct=True, digits=0) == "25 ± 5 %"
  assert results_page.stat(rows, "b", "x") is None and results_page.fmt(None) == "–"


@pytest.mark.slow
def test_run_row_reads_a_finished_run(tmp_path):
  config = tiny_config(
    num_rounds=3,
    **{
      "aggregation.name": "detect",
      "aggregation.kwargs.warmup_rounds": 0,
      "aggregation.kwargs.features": ("g_loss_last",),
    },
  )
  experiment.run(config, str(tmp_path / "run"))
  row = results.run_row("attack+detect", config, str(tmp_path / "run"))
  assert row["setting"] == "attack+detect" and row["rounds"] == 3 and row["trigger_px"] == 4
  assert row["trigger_area_pct"] == pytest.approx(100 * 16 / 32**2, abs=1e-3)
  assert 0.0 <= row["attacker_weight"] <= 1.0 and row["honest_weight_min"] <= row["honest_weight_max"]
  assert row["detect_tpr_after_warmup"] in (0.0, 0.5, 1.0)  # Rounds 2 and 3 (indices 1, 2 > warm-up 0).
  assert results.run_row("attack", tiny_config(num_rounds=5), str(tmp_path / "run")) is None  # Not finished.
  results.write_csv(str(tmp_path / "r.csv"), [row])
  back = results.read_csv(str(tmp_path / "r.csv"))[0]
  assert back["seed"] == 0 and np.isclose(back["attacker_weight"], row["attacker_weight"])
