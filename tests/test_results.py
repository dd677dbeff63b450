"""launch.results: rows read back from a real run, and the page rendered from rows (numbers and verdicts)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from conftest import tiny_config
from fedgan_jax import experiment
from fedgan_jax.io import rundir
from launch import results, results_page, results_stats

SEEDS = 8


def _rows(attack_implant: float) -> list[dict]:
  """8 seeds per setting; the attack's implant is ``attack_implant`` + seed noise, clean ones near 0."""
  rows = []
  base = {"rounds": 100, "resolution": 32, "trigger_px": 4, "trigger_area_pct": 1.562, "wall_sec": 60.0}
  for setting, implant in (
    ("clean", 0.0),
    ("attack", attack_implant),
    ("attack+detect", 0.0),
    ("attack+gp", 0.08),
    ("attack+both", 0.0),
    ("clean+detect", 0.0),
    ("noniid+detect", 0.0),
    ("attack_trigger2", 0.03),
  ):
    for seed in range(SEEDS):
      noise = 0.002 * (seed - 3.5)
      row = dict(base, setting=setting, seed=seed, implant=implant + noise, swd=40.0 + seed, diversity=0.9)
      row.update({f"implant_{px}px": implant + noise for px in (2, 4, 8)}, above_p99=0.5, honest_weight_max=0.25)
      if setting == "attack_trigger2":
        row.update(trigger_px=2, trigger_area_pct=0.391)
      if "detect" in setting:
        row.update(tpr_flagged=0.9, tpr_acted=0.8, fpr_flagged=0.3 + 0.01 * seed, fpr_acted=0.1, rounds_acted=0.5)
        row.update(honest_weight_min=0.01, honest_weight_max=0.95 if seed < 6 else 0.6)
      rows.append(row)
  return rows


PROV = {
  "command": "python -m launch.results --workdir w",
  "commit": "abc1234",
  "date": "2026-12-03",
  "machine": "cpu",
  "wall_sec": 600.0,
}


def test_page_numbers_follow_the_rows():
  rows = _rows(attack_implant=0.1)
  page = results_page.render(rows, PROV)
  assert "# Results: the paper's settings, 8 seeds each" in page and "commit `abc1234`" in page
  ci = results_stats.mean_ci([r["implant"] for r in rows if r["setting"] == "attack"])
  assert ci.mean == pytest.approx(0.1) and ci.lo < 0.1 < ci.hi
  assert f"| 1 attacker (client 0), no defense (`attack`) | 8 | 0.100 [{ci.lo:.3f}, {ci.hi:.3f}] | 8 of 8 |" in page
  assert "0.39 % (the paper: 16×16 on 256×256)" in page
  # 8 settings of one 60 s program each (8 seeds vmapped): 8 min, not 64.
  assert "adds up to 8 min; this regeneration took 10 min end to end" in page
  assert "in 6 of 8 seeds one honest client holds at least 0.9" in page
  assert "No run collapsed" in page


def test_verdicts_follow_the_rows_and_say_not_distinguishable():
  strong = results_page.render(_rows(attack_implant=0.1), PROV)
  assert "The implant is real here." in strong
  assert "Detection removes the implant (below the attack's, not distinguishable from clean)" in strong
  assert "WGAN-GP reduces the implant but does not remove it" in strong
  assert "Agrees: neither the implant nor the fidelity is distinguishable from the clean run." in strong
  assert "heterogeneity is not flagged more." in strong  # 0.3 + 0.01 seed in both: the same.
  weak = results_page.render(_rows(attack_implant=0.0), PROV)
  assert "At this scale the implant is not distinguishable." in weak
  assert "attack seeds above every clean seed: 0 of 8." in weak
  assert "Detection does not change the implant distinguishably" in weak
  collapsed = _rows(attack_implant=0.1)
  for r in collapsed:
    if r["setting"] == "attack" and r["seed"] < 3:
      r["diversity"] = 0.05
  assert "`attack` 3 of 8" in results_page.render(collapsed, PROV)


def test_mean_ci_and_comparison_against_scipy():
  rng = np.random.default_rng(0)
  a, b = rng.normal(0.1, 0.02, 8), rng.normal(0.0, 0.02, 8)
  ci = results_stats.mean_ci(a, num=20000)
  ref = scipy.stats.bootstrap((a,), np.mean, n_resamples=20000, method="percentile", random_state=1)
  assert abs(ci.lo - ref.confidence_interval.low) < 2e-3 and abs(ci.hi - ref.confidence_interval.high) < 2e-3
  c = results_stats.compare(a, b)
  assert c.p == pytest.approx(scipy.stats.mannwhitneyu(a, b, method="exact").pvalue)
  assert c.p < 0.001 and c.distinguishable and not c.overlap  # 8 vs 8 fully separated: p = 2 / C(16, 8).
  same = results_stats.compare(a, a + rng.normal(0, 0.001, 8))
  assert not same.distinguishable and same.overlap
  assert results_stats.compare([1.0], [2.0, 3.0]) is None and results_stats.mean_ci([None, float("nan")]) is None
  assert results_stats.above([0.1, 0.2, None, 0.3], 0.15) == (2, 3) and results_stats.above([0.1], None) == (0, 1)


def test_fmt():
  assert results_page.fmt(results_stats.MeanCI(0.25, 0.2, 0.3, 8), pct=True) == "25.0 [20.0, 30.0] %"
  assert results_page.fmt(results_stats.MeanCI(0.5, 0.5, 0.5, 1)) == "0.500" and results_page.fmt(None) == "–"


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
  assert row["tpr_flagged"] in (0.0, 0.5, 1.0)  # Rounds 2 and 3 (indices 1, 2 > warm-up 0).
  assert row["tpr_acted"] <= row["tpr_flagged"] and row["implant_final"] is not None and row["diversity_final"] > 0
  # The mean over the second half's evaluations (rounds 2 and 3 of 3).
  late = [r for r in rundir.read_records(str(tmp_path / "run" / "metrics.jsonl")) if r["round"] > 1]
  assert [r["round"] for r in late] == [2, 3] and late[-1]["eval/implant_amplitude"] == row["implant_final"]
  assert row["implant"] == pytest.approx(np.mean([r["eval/implant_amplitude"] for r in late]), rel=1e-9)
  assert results.run_row("attack", tiny_config(num_rounds=5), str(tmp_path / "run")) is None  # Not finished.
  # Membership inference in every run (pixels: the tiny config has no extractor); utility only when conditional.
  assert 0.0 <= row["mia_auc_final"] <= 1.0 and row["tstr_acc_final"] is None and row["trigger_transfer_final"] is None
  results.write_csv(str(tmp_path / "r.csv"), [row])
  back = results.read_csv(str(tmp_path / "r.csv"))[0]
  assert back["seed"] == 0 and np.isclose(back["attacker_weight"], row["attacker_weight"])
