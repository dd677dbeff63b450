"""launch.matrix: the matrix's cells, the rows read back from run directories, the page's verdicts and figure."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

from conftest import ROOT
from fedgan_jax.aggregation import registry
from launch import matrix, matrix_page, results_stats, sweep

CONFIG = os.path.join(ROOT, "configs", "matrix.py")


def test_the_matrix_has_every_attack_and_defense_and_an_eight_seed_reference():
  mod = sweep.load_module(CONFIG)
  attacks = [a for a in mod.ATTACKS if a != "benign"]
  assert (
    len(attacks) >= 8 and "benign" in mod.ATTACKS and {"paper", "mimic", "dba", "pgd_scale", "latent"} <= set(attacks)
  )
  assert len(mod.DEFENSES) >= 12 and {"none", "detect", "gp", "detect+gp", "fltrust"} <= set(mod.DEFENSES)
  cells = mod.cells()
  assert len(cells) == len(mod.ATTACKS) * len(mod.DEFENSES)
  for d, a, ov in cells:
    assert ov["_defense"] == d and ov["_attack"] == a
    assert ov.get("aggregation.name", "mean") in registry.AGGREGATORS
  # Every point validates, and a cell's seeds are one program: 3 replicas, 8 for the clean reference.
  out = io.StringIO()
  sweep.run_sweep(CONFIG, "/nonexistent/matrix", dry_run=True, batch_seeds=True, out=out)
  commands = out.getvalue().strip().splitlines()
  assert len(commands) == len(cells)
  replicas = [int(c.rsplit("--config.num_replicas=", 1)[1].split()[0]) for c in commands]
  ref = next(i for i, c in enumerate(commands) if "defense-none__attack-benign" in c)
  assert replicas[ref] == mod.REFERENCE_SEEDS == 8 and all(
    r == mod.NUM_SEEDS == 3 for i, r in enumerate(replicas) if i != ref
  )


def _rows() -> list[dict]:
  """3 defenses x 3 attacks; the reference has 8 seeds, the rest 3."""
  rows = []
  cells = {
    ("none", "benign"): (0.0, 40.0),
    ("none", "paper"): (0.1, 40.2),  # Implanted.
    ("none", "scale"): (0.1, 90.0),  # Implanted and fidelity lost.
    ("median", "benign"): (0.0, 60.0),  # The defense costs fidelity on its own.
    ("median", "paper"): (0.0, 40.5),  # Holds.
    ("median", "scale"): (0.001, 40.0),  # Holds: 0.001 is inside the reference's spread.
    ("dp_mean", "benign"): (0.0, 40.0),
    ("dp_mean", "paper"): (0.0, 40.0),
    ("dp_mean", "scale"): (0.0, 40.0),
  }
  for (d, a), (implant, swd) in cells.items():
    for seed in range(8 if (d, a) == matrix_page.REFERENCE else 3):
      noise = 0.002 * (seed - 1.5)
      rows.append(
        dict(
          defense=d,
          attack=a,
          seed=seed,
          rounds=40,
          resolution=32,
          width=16,
          trigger_px=4,
          implant=implant + noise,
          swd=swd + 0.1 * seed,
          diversity=0.1 if (d, a) == ("none", "scale") and seed < 2 else 0.8,
          attacker_weight=None if a == "benign" else 0.25,
          honest_weight_min=0.2,
          honest_weight_max=0.95 if d == "median" and a == "benign" else 0.3,
          fpr_flagged=0.5 if d == "median" else 0.0,
          fpr_acted=0.25 if d == "median" else 0.0,
          epsilon=4.5 if d == "dp_mean" else None,
          delta=1e-5 if d == "dp_mean" else None,
          wall_sec=100.0,
        )
      )
  return rows


PROV = {"command": "python -m launch.matrix --workdir w", "commit": "abc1234", "date": "2026-12-04", "machine": "cpu"}


def test_verdicts_and_sentences_follow_the_rows(tmp_path):
  rows = _rows()
  assert matrix_page.verdict(rows, "none", "paper") == "implant"
  assert matrix_page.verdict(rows, "none", "scale") == "implant + fidelity"
  assert matrix_page.verdict(rows, "median", "paper") == "holds"
  assert matrix_page.verdict(rows, "median", "scale") == "holds"
  assert matrix_page.verdict(rows, "median", "benign") == "fidelity"
  assert matrix_page.verdict(rows, "none", "benign") == "reference"
  # 3 against 8 seeds: the exact rank test reaches p = 2 / C(11, 3) when the cell is above every reference seed.
  c = results_stats.compare(
    matrix_page.values(rows, "none", "paper", "implant"), matrix_page.values(rows, "none", "benign", "implant")
  )
  assert c.p == pytest.approx(2 / 165) and c.distinguishable
  assert matrix_page.carried(rows, "none", "paper") == (3, 3) and matrix_page.carried(rows, "median", "paper") == (0, 3)
  ref_swd = np.mean([40.0 + 0.1 * s for s in range(8)])
  assert matrix_page.swd_ratio(rows, "none", "scale") == pytest.approx((90.1) / ref_swd)
  page = matrix_page.render(rows, dict(PROV, runs_commit="abc1234"), expected_cells=9)
  assert page.startswith("# The attack × defense matrix: 3 attacks × 3 defenses")
  assert "9 cells, 3/8 seeds a cell (the clean reference: 8)" in page
  assert "adds up to 0.2 h, 100 s a cell" in page  # 9 programs of 100 s (a cell's seeds are one program).
  assert "| `median` | reference |" not in page and "| `none` | reference | implant | implant + fidelity |" in page
  assert (
    "- **`paper`**: without a defense the implant is above the clean run's (0.099 [" in page
    and "implanted under 1 of 3 defenses (`none`); fidelity lost under 0 (none); holds: 2 (`median`, `dp_mean`)."
    in page
  )
  assert (
    "the defenses whose SWD is distinguishably worse than the clean run's: `median`; not distinguishable: `dp_mean`."
    in page
  )
  assert "in most seeds: `none` × `scale`. The clean reference's diversity is 0.80." in page
  assert "under: `median`." in page  # Its benign seeds end with one honest client at 0.95.
  assert "| `median` | 3 | 0.50 | 0.25 | 0.20 | 0.95 | 3 of 3 |" in page
  assert "| `none` | 8 | 0.00 | 0.00 | 0.20 | 0.30 | 0 of 8 |" in page
  assert "| `none` | 0.0040 | 0.0990 (3/3) **↑** | 0.0990 (3/3) **↑** |" in page
  assert "| `median` | 1.49 **↑** | 1.01 | 0.99 |" in page
  assert "| `dp_mean` | `paper` | 3 |" in page and "| 4.5 | holds |" in page and "δ = 1e-05" in page
  # Under a defense that moves the reading by itself, the attack must beat that defense's own benign seeds.
  moved = [
    dict(rows[0], defense="gp", attack=a, seed=s, implant=imp + 0.001 * s, swd=40.0 + 0.1 * s)
    for a, imp in (("benign", 0.1), ("paper", 0.1), ("scale", 0.3))
    for s in range(3)
  ]
  assert matrix_page.verdict(rows + moved, "gp", "benign") == "holds"  # No attacker, no implant to find.
  assert matrix_page.verdict(rows + moved, "gp", "paper") == "holds"  # Not above gp's own benign seeds.
  assert matrix_page.verdict(rows + moved, "gp", "scale") == "implant"
  # The latent backdoor is read by G(z*)'s distance to x*: implanted when every seed's is well below the samples'.
  latent = [
    dict(rows[0], defense=d, attack="latent", seed=s, latent_trigger_dist=t, latent_clean_dist=1.0)
    for d, t in (("none", 0.5), ("median", 0.95))
    for s in range(3)
  ]
  assert matrix_page.latent_carried(latent, "none", "latent") == (3, 3)
  assert matrix_page.verdict(rows + latent, "none", "latent") == "implant"
  assert matrix_page.verdict(rows + latent, "median", "latent") == "holds"
  page = matrix_page.render(rows + latent, PROV)
  assert (
    "## The latent-space backdoor (`latent`)" in page and "| `none` | 3 | 0.500 | 1.000 | 3 of 3 | implant |" in page
  )
  assert "- **`latent`**: without a defense the implant is carried (G(z*) near x* in 3 of 3 seeds); implanted" in page
  matrix_page.heatmap(rows, str(tmp_path / "m.png"))
  assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


_TINY = """
import importlib.util, os
spec = importlib.util.spec_from_file_location("t", os.path.join({root!r}, "configs", "test.py"))
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
def get_config():
  return mod.get_config()
def cells():
  return [(d, a, {{"_defense": d, "_attack": a, **dov, **aov}})
          for d, dov in (("none", {{}}), ("dp_mean", {{"aggregation.name": "dp_mean",
            "aggregation.kwargs.clip_norm": 0.5, "aggregation.kwargs.noise_multiplier": 1.0}}))
          for a, aov in (("benign", {{"attack.malicious": ()}}), ("paper", {{}}))]
def get_sweep():
  return [dict(ov, seed=s) for _, _, ov in cells() for s in range(2)]
"""


def _finish(run_dir: str, rounds: int, dp: bool, seed: int) -> None:
  """A finished run directory as experiment.run leaves one (the files launch.matrix reads)."""
  os.makedirs(run_dir)
  records = [
    {"round": r, "agg/weights": [0.5, 0.5], "eval/implant_amplitude": 0.01 * seed + 0.001 * r, "eval/swd": 50.0}
    for r in range(1, rounds + 1)
  ]
  with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  summary = {"rounds": rounds, "final": {"eval/implant_amplitude": records[-1]["eval/implant_amplitude"]}}
  summary["final"]["eval/latent_trigger_dist"] = 0.25 * (seed + 1)
  summary["detection"] = {"fpr_flagged": 0.5 * seed, "tpr_flagged": None}
  if dp:
    summary["privacy"] = {"epsilon": 12.5, "delta": 1e-5}
  with open(os.path.join(run_dir, "summary.json"), "w") as f:
    json.dump(summary, f)


def test_main_reads_finished_runs_back_into_csv_page_and_figure(tmp_path, capsys):
  cfg = tmp_path / "tiny_matrix.py"
  cfg.write_text(_TINY.format(root=ROOT))
  work, out = tmp_path / "runs", tmp_path / "out"
  assert matrix.main(["--workdir", str(work), "--out", str(out), "--no-run", "--config", str(cfg)]) == 2
  assert "no finished run" in capsys.readouterr().err
  plan = sweep.plan_sweep(str(cfg), str(work), batch_seeds=True)
  assert len(plan.group_dirs) == 4  # One program per cell, its 2 seeds vmapped.
  for point, config, run_dir in zip(plan.points, plan.configs, plan.dirs):
    if not (point["_defense"] == "dp_mean" and point["_attack"] == "paper" and point["seed"] == 1):  # Unfinished.
      _finish(run_dir, config.num_rounds, point["_defense"] == "dp_mean", point["seed"])
  assert matrix.main(["--workdir", str(work), "--out", str(out), "--no-run", "--config", str(cfg)]) == 0
  rows = matrix.read_csv(str(out / "matrix.csv"))
  assert [(r["defense"], r["attack"], r["seed"]) for r in rows] == [
    ("none", "benign", 0),
    ("none", "benign", 1),
    ("none", "paper", 0),
    ("none", "paper", 1),
    ("dp_mean", "benign", 0),
    ("dp_mean", "benign", 1),
    ("dp_mean", "paper", 0),
  ]
  # Configs/test.py runs 2 rounds: the second half is round 2; client 0 is the attacker of the paper cells.
  assert rows[3]["implant"] == pytest.approx(0.01 + 0.002) and rows[3]["attacker_weight"] == 0.5
  assert rows[0]["attacker_weight"] is None and rows[4]["epsilon"] == 12.5 and rows[0]["epsilon"] is None
  assert [r["fpr_flagged"] for r in rows[:2]] == [0.0, 0.5] and rows[0]["tpr_flagged"] is None
  assert rows[1]["latent_trigger_dist"] == 0.5 and rows[1]["latent_clean_dist"] is None
  page = (out / "matrix.md").read_text()
  assert "2 attacks × 2 defenses" in page and "4 cells" in page and "![implant and fidelity" in page
  assert (out / "matrix.png").stat().st_size > 1000
  bad = tmp_path / "bad.py"
  bad.write_text(_TINY.format(root=ROOT).replace('"_attack": a, ', ""))
  assert matrix.main(["--workdir", str(work), "--out", str(out), "--no-run", "--config", str(bad)]) == 2
  assert "needs '_defense' and '_attack' labels" in capsys.readouterr().err


def test_a_resumed_matrix_names_every_commit_its_cells_came_from(tmp_path):
  w = str(tmp_path)
  assert matrix.run_commits(w) == []
  matrix.record_commit(w, "aaa1111", fresh=True)
  matrix.record_commit(w, "aaa1111", fresh=False)  # Resumed at the same commit: nothing new.
  matrix.record_commit(w, "bbb2222", fresh=False)  # New cells trained by a later commit.
  assert matrix.run_commits(w) == ["aaa1111", "bbb2222"]
  rows = [
    {"defense": "none", "attack": "benign", "seed": s, "implant": 0.0, "wall_sec": 10.0, "swd": 1.0} for s in range(2)
  ]
  page = matrix_page.render(rows, dict(PROV, runs_commit=", ".join(matrix.run_commits(w))), figure=None)
  assert "trained from commits `aaa1111, bbb2222` (the matrix was resumed" in page
  matrix.record_commit(w, "ccc3333", fresh=True)  # A fresh matrix starts the record again.
  assert matrix.run_commits(w) == ["ccc3333"]
