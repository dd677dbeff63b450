"""Throughput benchmark of one federated round: the vmapped round vs a per-client loop.

    python -m fedgan_jax.bench --clients 16 --resolution 32 --batch 16 --local-steps 5 \\
        --rounds 5 --mode both

Times full rounds (local training of every client + the server's
aggregation) after compilation and warm-up rounds, on RANDOM client data
that is device-resident before timing starts: input cost (decoding,
host-to-device copies) is excluded, as in the PyTorch script of the original
sequential design it is compared with (``launch.device_check --peer``). Batches are still drawn by index
inside the jitted step, as in a real run.

Modes:

* ``vmap``: the project's design, one jitted call per round (``program.round``,
  clients vmapped in chunks of ``--client-chunk``: 0 = the config's auto, i.e.
  1 on CPU and all clients elsewhere; see ``round.client_chunk``),
  client-sharded over the devices when there are several
  (``fedgan_jax.federated.sharding``).
* ``loop``: the original code's sequential design: the jitted SINGLE-client
  step (``program.local_train``) called in a Python loop over clients, each
  client keeping its own state, then the jitted aggregation.
* ``both``: both compiled, then their timed rounds alternate (so drifting
  load hits both alike); the JSON adds ``loop`` and ``vmap_speedup``
  (loop sec/round over vmap sec/round).

Progress goes to stderr as it happens (compiling, compiled in N s, each
timed round); stdout gets exactly one line, the JSON object (see
``_result``). FLOPs are counted from the round's operations
(``fedgan_jax.flops``: the model's arithmetic, the same number whatever the
lowering or backend), and ``hlo_ops`` counts the convolutions, grouped
convolutions, lhs-dilated (transposed) convolutions and ``dot_general``s of
the lowered program, so the record says which lowering ran. Model widths
default to the PyTorch peer's (ngf = ndf = 64, nz = 100), so the two are
comparable at equal ``--resolution/--clients/--batch/--local-steps``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedgan_jax import assemble, config_lib, distributed, hardware
from fedgan_jax import flops as flops_lib
from fedgan_jax.federated import client as client_lib
from fedgan_jax.federated import program as program_lib
from fedgan_jax.federated import sharding
from fedgan_jax.federated.state import LocalOut, RoundData, RoundState
from fedgan_jax.models import layers


def say(msg: str) -> None:
  """A progress line on stderr (stdout carries only the final JSON)."""
  print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_config(
  clients: int = 4,
  resolution: int = 32,
  batch: int = 32,
  local_steps: int = 5,
  precision: str = "f32",
  conv_impl: str = "auto",
  width: int = 64,
  latent_dim: int = 100,
  client_chunk: int = 0,
  overrides: dict[str, Any] | None = None,
):
  """A validated config for the benchmark (base config + these sizes).

  Args:
    clients: C (client 0 is malicious when C > 1, so the poisoning path is timed).
    resolution: R.
    batch: B per client step.
    local_steps: L.
    precision: ``train.precision``.
    conv_impl: ``model.conv_impl``.
    width: ``model.g_width`` and ``model.d_width`` (the peer's ngf = ndf).
    latent_dim: ``model.latent_dim`` (nz).
    client_chunk: ``train.client_chunk`` (0 = auto).
    overrides: further ``{'section.field': value}`` overrides.

  Returns:
    The config (``config_lib.validate``-d; a bad value raises ``ValueError``).
  """
  c = config_lib.base_config()
  c.num_clients = clients
  c.resolution = resolution
  c.train.batch_size = batch
  c.train.local_steps = local_steps
  c.train.precision = precision
  c.model.conv_impl = conv_impl
  c.model.g_width = width
  c.model.d_width = width
  c.model.latent_dim = latent_dim
  c.attack.malicious = (0,) if clients > 1 else ()
  c.train.client_chunk = client_chunk
  for dotted, value in (overrides or {}).items():
    config_lib.parse_override(c, dotted, value if isinstance(value, str) else repr(value))
  return config_lib.validate(c)


def random_data(config, images_per_client: int | None = None, seed: int = 0) -> RoundData:
  """Device-resident random ``RoundData`` (uint8 noise images) for ``config``."""
  C, R, ch = config.num_clients, config.resolution, config.data.channels
  n = images_per_client or max(2 * config.train.batch_size, 64)
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (C, n, R, R, ch), dtype=np.uint8)
  root = rng.integers(0, 256, (assemble.root_size(config), R, R, ch), dtype=np.uint8)  # fltrust's root set.
  return assemble.round_data(config, images, np.full((C,), n), root=root)


def round_flops(config, state: RoundState, data: RoundData, key: jax.Array) -> flops_lib.FlopCount:
  """The FLOPs of one round of ``config``: the model's arithmetic, whatever the lowering.

  Counted from the operations of the round traced with stock convolutions
  (``conv_impl='xla'``: a transposed conv counts its useful multiply-adds, not
  the zeros of its dilated input, nor the padding an im2col would multiply);
  the local-step scan and client chunks are followed, so this is the whole
  round's work on every backend (``fedgan_jax.flops``).
  """
  c = copy.deepcopy(config)
  c.model.conv_impl = "xla"
  program, _, _ = assemble.build_program(c, assemble.local_steps(c, data.counts))
  return flops_lib.count(program.round, state, data, key)


def _time_rounds(steps: dict[str, Callable[[int], Any]], warmup: int, rounds: int) -> dict[str, list[float]]:
  """Wall time of ``rounds`` rounds of each step, after ``warmup`` untimed ones.

  With several steps the timed rounds alternate between them (round r of
  every step, then round r + 1, ...), so drifting load on a shared machine
  hits every design alike and their ratio stays meaningful.
  """
  for r in range(warmup):
    for name, step in steps.items():
      t0 = time.perf_counter()
      jax.block_until_ready(step(r))
      say(f"{name}: warm-up round {r + 1} of {warmup}: {time.perf_counter() - t0:.3f} s")
  times: dict[str, list[float]] = {name: [] for name in steps}
  for r in range(warmup, warmup + rounds):
    for name, step in steps.items():
      t0 = time.perf_counter()
      jax.block_until_ready(step(r))
      times[name].append(time.perf_counter() - t0)
      say(f"{name}: round {r - warmup + 1} of {rounds}: {times[name][-1]:.3f} s")
  return times


def prepare_vmap(config, shard: bool = True) -> dict[str, Any]:
  """Compiles ``program.round`` (clients vmapped; sharded over devices if several).

  Returns:
    ``{'compile_sec', 'flops', 'hlo_ops', 'sharded', 'step'}``;
    ``step(r)`` runs round ``r`` and returns its metrics.
  """
  data = random_data(config)
  program, _, _ = assemble.build_program(config, assemble.local_steps(config, data.counts))
  state = program.init(jax.random.key(0))
  key = jax.random.key(1)
  flops = round_flops(config, state, data, key)
  mesh = sharding.client_mesh(config.num_clients) if shard else None
  state, data = sharding.shard_round_inputs(state, data, mesh)
  round_jit = sharding.jit_round(program, state, data, mesh)
  say(
    f"vmap: compiling the round ({config.num_clients} clients, conv_impl={config.model.conv_impl}, "
    f"{config.train.precision})..."
  )
  t0 = time.perf_counter()
  lowered = round_jit.lower(state, data, key)
  compiled = lowered.compile()
  compile_sec = time.perf_counter() - t0
  say(f"vmap: compiled in {compile_sec:.1f} s")
  box = {"state": state}

  def step(r):
    box["state"], m = compiled(box["state"], data, jax.random.fold_in(key, r))
    return m

  return {
    "compile_sec": compile_sec,
    "flops": flops,
    "hlo_ops": flops_lib.hlo_op_counts(lowered),
    "sharded": mesh is not None,
    "step": step,
  }


def prepare_loop(config) -> dict[str, Any]:
  """Compiles the sequential design: jitted single-client step in a Python loop, then aggregation.

  Every client keeps its own state (a list, as the original code keeps one
  model and optimizer per client); the server stacks the uploads inside its
  jitted aggregation.

  Returns:
    ``{'compile_sec', 'flops', 'hlo_ops', 'step'}`` (as ``prepare_vmap``; ``hlo_ops``
    of the one-client step).
  """
  C = config.num_clients
  data = random_data(config)
  program, _, _ = assemble.build_program(config, assemble.local_steps(config, data.counts))
  state = program.init(jax.random.key(0))
  key = jax.random.key(1)
  clients = [jax.tree.map(lambda x: x[c], state.clients) for c in range(C)]
  shards = [
    tuple(jax.tree.map(lambda x: x[c], (data.images, data.counts, data.is_malicious, data.poison_flags)))
    for c in range(C)
  ]

  def server_step(state, outs, data, key):
    local = LocalOut(*jax.tree.map(lambda *xs: jnp.stack(xs), *outs))
    new, m = program.finish_round(state, data, local, key)
    return new._replace(clients=()), m  # Client states stay with the clients (the loop).

  def keys_fn(key):
    return tuple(program_lib.client_keys(key, C))

  local_jit = jax.jit(program.local_train)
  server_jit = jax.jit(server_step)
  keys_jit = jax.jit(keys_fn)
  globals_state = state._replace(clients=())
  flops = round_flops(config, state, data, key)
  say(
    f"loop: compiling the one-client step and the aggregation (conv_impl={config.model.conv_impl}, "
    f"{config.train.precision})..."
  )
  t0 = time.perf_counter()
  ex_keys = keys_jit(key)
  local_lowered = local_jit.lower(
    clients[0], state.g_global, state.d_global, *shards[0], data.trigger, data.trigger_loc, ex_keys[0]
  )
  local_c = local_lowered.compile()
  ex_out = local_c(clients[0], state.g_global, state.d_global, *shards[0], data.trigger, data.trigger_loc, ex_keys[0])
  server_c = server_jit.lower(globals_state, [ex_out] * C, data, key).compile()
  compile_sec = time.perf_counter() - t0
  say(f"loop: compiled in {compile_sec:.1f} s")
  box = {"g": globals_state, "clients": clients}

  def step(r):
    k = jax.random.fold_in(key, r)
    ks = keys_jit(k)
    g = box["g"]
    outs = [
      local_c(box["clients"][c], g.g_global, g.d_global, *shards[c], data.trigger, data.trigger_loc, ks[c])
      for c in range(C)
    ]
    box["clients"] = [o[0] for o in outs]
    box["g"], m = server_c(g, outs, data, k)
    return box["g"], m

  return {"compile_sec": compile_sec, "flops": flops, "hlo_ops": flops_lib.hlo_op_counts(local_lowered), "step": step}


def _result(mode: str, config, timing: dict[str, Any], rounds: int) -> dict[str, Any]:
  C, B, L = config.num_clients, config.train.batch_size, config.train.local_steps
  spr = statistics.median(timing["round_times"])
  images_per_round = C * L * B * (2 + config.train.gen_steps)  # D: B real + B fake; G: B fake per G step.
  fc: flops_lib.FlopCount = timing["flops"]
  achieved = fc.total / spr / 1e12
  return {
    "mode": mode,
    "clients": C,
    "resolution": config.resolution,
    "batch": B,
    "local_steps": L,
    "gen_steps": config.train.gen_steps,
    "width": config.model.g_width,
    "latent_dim": config.model.latent_dim,
    "precision": config.train.precision,
    "conv_impl": config.model.conv_impl,
    "conv_impl_resolved": layers.resolve_impl(config.model.conv_impl),
    "unroll": str(config.train.unroll),
    "scan_unrolled": client_lib.scan_unroll(config) is True,
    "client_chunk": config.train.client_chunk,
    "client_chunk_resolved": (
      program_lib.client_chunk(config, _clients_per_program(config, timing)) if mode == "vmap" else None
    ),
    "device": hardware.device_info(),
    "sharded": timing.get("sharded", False),
    "compile_sec": round(timing["compile_sec"], 3),
    "rounds": rounds,
    "round_times": [round(t, 5) for t in timing["round_times"]],
    "sec_per_round": round(spr, 5),
    "client_steps_per_sec": round(C * L / spr, 3),
    "images_per_sec": round(images_per_round / spr, 1),
    "real_images_per_sec": round(C * L * B / spr, 1),
    "flops_per_round": fc.total,
    "flops_breakdown": {k: v for k, v in fc._asdict().items()},
    "flops_source": "counted from the round's operations (fedgan_jax.flops; model arithmetic, any lowering)",
    "achieved_tflops": round(achieved, 5),
    **hardware.peak_fields(config.train.precision, achieved),
    "hlo_ops": timing["hlo_ops"],
    "jax": jax.__version__,
    "python": platform.python_version(),
    "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
  }


def _clients_per_program(config, timing: dict[str, Any]) -> int:
  """Clients one program's ``local_round`` sees: all of them, or a device's share when sharded."""
  if timing.get("sharded"):
    return config.num_clients // len(jax.devices())
  return config.num_clients


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Runs the benchmark described by parsed ``args``; returns the final JSON object."""
  overrides = {}
  if args.unroll != "auto":
    overrides["train.unroll"] = args.unroll
  if args.avg_disc:
    overrides["aggregation.average_discriminator"] = True
  config = make_config(
    args.clients,
    args.resolution,
    args.batch,
    args.local_steps,
    args.precision,
    args.conv_impl,
    args.width,
    args.latent_dim,
    args.client_chunk,
    overrides,
  )
  modes = ("vmap", "loop") if args.mode == "both" else (args.mode,)
  preps = {m: prepare_vmap(config, shard=not args.no_shard) if m == "vmap" else prepare_loop(config) for m in modes}
  times = _time_rounds({m: p["step"] for m, p in preps.items()}, args.warmup, args.rounds)
  results = {m: _result(m, config, {**preps[m], "round_times": times[m]}, args.rounds) for m in modes}
  for m, r in results.items():
    say(
      f"{m}: {r['sec_per_round']:.4f} s/round, {r['achieved_tflops']:.3f} TFLOP/s"
      + (f" ({100 * r['fraction_of_peak']:.1f} % of {r['peak_basis']})" if r["fraction_of_peak"] else "")
      + f", compiled in {r['compile_sec']:.1f} s"
    )
  if args.mode != "both":
    return results[args.mode]
  out = dict(results["vmap"], mode="both", loop=results["loop"])
  out["vmap_speedup"] = round(results["loop"]["sec_per_round"] / results["vmap"]["sec_per_round"], 3)
  return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The command line (see the module docstring)."""
  base = config_lib.base_config()
  p = argparse.ArgumentParser(
    prog="python -m fedgan_jax.bench",
    description=__doc__.split("\n")[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument("--clients", type=int, default=4, help="C: clients trained per round (client 0 malicious)")
  p.add_argument("--resolution", type=int, default=32, help="R: image side in px (32, 64, 128, 256)")
  p.add_argument("--batch", type=int, default=32, help="B: images per client step")
  p.add_argument("--local-steps", type=int, default=5, help="L: local (D, G) steps per client per round")
  p.add_argument("--rounds", type=int, default=5, help="timed rounds (the median is reported)")
  p.add_argument("--warmup", type=int, default=1, help="untimed rounds after compilation")
  p.add_argument(
    "--mode",
    choices=("vmap", "loop", "both"),
    default="vmap",
    help="vmap: the project's round; loop: the one-client step looped from Python; both: alternated",
  )
  p.add_argument(
    "--precision", choices=("f32", "bf16"), default="f32", help="train.precision (bf16: bf16 compute, f32 parameters)"
  )
  p.add_argument(
    "--conv-impl",
    choices=("auto", *layers.IMPLS),
    default="auto",
    help="model.conv_impl (auto: "
    + ", ".join(f"{b} {i}" for b, i in layers.AUTO_IMPL.items() if b in ("cpu", "gpu", "tpu"))
    + ")",
  )
  p.add_argument(
    "--width",
    type=int,
    default=base.model.g_width,
    help="model.g_width = model.d_width (the model's default; the PyTorch peer's ngf = ndf is 64)",
  )
  p.add_argument("--latent-dim", type=int, default=base.model.latent_dim, help="model.latent_dim (nz)")
  p.add_argument(
    "--unroll",
    choices=("auto", "true", "false"),
    default="auto",
    help="train.unroll (auto: unrolled on CPU, rolled elsewhere)",
  )
  p.add_argument(
    "--client-chunk",
    type=int,
    default=0,
    help="train.client_chunk: clients vmapped together (0 = auto: 1 on CPU, all elsewhere)",
  )
  p.add_argument("--avg-disc", action="store_true", help="also average discriminators")
  p.add_argument("--no-shard", action="store_true", help="do not shard clients over several devices")
  args = p.parse_args(argv)
  for name in ("clients", "resolution", "batch", "local_steps", "rounds", "width", "latent_dim"):
    if getattr(args, name) <= 0:
      p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be a positive integer")
  if args.warmup < 0:
    p.error(f"--warmup={args.warmup} must be >= 0")
  if args.client_chunk < 0:
    p.error(f"--client-chunk={args.client_chunk} must be >= 0 (0 = auto)")
  return args


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  distributed.maybe_initialize_distributed()
  try:
    out = run(args)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if distributed.is_primary():
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
