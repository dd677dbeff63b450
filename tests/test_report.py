"""Run/sweep reports (fedgan_jax.report) and the TensorFlow-free TensorBoard writer.

No training happens here: run directories are fabricated by hand with the keys
``experiment.run`` writes (config.json, metrics.jsonl, samples/, summary.json).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fedgan_jax import config_lib, report
from fedgan_jax.io import images as image_io

# The final metrics a run's report shows (its page and the sweep's comparison table).
FINAL_METRICS = (
  "eval/implant_amplitude",
  "eval/implant_above_p99",
  "eval/diversity",
  "eval/swd",
  "eval/fid@effnet_lite0",
  "eval/kid@effnet_lite0",
)
RUN_IMAGES = [
  "fidelity.png",
  "trigger.png",
  "weights.png",
  "losses.png",
  "detection.png",
  "samples_strip.png",
  "samples.gif",
]


def make_run(
  path,
  *,
  num_clients=4,
  num_rounds=6,
  malicious=(0,),
  eval_every=2,
  extractor="effnet_lite0",
  with_eval=True,
  flag_from=3,
  seed=0,
  nulls=False,
  config_overrides=None,
  num_samples=None,
):
  """Writes a realistic run directory; returns its summary dict."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(path, "samples"), exist_ok=True)
  config = config_lib.base_config()
  config.num_clients, config.num_rounds, config.eval_every = num_clients, num_rounds, eval_every
  config.attack.malicious = tuple(malicious)
  config.eval.extractor = extractor
  for dotted, value in (config_overrides or {}).items():
    node = config
    *parents, last = dotted.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(config_lib.to_json(config))

  is_mal = np.zeros(num_clients, bool)
  is_mal[list(malicious)] = True
  times = np.zeros(num_clients, int)
  records = []
  for r in range(1, num_rounds + 1):
    g = rng.uniform(0.7, 1.0, num_clients) + 0.8 * is_mal * r / num_rounds
    d = rng.uniform(1.1, 1.4, num_clients) - 0.3 * is_mal
    flagged = is_mal & (r >= flag_from) if flag_from else np.zeros(num_clients, bool)
    times += flagged
    w = 0.9**times
    w = w / w.sum()
    rec = {
      "round": r,
      "train/g_loss": g.tolist(),
      "train/d_loss": d.tolist(),
      "train/g_loss_last": (g + 0.01).tolist(),
      "train/d_loss_last": (d - 0.01).tolist(),
      "train/update_norm": rng.uniform(0.02, 0.05, num_clients).tolist(),
      "agg/weights": w.tolist(),
      "agg/flagged": flagged.tolist(),
      "agg/nonfinite": [False] * num_clients,
      "agg/scores": (0.45 + 0.2 * is_mal + rng.uniform(0, 0.05, num_clients)).tolist(),
      "agg/times_flagged": times.tolist(),
      "eval/detect_tpr": (float(flagged[is_mal].mean()) if is_mal.any() else None),
      "eval/detect_fpr": (float(flagged[~is_mal].mean()) if (~is_mal).any() else None),
      "z/wall_sec": 1.5 * r,
    }
    if nulls:
      rec["train/g_loss"][-1] = None
      rec["eval/detect_tpr"] = None
    if with_eval and (r % eval_every == 0 or r in (1, num_rounds)):
      rec["eval/implant_amplitude"] = 0.01 * r
      rec["eval/implant_amplitude_lo"], rec["eval/implant_amplitude_hi"] = 0.01 * r - 0.005, 0.01 * r + 0.005
      rec["eval/implant_above_p99"] = min(1.0, 0.15 * r)
      rec["eval/diversity"] = 0.9
      rec["eval/swd"] = 300.0 / r + rng.uniform(0, 5)
      rec[f"eval/fid@{extractor}"] = 80.0 / r
      rec[f"eval/kid@{extractor}"] = 0.05 / r
      if nulls:
        rec[f"eval/kid@{extractor}"] = None
    records.append(rec)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for rec in records:
      f.write(json.dumps(rec, sort_keys=True) + "\n")

  sample_rounds = sorted({1, num_rounds} | set(range(eval_every, num_rounds + 1, eval_every))) if with_eval else [1]
  for r in sample_rounds[:num_samples]:
    imgs = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    image_io.save_png(os.path.join(path, "samples", f"round_{r:06d}.png"), image_io.grid(imgs, 4), scale=2)

  final = {}
  for rec in records:
    final.update({k: v for k, v in rec.items() if not k.startswith("z/")})
  first_flag = {str(c): (flag_from if flag_from and flag_from <= num_rounds else None) for c in malicious}
  tprs = [x["eval/detect_tpr"] for x in records if x["eval/detect_tpr"] is not None]
  summary = {
    "final": final,
    "rounds": num_rounds,
    "malicious": list(malicious),
    "first_flag_round": first_flag,
    "detect_tpr_mean": float(np.mean(tprs)) if tprs else None,
    "detect_fpr_mean": 0.0,
    "data": {"source": "synthetic", "resolution": 32},
    "wall_sec": 1.5 * num_rounds,
  }
  with open(os.path.join(path, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  with open(os.path.join(path, "trigger_calibration.json"), "w") as f:
    json.dump({"num_clean_real": 64, "templates": {"run": {"threshold_p99": 0.03, "fpr_out_of_sample": 0.01}}}, f)
  return summary


def _check_png(path, min_side=100):
  with Image.open(path) as im:
    assert im.format == "PNG", path
    assert min(im.size) >= min_side, (path, im.size)
    im.load()
    arr = np.asarray(im.convert("L"))
  assert arr.std() > 1.0, f"{path} looks blank"


def test_cli_run_report_renders_everything(tmp_path):
  run = tmp_path / "run"
  summary = make_run(str(run))
  proc = subprocess.run(
    [sys.executable, "-m", "fedgan_jax.report", "--workdir", str(run)], capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr
  out_dir = run / "report"
  for name in RUN_IMAGES:
    assert (out_dir / name).exists(), name
    assert str(out_dir / name) in proc.stdout
  for name in RUN_IMAGES:
    if name.endswith(".png"):
      _check_png(out_dir / name)
  with Image.open(out_dir / "samples.gif") as gif:
    assert gif.format == "GIF"
    assert gif.n_frames == len(os.listdir(run / "samples")) == 4
    assert min(gif.size) >= 100

  page = (out_dir / "report.html").read_text()
  for name in RUN_IMAGES:
    assert f"src='{name}'" in page, name
  final = summary["final"]
  for key in FINAL_METRICS:
    assert report.format_value(final[key]) in page, key
  # Honest naming: effnet features are an FD, not "FID".
  assert "FD (effnet_lite0 features)" in page and "KD (effnet_lite0 features)" in page
  assert "<details>" in page and "&quot;num_clients&quot;: 4" in page
  assert "client 0" in page and "never" not in page  # Attacker flagged at round 3.


def test_metric_labels_are_honest():
  assert report.metric_label("eval/fid@inception_v3") == "FID"
  assert report.metric_label("eval/fid@effnet_lite0") == "FD (effnet_lite0 features)"
  assert report.metric_label("eval/kid@effnet_lite0") == "KD (effnet_lite0 features)"
  assert "FID" not in report.metric_label("eval/fid@dinov2")
  assert report.metric_label("eval/swd").startswith("SWD")


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(num_clients=1, num_rounds=1, malicious=(), with_eval=False, flag_from=0),  # One client, one round.
    dict(num_clients=64, num_rounds=5, malicious=(0, 17), nulls=True),  # Many clients, nulls.
    dict(num_clients=3, num_rounds=4, malicious=(2,), flag_from=0, extractor="inception_v3", num_samples=1),
  ],
)
def test_run_report_is_robust(tmp_path, kwargs):
  make_run(str(tmp_path), **kwargs)
  paths = report.write_run_report(str(tmp_path))
  assert paths[-1].endswith("report.html") and all(os.path.exists(p) for p in paths)
  names = {os.path.basename(p) for p in paths}
  assert {"weights.png", "losses.png", "samples_strip.png", "samples.gif"} <= names
  assert ("fidelity.png" in names) == kwargs.get("with_eval", True)
  flag_from = kwargs.get("flag_from", 3)
  assert ("detection.png" in names) == bool(flag_from and kwargs["malicious"] and flag_from <= kwargs["num_rounds"])
  for p in paths:
    if p.endswith(".png"):
      _check_png(p, min_side=80)
  page = open(paths[-1]).read()
  for n in names - {"report.html"}:
    assert f"src='{n}'" in page
  if kwargs.get("extractor") == "inception_v3":
    assert ">FID<" in page and ">KID<" in page
  if not kwargs.get("with_eval", True):
    assert "no fidelity metrics recorded" in page
  if flag_from == 0 and kwargs["malicious"]:
    assert "never" in page and "no client was ever flagged" in page
  if kwargs["num_clients"] == 1:  # Rerunning replaces the report (no stale files, no error).
    assert report.write_run_report(str(tmp_path)) == paths


def test_sweep_report(tmp_path):
  sweep = tmp_path / "sweep"
  # Two runs directly below the sweep, one nested one level deeper.
  for sub, agg, seed in (("mean", "mean", 1), ("median", "median", 2), ("robust/trimmed", "trimmed_mean", 3)):
    os.makedirs(sweep / sub)
    make_run(str(sweep / sub), seed=seed, config_overrides={"aggregation.name": agg})
  report.write_run_report(str(sweep / "mean"))  # Linked from the comparison page when present.
  proc = subprocess.run(
    [sys.executable, "-m", "fedgan_jax.report", "--workdir", str(sweep)], capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr
  out = sweep / "report"
  with open(out / "comparison.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["run"] for r in rows] == ["mean", "median", os.path.join("robust", "trimmed")]
  assert [r["aggregation.name"] for r in rows] == ["mean", "median", "trimmed_mean"]
  assert "seed" not in rows[0] and "num_clients" not in rows[0]  # Only fields that differ.
  for key in (
    *FINAL_METRICS,
    "detect_tpr_mean",
    "detect_fpr_mean",
    "first_flag_round",
  ):
    assert key in rows[0], key
  assert all(r["first_flag_round"] == "3" for r in rows)
  summ = json.loads((sweep / "median" / "summary.json").read_text())
  assert float(rows[1]["eval/swd"]) == pytest.approx(summ["final"]["eval/swd"])
  _check_png(out / "final_metrics.png")
  page = (out / "comparison.html").read_text()
  assert "src='final_metrics.png'" in page and "trimmed_mean" in page
  assert "../mean/report/report.html" in page
  assert report.format_value(summ["final"]["eval/swd"]) in page


def test_not_a_run_dir_is_a_clear_error(tmp_path):
  (tmp_path / "empty").mkdir()
  proc = subprocess.run(
    [sys.executable, "-m", "fedgan_jax.report", "--workdir", str(tmp_path / "empty")],
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert proc.returncode != 0
  assert "metrics.jsonl" in proc.stderr and "Traceback" not in proc.stderr
  with pytest.raises(report.NotARunError, match="metrics.jsonl"):
    report.write_run_report(str(tmp_path / "empty"))
  with pytest.raises(report.NotARunError, match="summary.json"):
    report.write_sweep_report(str(tmp_path / "empty"))
  with pytest.raises(report.NotARunError, match="does not exist"):
    report.write_report(str(tmp_path / "missing"))


def test_tensorboard_round_trip(tmp_path):
  pytest.importorskip("tensorboard")
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  from fedgan_jax.io.tensorboard import TensorBoardWriter

  img = np.random.default_rng(0).integers(0, 256, (18, 26, 3), dtype=np.uint8)
  with TensorBoardWriter(str(tmp_path / "tb")) as tb:
    assert tb.enabled
    tb.scalars(
      1,
      {
        "round": 1,
        "train/g_loss": [0.5, 1.25],
        "eval/swd": 12.5,
        "eval/detect_tpr": None,
        "agg/flagged": [True, False],
        "eval/fid@x": float("nan"),
      },
    )
    tb.scalars(2, {"train/g_loss": np.array([0.75, 1.5], np.float32), "eval/swd": np.float64(10.0)})
    tb.image(2, "samples", img)
    tb.flush()
  acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "images": 0})
  acc.Reload()
  tags = acc.Tags()
  assert set(tags["scalars"]) == {
    "train/g_loss/client_0",
    "train/g_loss/client_1",
    "eval/swd",
    "agg/flagged/client_0",
    "agg/flagged/client_1",
  }
  assert [(e.step, e.value) for e in acc.Scalars("train/g_loss/client_1")] == [(1, 1.25), (2, 1.5)]
  assert [(e.step, e.value) for e in acc.Scalars("eval/swd")] == [(1, 12.5), (2, 10.0)]
  assert [e.value for e in acc.Scalars("agg/flagged/client_0")] == [1.0]
  (ev,) = acc.Images("samples")
  assert (ev.step, ev.width, ev.height) == (2, 26, 18)
  import io

  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(ev.encoded_image_string))), img)


def test_tensorboard_missing_is_a_noop(tmp_path, monkeypatch):
  from fedgan_jax.io import tensorboard as tb_mod

  for name in [m for m in sys.modules if m == "tensorboard" or m.startswith("tensorboard.")]:
    monkeypatch.delitem(sys.modules, name)
  monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard...` raises ImportError.
  monkeypatch.setattr(tb_mod, "_WARNED", False)
  warnings = []
  monkeypatch.setattr(tb_mod.logging, "warning", lambda msg, *a: warnings.append(msg % a))
  w = tb_mod.TensorBoardWriter(str(tmp_path / "tb"))
  w2 = tb_mod.TensorBoardWriter(str(tmp_path / "tb"))
  assert not w.enabled and not w2.enabled
  w.scalars(1, {"x": 1.0})
  w.image(1, "samples", np.zeros((4, 4, 3), np.uint8))
  w.flush()
  w.close()
  assert not (tmp_path / "tb").exists()
  assert len(warnings) == 1 and 'pip install -e ".[tensorboard]"' in warnings[0]


def test_one_sweep_table_for_results_and_comparison(tmp_path):
  """launch.sweep's results.csv rows and the report's comparison.csv come from one row builder."""
  from fedgan_jax.report import table
  from launch import sweep as sweep_lib

  run = tmp_path / "sw" / "a"
  os.makedirs(run)
  summary = make_run(str(run), malicious=(0, 2), flag_from=3)
  del summary["detect_tpr_mean"]  # A summary without the mean: it is read off metrics.jsonl.
  (run / "summary.json").write_text(json.dumps(summary))
  with open(run / "metrics.jsonl") as f:
    expected = np.mean([r["eval/detect_tpr"] for r in map(json.loads, f) if r["eval/detect_tpr"] is not None])
  row = sweep_lib.result_row("a", {"seed": 0}, summary, run_dir=str(run))
  assert row["status"] == "done" and row["detect_tpr_mean"] == pytest.approx(expected)
  assert table.earliest_flag(row) == 3 and table.flag_text(row) == "client 0: 3; client 2: 3"
  report.write_sweep_report(str(tmp_path / "sw"))
  with open(tmp_path / "sw" / "report" / "comparison.csv") as f:
    (comp,) = list(csv.DictReader(f))
  assert comp["run"] == "a" and float(comp["detect_tpr_mean"]) == pytest.approx(expected)
  assert comp["first_flag_round"] == "3" and comp["first_flag_rounds"] == "client 0: 3; client 2: 3"
  assert float(comp["eval/swd"]) == row["eval/swd"]
