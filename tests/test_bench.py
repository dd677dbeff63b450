"""fedgan_jax.bench: arguments, configs, random data, the JSON record; one tiny end-to-end run (slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from fedgan_jax import bench, config_lib, flops, hardware
from fedgan_jax.federated.state import RoundData


def test_parse_args_defaults_and_errors(capsys):
  a = bench.parse_args([])
  base = config_lib.base_config()
  assert (a.clients, a.resolution, a.batch, a.local_steps, a.mode, a.latent_dim) == (4, 32, 32, 5, "vmap", 100)
  assert a.width == base.model.g_width == base.model.d_width  # The model's default width.
  assert bench.parse_args(["--conv-impl", "gemm"]).conv_impl == "gemm"
  with pytest.raises(SystemExit):
    bench.parse_args(["--clients", "0"])
  assert "--clients=0 must be a positive integer" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    bench.parse_args(["--mode", "pmap"])


def test_help_documents_every_option():
  proc = subprocess.run(
    [sys.executable, "-m", "fedgan_jax.bench", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
  )
  assert proc.returncode == 0
  for option in (
    "--clients",
    "--resolution",
    "--batch",
    "--local-steps",
    "--rounds",
    "--warmup",
    "--mode",
    "--precision",
    "--conv-impl",
    "--width",
    "--latent-dim",
    "--unroll",
    "--client-chunk",
    "--avg-disc",
    "--no-shard",
  ):
    block = proc.stdout.split("options:", 1)[1].split("\n  " + option, 1)[1].split("\n  --", 1)[0]
    assert "(default:" in block, (option, block)


def test_make_config_matches_the_peer_and_validates():
  c = bench.make_config(clients=3, resolution=64, batch=8, local_steps=2, precision="bf16", conv_impl="xla")
  assert (c.num_clients, c.resolution, c.train.batch_size, c.train.local_steps) == (3, 64, 8, 2)
  assert (c.model.g_width, c.model.d_width, c.model.latent_dim) == (64, 64, 100)  # The peer's ngf, ndf, nz.
  assert c.train.precision == "bf16" and c.model.conv_impl == "xla" and tuple(c.attack.malicious) == (0,)
  assert tuple(bench.make_config(clients=1).attack.malicious) == ()
  with pytest.raises(ValueError, match="config.resolution=48"):
    bench.make_config(resolution=48)


def test_random_data_is_device_resident_round_data():
  c = bench.make_config(clients=2, batch=4)
  d = bench.random_data(c)
  assert isinstance(d, RoundData)
  assert d.images.shape == (2, 64, 32, 32, 3) and d.images.dtype == np.uint8
  np.testing.assert_array_equal(d.counts, [64, 64])
  np.testing.assert_array_equal(np.asarray(d.is_malicious), [True, False])
  assert bool(d.poison_flags[0].all()) and not bool(d.poison_flags[1].any())


def test_result_counts_images_through_d():
  c = bench.make_config(clients=4, batch=8, local_steps=5)
  timing = {
    "compile_sec": 1.0,
    "round_times": [2.0, 1.0, 3.0],
    "flops": flops.FlopCount(conv=3e12, elementwise=1e12),
    "hlo_ops": {"convolution": 0},
  }
  r = bench._result("vmap", c, timing, 3)
  assert r["sec_per_round"] == 2.0
  assert r["client_steps_per_sec"] == 10.0
  assert r["images_per_sec"] == 4 * 5 * 8 * 3 / 2.0  # B real + B fake (D step) + B fake (G step).
  assert r["real_images_per_sec"] == 4 * 5 * 8 / 2.0
  assert r["achieved_tflops"] == 2.0 and r["flops_per_round"] == 4e12
  assert r["flops_breakdown"]["conv"] == 3e12 and r["hlo_ops"] == {"convolution": 0}
  for key in (
    "mode",
    "clients",
    "resolution",
    "batch",
    "local_steps",
    "precision",
    "conv_impl",
    "device",
    "compile_sec",
    "flops_per_round",
    "jax",
    "date",
  ):
    assert key in r
  assert r["device"]["count"] >= 1 and r["device"]["kind"]


@pytest.mark.slow
def test_bench_both_modes_end_to_end():
  """A tiny vmap + loop benchmark in the gemm lowering: progress on stderr, exactly one JSON
  line on stdout, with the ratio, the counted FLOPs and the lowered program's op counts."""
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "fedgan_jax.bench",
      "--clients",
      "2",
      "--batch",
      "4",
      "--local-steps",
      "1",
      "--rounds",
      "2",
      "--warmup",
      "1",
      "--width",
      "8",
      "--latent-dim",
      "8",
      "--mode",
      "both",
      "--conv-impl",
      "gemm",
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1
  out = json.loads(lines[0])
  assert out["mode"] == "both" and out["loop"]["mode"] == "loop"
  assert out["vmap_speedup"] > 0 and out["sec_per_round"] > 0 and out["flops_per_round"] > 0
  # Both designs do the same work, counted the same way (fedgan_jax.flops).
  assert out["flops_per_round"] == out["loop"]["flops_per_round"]
  assert out["achieved_tflops"] == pytest.approx(out["flops_per_round"] / out["sec_per_round"] / 1e12, abs=1e-5)
  assert out["client_chunk_resolved"] == (1 if out["device"]["platform"] == "cpu" else 2)
  for ops in (out["hlo_ops"], out["loop"]["hlo_ops"]):
    assert ops["convolution"] == ops["grouped_convolution"] == ops["lhs_dilated_convolution"] == 0
    assert ops["dot_general"] > 0
  for says in (
    "vmap: compiling the round",
    "vmap: compiled in",
    "loop: compiled in",
    "vmap: round 2 of 2:",
    "loop: round 1 of 2:",
  ):
    assert says in proc.stderr, says


def test_peak_tflops_lookup():
  assert hardware.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == (989.4, "H100 SXM dense BF16")
  assert hardware.peak_tflops("NVIDIA H100 PCIe", "f32")[0] == 378.0
  assert hardware.peak_tflops("NVIDIA H200", "bf16")[0] == 989.4
  assert hardware.peak_tflops("NVIDIA A100-SXM4-40GB", "f32")[0] == 156.0
  assert hardware.peak_tflops("TPU v5 lite", "bf16")[0] == 197.0
  assert hardware.peak_tflops("cpu", "f32") == (None, None)
