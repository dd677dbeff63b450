"""launch/sweep.py: grid expansion, names, dry-run commands, skip-finished logic, results.csv."""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
import textwrap

import pytest

from conftest import ROOT, write_sweep_file
from fedgan_jax import presets
from launch import sweep

PAPER = os.path.join(ROOT, "configs", "paper_sweep.py")


def _paper_points():
  return sweep.load_module(PAPER).get_sweep()


def test_product_and_zipped():
  pts = sweep.product({"a": [1, 2]}, sweep.zipped({"b.c": [3, 4], "d": ["x", "y"]}), {"seed": [0]})
  assert pts == [
    {"a": 1, "b.c": 3, "d": "x", "seed": 0},
    {"a": 1, "b.c": 4, "d": "y", "seed": 0},
    {"a": 2, "b.c": 3, "d": "x", "seed": 0},
    {"a": 2, "b.c": 4, "d": "y", "seed": 0},
  ]
  assert sweep.product({"a": [1], "b": [2, 3]}) == [{"a": 1, "b": 2}, {"a": 1, "b": 3}]
  with pytest.raises(ValueError, match="same number of values"):
    sweep.zipped({"a": [1, 2], "b": [1]})
  with pytest.raises(ValueError, match="'a' is set by two factors"):
    sweep.product({"a": [1]}, {"a": [2]})
  with pytest.raises(ValueError, match="expected a list of values"):
    sweep.product({"a": "abc"})


def test_paper_grid_count_and_unique_names():
  points = _paper_points()
  assert len(points) == 2 * 4 * 2 * 3
  names = sweep.check_names(points)
  assert len(set(names)) == len(names)
  assert "malicious-0__defense-gp__trigger_size-8__seed-2" in names
  assert "malicious-none__defense-none__trigger_size-4__seed-0" in names
  both = points[names.index("malicious-0__defense-both__trigger_size-4__seed-1")]
  assert both["aggregation.name"] == "detect" and both["train.regularizers.gradient_penalty"] == 10.0
  assert both["model.d_norm"] == "instance" and both["train.optimizer"] == "rmsprop"


def test_names_collide_clearly():
  with pytest.raises(ValueError, match="both map to the directory name"):
    sweep.check_names(sweep.product([{"_d": "x", "a": 1}, {"_d": "x", "a": 2}]))


def test_every_paper_point_is_a_valid_config():
  from fedgan_jax import config_lib

  mod = sweep.load_module(PAPER)
  base = mod.get_config()
  for p in mod.get_sweep():
    config_lib.validate(sweep.apply_overrides(base, p))
  with pytest.raises(ValueError, match="config.train.nope is not a known field"):
    sweep.apply_overrides(base, {"train.nope": 1})


def test_dry_run_prints_one_command_per_point(tmp_path):
  out = io.StringIO()
  assert sweep.run_sweep(PAPER, str(tmp_path / "sw"), dry_run=True, out=out) == []
  lines = out.getvalue().strip().splitlines()
  assert len(lines) == 48
  assert not (tmp_path / "sw").exists()  # A dry run writes nothing.
  argv = shlex.split(next(l for l in lines if "malicious-0__defense-both__trigger_size-8__seed-2" in l))
  assert argv[:3] == ["python", "-m", "fedgan_jax.main"]
  assert f"--config={PAPER}" in argv
  assert f"--workdir={tmp_path / 'sw' / 'malicious-0__defense-both__trigger_size-8__seed-2'}" in argv
  for flag in (
    "--config.attack.malicious=(0,)",
    "--config.aggregation.name=detect",
    "--config.aggregation.kwargs.warmup_rounds=10",
    "--config.train.loss=wgan",
    "--config.train.regularizers.gradient_penalty=10.0",
    "--config.attack.trigger_size=8",
    "--config.seed=2",
  ):
    assert flag in argv, (flag, argv)
  assert "--config.attack.malicious=()" in out.getvalue()


def test_dry_run_commands_parse_with_main():
  """The printed flags are accepted by fedgan_jax.main's override parsing."""
  from fedgan_jax import main as main_lib

  out = io.StringIO()
  sweep.run_sweep(PAPER, "/tmp/unused", dry_run=True, out=out)
  for line in out.getvalue().splitlines():
    argv = shlex.split(line)[3:]
    rest, kwargs = main_lib.split_overrides(argv)
    main_lib.check_override_names(rest)
    if "--config.aggregation.name=detect" in argv:
      want = {k.split(".")[-1]: v for k, v in presets.DETECTION.items() if k.startswith("aggregation.kwargs.")}
      assert kwargs == want and kwargs["features"] == ("g_loss_last",)  # Tuples of strings parse back.


def _fabricated_sweep(tmp_path, num_rounds=3):
  cfg = tmp_path / "tiny_sweep.py"
  cfg.write_text(
    textwrap.dedent(f"""
      from fedgan_jax import config_lib
      from launch.sweep import product

      def get_config():
        c = config_lib.base_config()
        c.num_rounds = {num_rounds}
        return c

      def get_sweep():
        return product({{"attack.malicious": [(), (0,)]}}, {{"seed": [0, 1]}})
  """)
  )
  return str(cfg)


def _summary(rounds, rate, tpr=None):
  return {
    "rounds": rounds,
    "final": {
      "eval/implant_amplitude": rate,
      "eval/implant_above_p99": rate / 2,
      "eval/swd": 0.1,
      "train/g_loss": [1.0, 2.0],
      "round": rounds,
    },
    "detect_tpr_mean": tpr,
    "detect_fpr_mean": 0.0,
    "first_flag_round": {"0": 2},
    "wall_sec": 1.5,
  }


def test_finished_points_are_skipped_and_results_written(tmp_path, monkeypatch):
  cfg = _fabricated_sweep(tmp_path)
  wd = tmp_path / "sw"
  names = sweep.check_names(sweep.load_module(cfg).get_sweep())
  assert names == ["malicious-none__seed-0", "malicious-none__seed-1", "malicious-0__seed-0", "malicious-0__seed-1"]
  # Finished, unfinished (a preempted run: rounds < num_rounds), and absent points.
  for name, rounds in (("malicious-none__seed-0", 3), ("malicious-0__seed-0", 3), ("malicious-0__seed-1", 2)):
    os.makedirs(wd / name)
    (wd / name / "summary.json").write_text(json.dumps(_summary(rounds, 0.25 if "0__" in name else 0.0, 1.0)))
  ran = []

  def fake_run(config, run_dir, num_replicas=1):
    assert num_replicas == 1
    ran.append((os.path.basename(run_dir), config.seed, tuple(config.attack.malicious), config.num_rounds))
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
      json.dump(_summary(config.num_rounds, 0.5), f)

  monkeypatch.setattr(sweep, "_run_in_process", fake_run)
  out = io.StringIO()
  rows = sweep.run_sweep(cfg, str(wd), out=out)
  assert sorted(ran) == [("malicious-0__seed-1", 1, (0,), 3), ("malicious-none__seed-1", 1, (), 3)]
  assert "4 points, 2 finished, 2 to run" in out.getvalue()
  assert [r["status"] for r in rows] == ["done"] * 4
  with open(wd / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert [r["name"] for r in table] == names
  row = table[2]
  assert row["attack.malicious"] == "0" and row["seed"] == "0"
  assert float(row["eval/implant_amplitude"]) == 0.25 and float(row["eval/swd"]) == 0.1
  assert float(row["detect_tpr_mean"]) == 1.0 and json.loads(row["first_flag_round"]) == {"0": 2}
  assert "train/g_loss" not in row  # Per-client lists stay in summary.json.
  assert "implant_amplitude" in out.getvalue()  # The printed table.

  # Rerunning runs nothing: every point is finished now.
  ran.clear()
  sweep.run_sweep(cfg, str(wd), out=io.StringIO())
  assert ran == []


def test_missing_results_are_reported(tmp_path):
  row = sweep.result_row("x", {"_defense": "gp", "seed": 0}, None)
  assert row == {"name": "x", "defense": "gp", "seed": 0, "status": "missing"}  # Labels lose their "_".
  cols = sweep.write_results(str(tmp_path / "r.csv"), [row, sweep.result_row("y", {"seed": 1}, _summary(3, 0.5))])
  assert cols[:4] == ["name", "defense", "seed", "status"] and "eval/implant_amplitude" in cols


def test_seed_groups_for_batched_seeds():
  points = _paper_points()
  groups = sweep.seed_groups(points)
  assert len(groups) == 16 and all(len(g) == 3 for g in groups)
  assert [points[i]["seed"] for i in groups[0]] == [0, 1, 2]
  # Non-consecutive seeds are split (replicas run seed, seed + 1, ...).
  assert sweep.seed_groups([{"seed": 0}, {"seed": 2}, {"seed": 3}]) == [[0], [1, 2]]


def test_batch_seeds_groups_and_dirs(tmp_path, monkeypatch):
  cfg = _fabricated_sweep(tmp_path)
  wd = tmp_path / "sw"
  calls = []

  def fake_replicas(config, group_dir, k):
    calls.append((os.path.basename(group_dir), config.seed, k))
    for s in range(config.seed, config.seed + k):
      os.makedirs(os.path.join(group_dir, f"seed_{s}"), exist_ok=True)
      with open(os.path.join(group_dir, f"seed_{s}", "summary.json"), "w") as f:
        json.dump(_summary(config.num_rounds, 0.5), f)

  monkeypatch.setattr(sweep, "_run_in_process", fake_replicas)
  rows = sweep.run_sweep(cfg, str(wd), batch_seeds=True, out=io.StringIO())
  assert sorted(calls) == [("malicious-0__seeds-0-1", 0, 2), ("malicious-none__seeds-0-1", 0, 2)]
  assert [r["status"] for r in rows] == ["done"] * 4
  calls.clear()
  sweep.run_sweep(cfg, str(wd), batch_seeds=True, out=io.StringIO())
  assert calls == []  # Finished replicas are skipped too.
  out = io.StringIO()
  sweep.run_sweep(PAPER, str(tmp_path / "p"), batch_seeds=True, dry_run=True, out=out)
  lines = out.getvalue().splitlines()
  assert len(lines) == 16 and all("--config.num_replicas=3" in l and "--config.seed=0" in l for l in lines)


def test_bad_flags(tmp_path):
  with pytest.raises(ValueError, match="--parallel=0"):
    sweep.run_sweep(PAPER, str(tmp_path), parallel=0)
  with pytest.raises(ValueError, match="no such file"):
    sweep.run_sweep(str(tmp_path / "none.py"), str(tmp_path))


@pytest.mark.slow
def test_one_tiny_point_end_to_end(tmp_path):
  """One 1-round point of configs/test.py through the real experiment.run."""
  cfg = write_sweep_file(tmp_path / "one.py", 1, {"seed": [0]})
  rows = sweep.run_sweep(cfg, str(tmp_path / "sw"), out=io.StringIO())
  assert rows[0]["status"] == "done" and rows[0]["rounds"] == 1
  assert "eval/implant_amplitude" in rows[0]


def test_a_clean_base_is_trained_once_per_seed_group_and_every_point_forks_from_it(tmp_path, monkeypatch):
  cfg = _fabricated_sweep(tmp_path, num_rounds=5)
  with open(cfg, "a") as f:
    f.write('\ndef get_base():\n  return {"attack.malicious": (), "num_rounds": 2}\n')
  wd = tmp_path / "sw"
  ran = []

  def fake_run(config, run_dir, num_replicas=1):
    ran.append((os.path.relpath(run_dir, wd), config.seed, num_replicas, config.num_rounds, config.init_from))
    for s in range(config.seed, config.seed + num_replicas):
      d = os.path.join(run_dir, f"seed_{s}") if num_replicas > 1 else run_dir
      os.makedirs(d, exist_ok=True)
      with open(os.path.join(d, "summary.json"), "w") as f:
        json.dump(_summary(config.num_rounds, 0.5), f)

  monkeypatch.setattr(sweep, "_run_in_process", fake_run)
  sweep.run_sweep(cfg, str(wd), out=io.StringIO())
  base0, base1 = f"{wd}/base__seed-0@2", f"{wd}/base__seed-1@2"
  assert ran == [
    ("base__seed-0", 0, 1, 2, ""),
    ("base__seed-1", 1, 1, 2, ""),
    ("malicious-none__seed-0", 0, 1, 5, base0),
    ("malicious-none__seed-1", 1, 1, 5, base1),
    ("malicious-0__seed-0", 0, 1, 5, base0),
    ("malicious-0__seed-1", 1, 1, 5, base1),
  ]
  ran.clear()
  sweep.run_sweep(cfg, str(wd), out=io.StringIO())
  assert ran == []  # Bases and points finished: nothing runs.
  # Seeds batched: one base per group, with the group's replicas; the printed commands say the same.
  sweep.run_sweep(cfg, str(tmp_path / "b"), batch_seeds=True, out=io.StringIO())
  assert [r[:3] for r in ran] == [("../b/base__seeds-0-1", 0, 2)] + [(r[0], 0, 2) for r in ran[1:]] and len(ran) == 3
  assert all(r[4] == f"{tmp_path}/b/base__seeds-0-1@2" for r in ran[1:])
  out = io.StringIO()
  sweep.run_sweep(cfg, str(tmp_path / "d"), batch_seeds=True, dry_run=True, out=out)
  lines = out.getvalue().splitlines()
  assert "base__seeds-0-1" in lines[0] and "--config.num_rounds=2" in lines[0] and "num_replicas=2" in lines[0]
  assert all(f"--config.init_from={tmp_path}/d/base__seeds-0-1@2" in line for line in lines[1:]) and len(lines) == 3
  with open(cfg, "a") as f:
    f.write('\ndef get_base():\n  return {"num_rounds": 5}\n')
  with pytest.raises(ValueError, match=r"get_base\(\): num_rounds=5 leaves nothing to train"):
    sweep.run_sweep(cfg, str(tmp_path / "e"), out=io.StringIO())
