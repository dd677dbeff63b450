"""launch.utility and configs/utility.py: the settings validate, rows read from fake runs, the page follows the rows."""

from __future__ import annotations

import json
import os

import pytest

from fedgan_jax import config_lib
from launch import results, results_stats, sweep, utility
from launch.results_page import fmt

PROV = {
  "command": "python -m launch.utility --workdir w",
  "commit": "abc1234",
  "date": "2026-12-04",
  "machine": "cpu",
  "wall_sec": 1200.0,
  "runs_commit": "def5678",
}


def _rows(seeds: int, attack_transfer: float = 0.4, dp_mia: float = 0.5) -> list[dict]:
  """``seeds`` per setting; the attack's trigger transfer ``attack_transfer`` + seed noise, clean ones near 0.02."""
  rows = []
  for setting in utility.ORDER:
    for seed in range(seeds):
      noise = 0.001 * (seed - (seeds - 1) / 2)
      attacked = setting.startswith("attack") and setting not in ("attack+detect", "attack+both")
      row = {"setting": setting, "seed": seed, "rounds": 30, "width": 16, "wall_sec": 120.0 + seed}
      row.update(tstr_acc_final=0.7 + noise, trtr_acc_final=0.9 + noise, tstr_bacc_final=0.65 + noise)
      row.update(trtr_bacc_final=0.88 + noise, tstr_auc_final=0.75 + noise, trtr_auc_final=0.95 + noise)
      row.update(trigger_transfer_final=(attack_transfer if attacked else 0.02) + noise)
      row.update(trigger_transfer_real_final=0.02 + noise, trigger_target_rate_final=0.1 + noise)
      row.update(trigger_target_rate_real_final=0.05, implant_final=0.01, swd_final=50.0 + seed, diversity_final=0.8)
      leak = setting == "clean"
      row["mia_auc_final"] = (0.6 if leak else dp_mia if setting.endswith("dp_sgd") else 0.5) + noise
      if setting.endswith("dp_sgd"):
        row.update(epsilon_min=2.0, epsilon_max=3.0 + 0.1 * seed, dp_delta=1e-5)
      rows.append(row)
  return rows


def test_settings_are_the_papers_conditional_and_all_validate(tmp_path):
  plan = sweep.plan_sweep("configs/utility.py", str(tmp_path), batch_seeds=True)
  settings = [p["_setting"] for p in plan.points]
  assert sorted(set(settings)) == sorted(utility.ORDER) and len(settings) == 3 * len(utility.ORDER)
  for point, config in zip(plan.points, plan.configs):
    config_lib.validate(config)
    assert config.model.conditional and config.eval.utility_every == 0 and config.eval.extractor == "none"
    assert (config.data.partition, config.data.alpha) == ("dirichlet", 0.3)  # The same skew everywhere.
    s = point["_setting"]
    assert config.train.dp_sgd.enabled == s.endswith("dp_sgd")
    assert (config.train.loss == "wgan") == ("gp" in s or "both" in s)
    assert (config.model.d_norm == "instance") == (config.train.loss == "wgan")  # DP-SGD's D has no BatchNorm.
    assert (config.aggregation.name == "detect") == ("detect" in s or "both" in s)
    assert (tuple(config.attack.malicious) == ()) == s.startswith("clean")
  assert set(utility.PRIVATE_REFERENCE.values()) <= set(settings)


def test_page_numbers_follow_the_rows():
  rows = _rows(seeds=3)
  page = utility.render(rows, PROV)
  vals = [r["tstr_bacc_final"] for r in rows if r["setting"] == "attack"]
  ci = results_stats.mean_ci(vals)
  assert ci.mean == pytest.approx(0.65) and ci.lo < 0.65 < ci.hi
  tstr_cells = [
    fmt(results_stats.mean_ci([r[k] for r in rows if r["setting"] == "attack"]))
    for k in ("tstr_acc_final", "trtr_acc_final")
  ]
  assert f"| 1 attacker (client 0), no defense (`attack`) | 3 | {tstr_cells[0]} | {tstr_cells[1]} | {fmt(ci)} |" in page
  eps = fmt(results_stats.mean_ci([3.0, 3.1, 3.2]), 2)
  assert eps.startswith("3.10 [") and f"| {eps} | 2.00 |" in page  # The DP rows' ε columns; others "–".
  assert "| 0.80 | – | – |" in page
  assert "commit `abc1234`" in page and "trained from commit `def5678`" in page
  assert "adds up to 16 min; this regeneration took 20 min end to end" in page  # 8 settings x 122 s (max over seeds).
  assert "Not yet run" not in page


def test_sentences_follow_the_rows():
  three = utility.render(_rows(seeds=3), PROV)
  # 3 vs 3 seeds: the rank test cannot reach p < 0.05, which the page says; CIs apart is still reported.
  assert "the exact test's smallest possible p is 0.1 (tied" in three
  assert "attack's trigger transfer (predictions the pasted trigger flips) against the clean run's: 0.400" in three
  assert "not distinguishable (CIs apart, Mann-Whitney p = 0.1)" in three
  assert "settings whose membership AUC CI lies wholly above 0.5 (chance): `clean` 0.600 [" in three
  assert (
    "the TSTR classifier's against the real-data one's in the same runs: 0.100 [0.099, 0.101] against 0.050" in three
  )
  assert (
    "**DP-SGD, `clean+gp+dp_sgd` against `clean+gp`** (ε ≤ 3.20 (δ = 1e-05) per image, worst client and seed)" in three
  )
  assert "**Mode collapse** (final diversity below 0.25, docs/results.md's threshold): no seed." in three
  rows = _rows(seeds=3)
  for r in rows:
    r["diversity_final"] = 0.2 if r["setting"] == "attack" and r["seed"] < 2 else r["diversity_final"]
  assert "threshold): `attack` 2 of 3 seeds. A collapsed" in utility.render(rows, PROV)
  eight = utility.render(_rows(seeds=8), PROV)
  assert "smallest possible p" not in eight
  assert "against the clean run's: 0.400" in eight and "distinguishable (CIs apart, Mann-Whitney p = 0.00016)" in eight
  # The attack's transfer equal to clean's: no longer apart; DP's membership AUC equal to its reference's.
  same = utility.render(_rows(seeds=8, attack_transfer=0.02), PROV)
  assert "against the clean run's: 0.020 [" in same and "not distinguishable (CIs overlap" in same
  assert "membership AUC 0.500 [" in same
  partial = utility.render([r for r in _rows(seeds=3) if r["setting"] in ("clean", "attack")], PROV)
  assert "Not yet run: `attack+detect`" in partial and "DP-SGD" not in partial.split("## What the rows say")[1]


def _fake_run(run_dir: str, rounds: int, epsilon: list[float] | None) -> None:
  os.makedirs(run_dir, exist_ok=True)
  final = {"eval/tstr_acc": 0.7, "eval/trigger_transfer": 0.25, "eval/mia_auc": 0.55, "eval/swd": 40.0}
  summary = {"rounds": rounds, "final": final, "wall_sec": 90.0}
  if epsilon is not None:
    summary["privacy"] = {"dp_sgd": {"epsilon": epsilon, "delta": 1e-5}}
  with open(os.path.join(run_dir, "summary.json"), "w") as f:
    json.dump(summary, f)
  with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"round": rounds, "agg/weights": [0.25] * 4, "eval/implant_amplitude": 0.0}) + "\n")


def test_main_reads_fake_runs_and_writes_both_files(tmp_path):
  plan = sweep.plan_sweep("configs/utility.py", str(tmp_path / "w"), batch_seeds=True)
  for point, config, run_dir in zip(plan.points, plan.configs, plan.dirs):
    if point["_setting"] in ("attack+gp", "attack+gp+dp_sgd"):
      dp = point["_setting"].endswith("dp_sgd")
      _fake_run(run_dir, config.num_rounds, [2.5, 3.5 + config.seed, 3.0, 3.0] if dp else None)
  results.record_commit(str(tmp_path / "w"), "fff0000", fresh=True)
  out = tmp_path / "docs"
  assert utility.main(["--workdir", str(tmp_path / "w"), "--out", str(out), "--no-run"]) == 0
  rows = results.read_csv(str(out / "utility.csv"))
  assert [(r["setting"], r["seed"]) for r in rows] == [("attack+gp", s) for s in range(3)] + [
    ("attack+gp+dp_sgd", s) for s in range(3)
  ]
  assert [r["epsilon_max"] for r in rows] == [None] * 3 + [3.5, 4.5, 5.5]
  assert rows[3]["epsilon_min"] == 2.5 and rows[3]["tstr_acc_final"] == 0.7 and rows[3]["mia_auc_final"] == 0.55
  page = (out / "utility.md").read_text()
  assert f"`python -m launch.utility --workdir {tmp_path / 'w'}`" in page and "from commit `fff0000`" in page
  assert (
    "**DP-SGD, `attack+gp+dp_sgd` against `attack+gp`** (ε ≤ 5.50 (δ = 1e-05) per image, worst client and seed)" in page
  )
  assert "Not yet run: `clean`, `attack`, `attack+detect`, `attack+both`, `clean+gp`, `clean+gp+dp_sgd`." in page
  assert utility.main(["--workdir", str(tmp_path / "none"), "--out", str(out), "--no-run"]) == 2
