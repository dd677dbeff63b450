"""Packed sweep points (fedgan_jax/pack.py, launch/packing.py): signatures, the plan, and packed == single runs."""

from __future__ import annotations

import io
import json
import os
import textwrap

import numpy as np
import pytest

from conftest import ROOT, tiny_config, write_sweep_file
from fedgan_jax import experiment, pack, presets
from fedgan_jax.federated import client as client_lib
from fedgan_jax.io import rundir
from launch import pack_bench, sweep

# Two points of one program: different seed, malicious mask, trigger pattern and size (4 px, the default at 32 px,
# vs 8 px at another margin), poison rate, reports, upload attack and server rule (A: the detection with its
# per-client state; B: FedAvg).
POINT_A = {
  "seed": 0,
  "attack.malicious": (0,),
  "aggregation.name": "detect",
  "aggregation.kwargs": {"detector": "robust_zscore", "warmup_rounds": 0, "decay": 0.5},
}
POINT_B = {
  "seed": 3,
  "attack.malicious": (1,),
  "attack.trigger": "bands",
  "attack.trigger_size": 8,
  "attack.trigger_margin": 2,
  "attack.poison_rate": 0.5,
  "attack.report_losses": "mimic",
  "attack.upload": "scale",
  "attack.start_round": 2,
}


def test_points_that_differ_in_round_inputs_share_a_signature():
  base = tiny_config()
  same = [
    tiny_config(**POINT_B),
    tiny_config(**{"attack.malicious": ()}),
    tiny_config(**{"attack.dba": True, "attack.malicious": (0, 1), "num_clients": 3}),
  ]
  assert pack.signature(same[0]) == pack.signature(base) == pack.signature(same[1])
  assert pack.signature(same[2]) != pack.signature(base)  # num_clients shapes the program.
  # Trigger sizes pack at the fixed bottom-right location (padded to the largest, test_trigger_sizes_pack_...);
  # random locations are drawn with the side: 4 px (what 0 resolves to at 32 px) and 8 px stay apart there.
  assert pack.signature(tiny_config(**{"attack.trigger_size": 8})) == pack.signature(base)
  rand = {"attack.trigger_location": "random"}
  assert pack.signature(tiny_config(**rand, **{"attack.trigger_size": 4})) == pack.signature(tiny_config(**rand))
  assert pack.why_apart(tiny_config(**rand), tiny_config(**rand, **{"attack.trigger_size": 8})) == [
    "(trigger side in px, random location): 4 vs 8"
  ]
  assert pack.why_apart(base, tiny_config(**{"model.g_width": 16, "train.g_lr": 1e-3})) == ["model.g_width: 8 vs 16"]
  assert pack.why_apart(base, tiny_config(**{"attack.latent_trigger": True})) == [
    "attack.latent_trigger: false vs true"
  ]
  assert pack.why_apart(base, same[0]) == []
  # The server's rule and its hyperparameters are each point's own (aggregation.choice), FLTrust's apart.
  detect = tiny_config(**{"aggregation.name": "detect", "aggregation.kwargs": {"decay": 0.5}})
  trimmed = tiny_config(**{"aggregation.name": "trimmed_mean", "aggregation.kwargs": {"beta": 0.2}})
  assert pack.signature(detect) == pack.signature(base) == pack.signature(trimmed)
  assert pack.traced_fields([base, detect, trimmed]) == [
    "aggregation.kwargs.beta",
    "aggregation.kwargs.decay",
    "aggregation.name",
  ]
  hyper = pack.hyper_inputs([base, detect, trimmed, tiny_config(**{"aggregation.name": "detect"})])
  assert sorted(hyper) == ["aggregation/rule"]  # Default vs given decay: two rules, nothing traced.
  np.testing.assert_array_equal(hyper["aggregation/rule"], [0, 1, 2, 3])
  fltrust = tiny_config(**{"aggregation.name": "fltrust"})
  assert pack.why_apart(base, fltrust) == ['aggregation.name: "mean" vs "fltrust"']


def test_trigger_sizes_pack_into_the_largest_window_and_each_point_reads_its_own():
  """4, 8 and 6 px (DBA) triggers stacked: an 8 px window each, the same poisoned pixels for every client as its
  own run's trigger, and the host (evaluator, poisoned examples) gets each point's own trigger back exactly."""
  import jax.numpy as jnp

  from fedgan_jax import assemble
  from fedgan_jax.data import triggers
  from fedgan_jax.federated import replicas

  dba = {"attack.dba": True, "attack.malicious": (0, 1), "attack.trigger_size": 6, "seed": 5}
  configs = [tiny_config(num_clients=3, **p) for p in (POINT_A, POINT_B, dba)]
  assert len({pack.signature(c) for c in configs}) == 1
  assert "attack.trigger_size" in pack.traced_fields(configs)
  datas = [assemble.setup_data(c)[0] for c in configs]
  assert [d.trigger.shape[0] for d in datas] == [4, 8, 6]
  stacked = replicas.stack_replicas(datas)
  assert stacked.trigger.shape == (3, 8, 8, 3) and stacked.trigger_part.shape == (3, 3, 8, 8)
  np.testing.assert_array_equal(stacked.trigger[1], datas[1].trigger)  # The largest is as its own run's.
  for k, (c, d) in enumerate(zip(configs, datas)):
    for client in range(3):
      imgs = jnp.asarray(d.images[client]).astype(jnp.float32) / 127.5 - 1.0
      flags = d.poison_flags[client] & d.is_malicious[client]
      want = triggers.paste(imgs, d.trigger, d.trigger_loc, flags, d.trigger_part[client])
      got = triggers.paste(imgs, stacked.trigger[k], stacked.trigger_loc[k], flags, stacked.trigger_part[k, client])
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"point {k} client {client}")
      assert bool(flags.any()) == bool((np.asarray(want) != np.asarray(imgs)).any())
    own = assemble.own_trigger(replicas.unstack(stacked, k), c)
    for f in ("trigger", "trigger_loc", "trigger_part"):
      np.testing.assert_array_equal(getattr(own, f), getattr(d, f), err_msg=f"point {k} {f}")
    np.testing.assert_array_equal(assemble.poisoned_examples(own, c), assemble.poisoned_examples(d, c))
  assert assemble.own_trigger(datas[0], configs[0]) is datas[0]  # A single run's data is left as it is.


GP = presets.GRADIENT_PENALTY


def test_learning_rates_and_regularizer_weights_are_traced_per_point():
  base = tiny_config(**GP)
  other = tiny_config(**{**GP, "train.g_lr": 1e-3, "train.d_lr": 5e-4, "train.regularizers.gradient_penalty": 5.0})
  assert pack.signature(other) == pack.signature(base) and pack.why_apart(base, other) == []
  assert pack.traced_fields([base, other]) == ["train.d_lr", "train.g_lr", "train.regularizers.gradient_penalty"]
  hyper = pack.hyper_inputs([base, other])
  assert sorted(hyper) == ["d_lr", "g_lr", "gradient_penalty"]  # r1, proximal: 0 in both, constants.
  np.testing.assert_array_equal(hyper["g_lr"], np.float32([2e-4, 1e-3]))
  np.testing.assert_array_equal(hyper["gradient_penalty"], np.float32([10.0, 5.0]))
  assert pack.hyper_inputs([base, tiny_config(**{**GP, "seed": 4})]) is None  # Nothing traced: today's program.
  # A term off (0) vs on changes the program: apart, named by the weights.
  off = tiny_config(**{**GP, "train.regularizers.gradient_penalty": 0.0})
  assert pack.why_apart(base, off) == ["train.regularizers.gradient_penalty: 10.0 vs 0.0"]
  r1 = [tiny_config(**{"train.regularizers.r1": w}) for w in (0.0, 1.0, 2.0)]
  assert pack.signature(r1[1]) == pack.signature(r1[2]) != pack.signature(r1[0])
  p = pack.plan(r1, ["off", "one", "two"])
  assert p.groups == [[0], [1, 2]] and p.traced[1] == ["train.regularizers.r1"]
  assert (
    pack.plan_lines(p, ["off", "one", "two"])[2]
    == "  program 2: 2 points packed: one, two (per point: train.regularizers.r1)"
  )
  # DP-SGD's per-example loss takes the penalties' weights as constants: they stay in its signature.
  dp = [tiny_config(**{**GP, "train.dp_sgd.enabled": True, "train.regularizers.gradient_penalty": w}) for w in (5, 10)]
  assert pack.why_apart(dp[0], dp[1]) == ["train.regularizers.gradient_penalty: 5.0 vs 10.0"]


def test_a_traced_learning_rate_keeps_the_optimizer_state_and_the_step():
  """optax with a traced learning rate: the same state tree (checkpoints interchangeable) and the same update."""
  import jax
  import jax.numpy as jnp

  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((3,))}
  grads = jax.tree.map(lambda x: jnp.sin(x) + 0.5, params)
  for opt in ({"train.optimizer": "adam"}, {"train.optimizer": "rmsprop", "train.rmsprop": "pytorch"}):
    c = tiny_config(**opt)
    const, traced = client_lib.optimizer(c, 1e-3), client_lib.optimizer(c, jnp.float32(1e-3))
    s0, s1 = const.init(params), traced.init(params)
    assert jax.tree.structure(s0) == jax.tree.structure(s1)
    step = jax.jit(lambda lr, g, s: client_lib.optimizer(c, lr).update(g, s, params))
    u_const, _ = const.update(grads, s0, params)
    u_traced, _ = step(jnp.float32(1e-3), grads, s1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u_const, u_traced)
    u_other, _ = step(jnp.float32(2e-3), grads, s1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(2 * a, b, rtol=1e-6), u_traced, u_other)


def test_plan_groups_points_and_says_why_one_runs_alone(tmp_path):
  configs = [
    tiny_config(seed=0),
    tiny_config(seed=1, **{"model.g_width": 16}),
    tiny_config(seed=2, **{"attack.malicious": ()}),
    tiny_config(seed=3),
  ]
  names = ["a", "wide", "clean", "d"]
  p = pack.plan(configs, names)
  assert p.groups == [[0, 2, 3], [1]]
  assert p.reasons == {1: "its program differs from a's in model.g_width: 16 vs 8"}
  lines = pack.plan_lines(p, names)
  assert lines[0] == "pack plan: 4 points in 2 programs (1 packed)"
  assert lines[1] == "  program 1: 3 points packed: a, clean, d (per point: attack.malicious, seed)"
  assert lines[2].startswith("  program 2: wide alone (its program differs from a's in model.g_width")
  p = pack.plan(configs, names, max_size=2)
  assert p.groups == [[0, 2], [1], [3]] and p.reasons[3] == "the programs hold at most --pack-size=2 points"
  # Points resume together only from the same round: d's checkpoints are at round 3.
  dirs = [str(tmp_path / n) for n in names]
  os.makedirs(os.path.join(dirs[3], "checkpoints", "3"))
  os.makedirs(os.path.join(dirs[3], "checkpoints", "2.damaged"))
  assert pack.saved_round(dirs[3]) == 3 and pack.saved_round(dirs[0]) == 0
  p = pack.plan(configs, names, dirs)
  assert p.groups == [[0, 2], [1], [3]]
  assert p.reasons[3] == "its checkpoints are at round 3, a's at 0"


def test_run_packed_refuses_points_of_different_programs(tmp_path):
  a, b = tiny_config(), tiny_config(**{"model.d_width": 16})
  with pytest.raises(pack.NotPackableError, match="model.d_width: 8 vs 16"):
    pack.run_packed([a, b], [str(tmp_path / "a"), str(tmp_path / "b")])
  with pytest.raises(ValueError, match="must be distinct"):
    pack.run_packed([a, a], [str(tmp_path / "a"), str(tmp_path / "a")])
  with pytest.raises(pack.NotPackableError, match="num_replicas=2"):
    pack.run_packed([tiny_config(num_replicas=2), a], [str(tmp_path / "a"), str(tmp_path / "b")])
  assert not (tmp_path / "a").exists()  # Refused before anything is written.


def test_rules_that_write_one_metric_differently_do_not_pack(tmp_path, monkeypatch):
  (tmp_path / "odd_rules.py").write_text(
    textwrap.dedent("""
      import jax.numpy as jnp
      from fedgan_jax.aggregation import base

      def scored(width=1):
        mean = base.mean()

        def aggregate(state, g, cp, stats, key):
          new, state, diag = mean.aggregate(state, g, cp, stats, key)
          return new, state, {**diag, "score": jnp.zeros((width,))}

        return base.Aggregator(mean.init, aggregate)
    """)
  )
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  configs = [
    tiny_config(**{"aggregation.name": "odd_rules:scored", "aggregation.kwargs": {"width": w}}) for w in (1, 2)
  ]
  assert pack.signature(configs[0]) == pack.signature(configs[1])
  with pytest.raises(pack.NotPackableError, match=r"write agg/score as float32\[1\] and float32\[2\]"):
    pack.run_packed(configs, [str(tmp_path / "a"), str(tmp_path / "b")])
  assert not (tmp_path / "a" / "config.json").exists()  # Refused before anything is written.


def _sweep_file(tmp_path, num_rounds: int, wide: bool = True, pair=(POINT_A, POINT_B)) -> str:
  """A sweep of configs/test.py: points a and b (one program) and, with ``wide``, one of another program."""
  points = [dict(pair[0], _point="a"), dict(pair[1], _point="b")]
  if wide:
    points.append({"model.g_width": 16, "_point": "wide"})
  return write_sweep_file(tmp_path / f"sweep{num_rounds}.py", num_rounds, points)


def test_sweep_pack_plan_and_fallback(tmp_path, monkeypatch):
  cfg = _sweep_file(tmp_path, 2)
  out = io.StringIO()
  assert sweep.run_sweep(cfg, str(tmp_path / "dry"), dry_run=True, pack=True, out=out) == []
  assert out.getvalue().splitlines() == [
    "pack plan: 3 points in 2 programs (1 packed)",
    "  program 1: 2 points packed: point-a, point-b (per point: aggregation.kwargs.decay, "
    "aggregation.kwargs.detector, aggregation.kwargs.warmup_rounds, aggregation.name, attack.malicious, "
    "attack.poison_rate, attack.report_losses, attack.start_round, attack.trigger, attack.trigger_margin, "
    "attack.trigger_size, attack.upload, seed); 2 server rules, each point computes all of them",
    "  program 2: point-wide alone (its program differs from point-a's in model.g_width: 16 vs 8)",
  ]
  for bad in ({"batch_seeds": True}, {"parallel": 2}, {"use_subprocess": True}):
    with pytest.raises(ValueError, match="--pack trains in this process"):
      sweep.run_sweep(cfg, str(tmp_path / "x"), pack=True, **bad)
  # A program that turns out not packable (nothing written) runs its points one by one.
  ran, packed = [], []

  def refuse(configs, dirs):
    packed.append([os.path.basename(d) for d in dirs])
    raise pack.NotPackableError("different local steps")

  def fake_run(config, run_dir, num_replicas=1):
    ran.append(os.path.basename(run_dir))
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
      json.dump({"rounds": config.num_rounds, "final": {}}, f)

  monkeypatch.setattr(pack, "run_packed", refuse)
  monkeypatch.setattr(sweep, "_run_in_process", fake_run)
  out = io.StringIO()
  rows = sweep.run_sweep(cfg, str(tmp_path / "sw"), pack=True, out=out)
  assert packed == [["point-a", "point-b"]] and ran == ["point-a", "point-b", "point-wide"]
  assert [r["status"] for r in rows] == ["done"] * 3
  assert "not packed (different local steps); its 2 points run one by one" in out.getvalue()


def test_pack_bench_measures_points_of_the_largest_pack(tmp_path):
  paper = os.path.join(ROOT, "configs", "paper_sweep.py")
  names, configs = pack_bench.select(paper, ["eval.extractor=none"], 4)
  assert len(names) == 4 and len({pack.signature(c) for c in configs}) == 1
  assert all(c.eval.extractor == "none" for c in configs)
  assert names[0] == "malicious-none__defense-none__trigger_size-4__seed-0"
  plan = sweep.plan_sweep(pack_bench.write_sweep_file(str(tmp_path), paper, names), str(tmp_path / "w"))
  assert plan.names == names
  with pytest.raises(ValueError, match="no two points pack"):
    pack_bench.select(paper, [], 1)


@pytest.mark.slow
def test_packed_points_equal_their_single_runs_and_resume_packed_or_alone(tmp_path):
  """Two WGAN-GP points that differ in seed, mask, trigger pattern and size, poison rate, reports, upload attack,
  server rule, learning rates and penalty weight: round 1 packed; round 2 resumed packed by the sweep from each
  point's own checkpoint; round 3 each resumed ALONE. Each equals its own 3-round run."""
  pair = (
    {**GP, **POINT_A},
    {**GP, **POINT_B, "train.g_lr": 1e-3, "train.d_lr": 5e-4, "train.regularizers.gradient_penalty": 2.0},
  )
  wd = tmp_path / "sw"
  dirs = [str(wd / "point-a"), str(wd / "point-b")]
  summaries = pack.run_packed([tiny_config(num_rounds=1, **p) for p in pair], dirs)
  assert [s["rounds"] for s in summaries] == [1, 1] and summaries[1]["pack"]["of"] == 2
  out = io.StringIO()
  rows = sweep.run_sweep(_sweep_file(tmp_path, 2, wide=False, pair=pair), str(wd), pack=True, out=out)
  assert "program 1: 2 points packed: point-a, point-b" in out.getvalue()
  assert [r["status"] for r in rows] == ["done"] * 2
  for k, (name, point) in enumerate(zip("ab", pair)):
    d = wd / f"point-{name}"
    s = json.loads((d / "summary.json").read_text())
    assert s["resumed_from"] == 1 and s["pack"]["index"] == k
    assert experiment.run(tiny_config(num_rounds=3, **point), str(d))["resumed_from"] == 2  # Alone.
    single = tmp_path / f"single-{name}"
    experiment.run(tiny_config(num_rounds=3, **point), str(single))
    assert (d / "config.json").read_text() == (single / "config.json").read_text()
    assert sorted(os.listdir(d / "checkpoints")) == sorted(os.listdir(single / "checkpoints"))
    assert sorted(os.listdir(d / "samples")) == sorted(os.listdir(single / "samples"))
    calib = [json.loads((p / "trigger_calibration.json").read_text()) for p in (d, single)]
    assert "real_poisoned_amplitude" in calib[1] and calib[0] == calib[1]
    got, want = rundir.read_records(str(d / "metrics.jsonl")), rundir.read_records(str(single / "metrics.jsonl"))
    assert [r["round"] for r in got] == [1, 2, 3] and set(got[2]) == set(want[2])
    assert {"eval/implant_amplitude", "eval/implant_above_p99"} <= set(want[2])  # Read with the point's own trigger.
    for g, w in zip(got, want):
      for key in w:
        if not key.startswith("z/"):  # Timings.
          np.testing.assert_allclose(
            np.asarray(g[key], float), np.asarray(w[key], float), rtol=1e-4, atol=1e-4, err_msg=f"{name} {key}"
          )
  # The points really differ (else the test could not tell them apart), and each kept its own rule's diagnostics.
  a, b = (rundir.read_records(str(wd / f"point-{n}" / "metrics.jsonl"))[-1] for n in "ab")
  assert a["train/g_loss"] != b["train/g_loss"] and "agg/times_flagged" in a and "agg/times_flagged" not in b
