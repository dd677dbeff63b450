"""Scale-out: client mesh and sharding, multi-host launch, replicas of one config."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, tiny_config
from fedgan_jax import assemble, distributed, experiment
from fedgan_jax.federated import replicas, sharding, upload_attacks
from fedgan_jax.federated.state import RoundData
from fedgan_jax.io import rundir


def _assert_trees_close(a, b, rtol=1e-4, atol=1e-5):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- mesh


def test_client_mesh_is_none_on_one_device():
  assert sharding.client_mesh(4, devices=jax.devices()[:1]) is None


def test_client_mesh_requires_divisible_num_clients():
  fake = jax.devices()[:1] * 3  # Only the count matters for the check.
  with pytest.raises(ValueError, match=r"num_clients=4 must be a positive multiple of the device count \(3\)"):
    sharding.client_mesh(4, devices=fake)


def test_shard_round_inputs_without_mesh_is_identity():
  state, data = object(), object()
  assert sharding.shard_round_inputs(state, data, None) == (state, data)


# --------------------------------------------------------------------------- multi-host


_LAUNCH_VARS = (
  "JAX_COORDINATOR_ADDRESS",
  "COORDINATOR_ADDRESS",
  "JAX_NUM_PROCESSES",
  "NUM_PROCESSES",
  "JAX_PROCESS_ID",
  "PROCESS_ID",
  "SLURM_JOB_ID",
  "SLURM_NTASKS",
  "OMPI_MCA_orte_hnp_uri",
  "OMPI_COMM_WORLD_SIZE",
  "TPU_WORKER_HOSTNAMES",
  "TPU_PROCESS_ADDRESSES",
  "MEGASCALE_COORDINATOR_ADDRESS",
  "FEDGAN_DISTRIBUTED",
)


@pytest.fixture
def clean_env(monkeypatch):
  for v in _LAUNCH_VARS:
    monkeypatch.delenv(v, raising=False)
  return monkeypatch


def test_distributed_env_detection(clean_env):
  assert distributed.distributed_env() is None
  assert distributed.maybe_initialize_distributed() is False
  clean_env.setenv("SLURM_JOB_ID", "7")
  clean_env.setenv("SLURM_NTASKS", "1")  # A one-task SLURM job is a single process.
  assert distributed.distributed_env() is None
  clean_env.setenv("SLURM_NTASKS", "4")
  assert distributed.distributed_env() == "slurm"
  clean_env.setenv("TPU_WORKER_HOSTNAMES", "a,b")
  clean_env.delenv("SLURM_JOB_ID")
  assert distributed.distributed_env() == "tpu"
  clean_env.setenv("COORDINATOR_ADDRESS", "10.0.0.1:1234")
  assert distributed.distributed_env() == "explicit"


def test_explicit_launch_needs_all_variables(clean_env):
  clean_env.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES and JAX_PROCESS_ID"):
    distributed.maybe_initialize_distributed()
  clean_env.setenv("JAX_NUM_PROCESSES", "two")
  clean_env.setenv("JAX_PROCESS_ID", "0")
  with pytest.raises(ValueError, match="must be integers"):
    distributed.maybe_initialize_distributed()


def test_is_primary_in_a_single_process():
  assert distributed.is_primary()


# --------------------------------------------------------------------------- replicas


def test_replica_seeds_and_keys_match_experiment_run():
  assert replicas.replica_seeds(5, 3) == [5, 6, 7]
  with pytest.raises(ValueError, match="num_replicas=0"):
    replicas.replica_seeds(0, 0)
  k_init, k_rounds, k_eval = replicas.replica_keys(3, 2)
  for k in range(2):
    expected = jax.random.split(jax.random.key(3 + k), 3)  # As experiment.run derives them.
    for got, want in zip((k_init[k], k_rounds[k], k_eval[k]), expected):
      np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(want))


def test_stack_replicas_pads_client_shards():
  def data(n):
    fields = dict(
      images=jnp.ones((2, n, 4, 4, 3), jnp.uint8),
      counts=jnp.asarray([n, n - 1], jnp.int32),
      is_malicious=jnp.asarray([True, False]),
      poison_flags=jnp.ones((2, n), bool),
      trigger=jnp.zeros((2, 2, 3)),
      trigger_loc=jnp.asarray([1, 1], jnp.int32),
      mimic=jnp.asarray(False),
      upload=upload_attacks.from_config(tiny_config()),
      trigger_part=jnp.ones((2, 2, 2), bool),
    )
    return RoundData(**fields)

  stacked = replicas.stack_replicas([data(3), data(5)])
  assert stacked.images.shape == (2, 2, 5, 4, 4, 3)
  assert stacked.poison_flags.shape == (2, 2, 5)
  assert not bool(stacked.poison_flags[0, :, 3:].any())  # Padding is never poisoned.
  np.testing.assert_array_equal(stacked.counts, [[3, 2], [5, 4]])
  bad = data(3)._replace(images=jnp.ones((3, 3, 4, 4, 3), jnp.uint8))
  with pytest.raises(ValueError, match="replica 1"):
    replicas.stack_replicas([data(3), bad])


@pytest.fixture(scope="module")
def single_program():
  """(config, program, jitted round) of the tiny 2-client config (shared with test_precision)."""
  config = tiny_config()
  program, _, _ = assemble.build_program(config)
  return config, program, jax.jit(program.round)


@pytest.mark.slow
def test_replica_k_equals_the_run_with_seed_plus_k(single_program):
  config, program, round_jit = single_program
  K = 2
  data = replicas.stack_replicas([assemble.setup_data(tiny_config(seed=config.seed + k))[0] for k in range(K)])
  k_init, k_rounds, _ = replicas.replica_keys(config.seed, K)
  rep = replicas.replicate(program)
  states = jax.jit(rep.init)(k_init)
  new_states, metrics = sharding.jit_round(program, states, data, None, replicas=True, donate=False)(
    states, data, replicas.round_keys(k_rounds, 1)
  )
  for k in range(K):
    c = tiny_config(seed=config.seed + k)
    d, _, _ = assemble.setup_data(c)
    k_i, k_r, _ = replicas.run_keys(c.seed)
    s, m = round_jit(program.init(k_i), d, jax.random.fold_in(k_r, 1))
    _assert_trees_close(replicas.unstack(new_states, k), s)
    _assert_trees_close(replicas.unstack(metrics, k), m)
  # Different seeds really differ (data, init and keys).
  kernels = np.asarray(new_states.g_global["params"]["out"]["kernel"])
  assert not np.allclose(kernels[0], kernels[1])


# --------------------------------------------------------------------------- 8 devices (subprocess)

_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, {tests!r})
    import jax, numpy as np
    from conftest import tiny_config
    from fedgan_jax import assemble
    from fedgan_jax.federated import sharding
    assert jax.device_count() == 8, jax.devices()
    shard_map = {shard_map!r}
    config = tiny_config(**{{"num_clients": 8, "data.num_images": 128, "train.local_steps": 1, **{extra!r}}})
    program, _, _ = assemble.build_program(config)
    data, _, _ = assemble.setup_data(config)
    state = program.init(jax.random.key(0))
    key = jax.random.key(1)
    ref_state, ref_metrics = jax.jit(program.round)(state, data, key)
    mesh = sharding.client_mesh(config.num_clients)
    s, d = sharding.shard_round_inputs(state, data, mesh)
    assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(s.clients))
    new_state, metrics = sharding.jit_round(program, s, d, mesh, donate=False, local_shard_map=shard_map)(s, d, key)
    assert new_state.clients.d_vars["params"]["in"]["kernel"].sharding.spec[0] == "clients"
    for a, b in zip(jax.tree.leaves((ref_state, ref_metrics)), jax.tree.leaves((new_state, metrics))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    print("OK", int(new_state.round))
""")


def _run_8_devices(shard_map: bool, **extra) -> str:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  script = _SCRIPT.format(tests=os.path.join(ROOT, "tests"), shard_map=shard_map, extra=extra)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.slow
def test_sharded_round_on_8_devices_equals_single_device():
  """Local training under shard_map (one client per device) + aggregation = the 1-device round."""
  assert "OK 1" in _run_8_devices(shard_map=True)


@pytest.mark.slow
def test_sampled_round_on_8_devices_equals_single_device():
  """8 of 16 clients a round (config.clients_per_round): gathered from their devices, trained one per device."""
  assert "OK 1" in _run_8_devices(shard_map=True, num_clients=16, clients_per_round=8)


@pytest.mark.slow
def test_gspmd_round_on_8_devices_equals_single_device():
  """The fallback (whole round left to XLA's partitioner) is correct too, only slow to compile."""
  assert "OK 1" in _run_8_devices(shard_map=False)


@pytest.mark.slow
def test_replicas_write_each_seed_like_a_single_run(tmp_path):
  """num_replicas=2 writes seed_<s>/ whose metrics equal experiment.run with that seed."""
  config = tiny_config(num_rounds=1, num_replicas=2)
  summaries = experiment.run(config, str(tmp_path / "group"))["replicas"]
  assert len(summaries) == 2 and all(s["rounds"] == 1 for s in summaries)
  for k in range(2):
    d = tmp_path / "group" / f"seed_{config.seed + k}"
    assert (d / "summary.json").exists() and (d / "config.json").exists()
    single = experiment.run(tiny_config(num_rounds=1, seed=config.seed + k), str(tmp_path / f"single{k}"))
    got = rundir.read_records(str(d / "metrics.jsonl"))[-1]
    want = rundir.read_records(str(tmp_path / f"single{k}" / "metrics.jsonl"))[-1]
    for key in ("train/g_loss", "train/d_loss", "agg/weights"):
      np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert single["rounds"] == 1
  # Rerunning resumes (nothing left to train) and keeps the results.
  again = experiment.run(config, str(tmp_path / "group"))["replicas"]
  assert [s["rounds"] for s in again] == [1, 1]


# --------------------------------------------------------------------------- two processes


def _free_port() -> int:
  import socket

  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
  """A real multi-process launch on this machine: 2 processes (one CPU device each, Gloo
  collectives) found by the explicit environment variables, clients sharded across them,
  only process 0 writing; the result equals the one-process run of the same command."""
  import json

  cmd = [sys.executable, "-m", "fedgan_jax.main", "--config", "configs/test.py", "--config.num_rounds=1"]
  base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  base["JAX_PLATFORMS"] = "cpu"
  port = _free_port()
  procs = [
    subprocess.Popen(
      cmd + ["--workdir", str(tmp_path / "mp")],
      cwd=ROOT,
      text=True,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      env=dict(base, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
    )
    for i in range(2)
  ]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i}:\n{log[-3000:]}"
    assert "devices: [CpuDevice(id=0), CpuDevice(id=" in log, log[-2000:]  # Both processes' devices.
  single = subprocess.run(
    cmd + ["--workdir", str(tmp_path / "single")], cwd=ROOT, env=base, text=True, capture_output=True, timeout=600
  )
  assert single.returncode == 0, single.stderr[-3000:]
  lines = (tmp_path / "mp" / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 1  # Written once (by process 0), not once per process.
  got, want = json.loads(lines[0]), json.loads((tmp_path / "single" / "metrics.jsonl").read_text())
  assert set(got) == set(want)
  for k in want:
    if not k.startswith("z/"):  # Timings.
      np.testing.assert_allclose(np.asarray(got[k], float), np.asarray(want[k], float), rtol=1e-4, atol=1e-5, err_msg=k)
  samples = sorted(p.name for p in (tmp_path / "single" / "samples").iterdir())
  assert samples and samples == sorted(p.name for p in (tmp_path / "mp" / "samples").iterdir())
  for name in samples:
    assert (tmp_path / "mp" / "samples" / name).read_bytes() == (tmp_path / "single" / "samples" / name).read_bytes()
