"""Scale-out with JAX itself (DESIGN §2): client sharding, multi-host, replicas.

Three independent pieces:

* **Client sharding.** ``client_mesh(C)`` is a 1-D mesh named ``'clients'``
  over every device; ``shard_round_inputs`` places each leaf that carries the
  client axis (``RoundState.clients`` and ``RoundData.images / counts /
  is_malicious / poison_flags``) sharded over it and replicates the rest
  (global models, aggregator states, trigger); ``jit_round`` jits the round
  with those shardings, local training under ``jax.shard_map`` (each device
  trains its own clients, no communication) and the aggregation left to
  XLA's partitioner (all-reduce / all-to-all over parameter slices). Leaving
  the whole round to the partitioner is correct but moves activations
  between devices for every conv (measured in docs/benchmarks.md), so it is
  only an option (``jit_round(..., local_shard_map=False)``).
  ``num_clients`` must be a multiple of the device count (required: an
  uneven client axis would need padding clients, which every aggregation
  rule would then have to mask out).
* **Multi-host.** ``maybe_initialize_distributed()`` calls
  ``jax.distributed.initialize()`` when the environment says this process is
  one of several (see its docstring for the variables), and ``is_primary()``
  says whether this process writes outputs (process 0).
* **Replicas.** ``replicate(program)`` vmaps ``init`` and ``round`` over a
  leading replica axis K, so K independent seeds of one config run as one
  program: replica ``k`` is exactly the run with ``seed + k``
  (``replica_keys``, ``setup_replica_data``); ``run_replicas`` trains them
  and writes one workdir per seed.

Launch commands and measured behaviour are in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedgan_jax.train import round as round_lib

PyTree = Any
CLIENT_AXIS = "clients"
_CLIENT_DATA_FIELDS = ("images", "counts", "is_malicious", "poison_flags")


# --------------------------------------------------------------------------- client sharding


def client_mesh(num_clients: int, devices: Sequence[jax.Device] | None = None) -> Mesh | None:
  """A 1-D mesh (axis ``'clients'``) over all devices, or ``None`` with one device.

  Args:
    num_clients: the run's ``num_clients`` (C); must be a multiple of the
      device count so every device holds the same number of clients.
    devices: the devices to use (default: ``jax.devices()``, every device of
      every process).

  Returns:
    The mesh, or ``None`` when there is a single device (nothing to shard).

  Raises:
    ValueError: if ``num_clients`` is not a positive multiple of the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if n <= 1:
    return None
  if num_clients <= 0 or num_clients % n:
    raise ValueError(
        f"num_clients={num_clients} must be a positive multiple of the device count ({n}) to "
        f"shard clients over devices; use num_clients in {{{n}, {2 * n}, {3 * n}, ...}} or "
        f"limit the devices (e.g. CUDA_VISIBLE_DEVICES).")
  return Mesh(np.asarray(devices), (CLIENT_AXIS,))


def _spec(client_axis: bool, replicas: bool) -> P:
  lead = (None,) if replicas else ()
  return P(*lead, CLIENT_AXIS) if client_axis else P()


def round_shardings(state: round_lib.RoundState, data: round_lib.RoundData, mesh: Mesh,
                    replicas: bool = False) -> tuple[PyTree, PyTree]:
  """``NamedSharding`` trees for ``(state, data)`` (same structure as the inputs).

  Args:
    state: a ``RoundState`` (arrays or ``jax.ShapeDtypeStruct``s).
    data: a ``RoundData``.
    mesh: a mesh with a ``'clients'`` axis.
    replicas: the inputs carry a leading replica axis (``replicate``); the
      client axis is then the second one and the replica axis is not sharded.

  Returns:
    ``(state_shardings, data_shardings)``.
  """
  sharded = NamedSharding(mesh, _spec(True, replicas))
  replicated = NamedSharding(mesh, P())
  rep = lambda t: jax.tree.map(lambda _: replicated, t)
  state_sh = round_lib.RoundState(
      round=rep(state.round), g_global=rep(state.g_global), d_global=rep(state.d_global),
      g_agg=rep(state.g_agg), d_agg=rep(state.d_agg),
      clients=jax.tree.map(lambda _: sharded, state.clients))
  data_sh = round_lib.RoundData(**{
      f: (jax.tree.map(lambda _: sharded, getattr(data, f)) if f in _CLIENT_DATA_FIELDS
          else rep(getattr(data, f)))
      for f in round_lib.RoundData._fields})
  return state_sh, data_sh


def _put(x, sharding: NamedSharding):
  """Places ``x`` with ``sharding``; works when the mesh spans several processes."""
  is_key = hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
  if sharding.is_fully_addressable or is_key:
    return jax.device_put(x, sharding)
  # Multi-host: every process holds the same full value (the data and init are
  # deterministic from the seed); each keeps the slices its own devices hold.
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_round_inputs(state: round_lib.RoundState, data: round_lib.RoundData, mesh: Mesh | None,
                       replicas: bool = False) -> tuple[round_lib.RoundState, round_lib.RoundData]:
  """Places the round inputs on ``mesh``: client-axis leaves sharded, the rest replicated.

  Args:
    state: the run's ``RoundState`` (client leaves ``[C, ...]``).
    data: the run's ``RoundData``.
    mesh: from ``client_mesh``; ``None`` returns the inputs unchanged.
    replicas: inputs carry a leading replica axis (see ``round_shardings``).

  Returns:
    ``(state, data)`` as sharded ``jax.Array``s.
  """
  if mesh is None:
    return state, data
  state_sh, data_sh = round_shardings(state, data, mesh, replicas)
  return jax.tree.map(_put, state, state_sh), jax.tree.map(_put, data, data_sh)


def _specs(tree: PyTree, client_axis: bool, replicas: bool) -> PyTree:
  return jax.tree.map(lambda _: _spec(client_axis, replicas), tree)


def sharded_round(program: round_lib.Program, mesh: Mesh) -> Callable:
  """``program.round`` with local training under ``jax.shard_map`` over the clients.

  Each device trains its ``C / devices`` clients (vmapped) with no
  communication; the server's aggregation then runs on the client-sharded
  uploads under ``jit``'s automatic partitioning (reductions over the client
  axis become all-reduces). The same keys as ``program.round``, so the result
  equals the single-device round.

  Args:
    program: from ``round_lib.build``.
    mesh: from ``client_mesh``.

  Returns:
    ``round(state, data, key) -> (state, metrics)``, not jitted (``jit_round`` does).
  """
  def round_fn(state, data, key):
    num_clients = data.counts.shape[0]
    keys = round_lib.client_keys(key, num_clients)
    state_specs = round_lib.RoundState(
        round=P(), g_global=_specs(state.g_global, False, False), d_global=_specs(state.d_global, False, False),
        g_agg=_specs(state.g_agg, False, False), d_agg=_specs(state.d_agg, False, False),
        clients=_specs(state.clients, True, False))
    data_specs = round_lib.RoundData(**{
        f: _spec(f in _CLIENT_DATA_FIELDS, False) for f in round_lib.RoundData._fields})
    local = jax.shard_map(program.local_round, mesh=mesh, in_specs=(state_specs, data_specs, P(CLIENT_AXIS)),
                          out_specs=P(CLIENT_AXIS), check_vma=False)(state, data, keys)
    return program.server_round(state, data, local, key)

  return round_fn


def jit_round(program: round_lib.Program, state: round_lib.RoundState, data: round_lib.RoundData,
              mesh: Mesh | None, replicas: bool = False, donate: bool = True,
              local_shard_map: bool = True) -> Callable:
  """The jitted round of ``program``, client-sharded on ``mesh``.

  Args:
    program: from ``round_lib.build``.
    state: an example state (arrays or ``ShapeDtypeStruct``s) for the shardings.
    data: an example ``RoundData``.
    mesh: from ``client_mesh``; ``None`` gives a plain ``jax.jit(program.round)``.
    replicas: ``state``/``data`` carry a leading replica axis and the round
      is ``replicate(program).round`` (the replica axis is not sharded).
    donate: donate the state buffers (the caller must not reuse the old state).
    local_shard_map: run local training under ``shard_map`` (``sharded_round``).
      With False, the whole round is
      left to XLA's automatic partitioning, which on XLA:CPU gathers conv
      activations and weights to every device (docs/benchmarks.md).

  Returns:
    ``round(state, data, key) -> (state, metrics)``, jitted. The new state keeps
    the input shardings; metrics are replicated (small; every process reads them).
  """
  donate_argnums = (0,) if donate else ()
  if mesh is None:
    fn = replicate(program).round if replicas else program.round
    return jax.jit(fn, donate_argnums=donate_argnums)
  fn = sharded_round(program, mesh) if local_shard_map else program.round
  if replicas:
    fn = jax.vmap(fn)
  state_sh, data_sh = round_shardings(state, data, mesh, replicas)
  replicated = NamedSharding(mesh, P())
  return jax.jit(fn, in_shardings=(state_sh, data_sh, replicated),
                 out_shardings=(state_sh, replicated), donate_argnums=donate_argnums)


# --------------------------------------------------------------------------- multi-host

# Explicit launch: the same three variables on every host (process id differs).
_EXPLICIT = (("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS"),
             ("JAX_NUM_PROCESSES", "NUM_PROCESSES"),
             ("JAX_PROCESS_ID", "PROCESS_ID"))


def _env(names: Sequence[str]) -> str | None:
  for n in names:
    if os.environ.get(n):
      return os.environ[n]
  return None


def distributed_env() -> str | None:
  """Which multi-process launcher this process was started by, or ``None``.

  Returns:
    ``'explicit'`` (``JAX_COORDINATOR_ADDRESS``/``COORDINATOR_ADDRESS`` with
    ``JAX_NUM_PROCESSES``/``NUM_PROCESSES`` and ``JAX_PROCESS_ID``/``PROCESS_ID``),
    ``'slurm'`` (``SLURM_JOB_ID`` and ``SLURM_NTASKS`` > 1, e.g. ``srun``),
    ``'mpi'`` (Open MPI's ``mpirun``: ``OMPI_MCA_orte_hnp_uri`` and
    ``OMPI_COMM_WORLD_SIZE`` > 1), ``'tpu'`` (a multi-host Cloud TPU slice:
    ``TPU_WORKER_HOSTNAMES``/``TPU_PROCESS_ADDRESSES`` with several hosts, or
    ``MEGASCALE_COORDINATOR_ADDRESS``), or ``'forced'`` when
    ``FEDGAN_DISTRIBUTED=1`` asks JAX to auto-detect anything else (e.g. GKE
    or Kubernetes). ``None`` for a single process.
  """
  if _env(_EXPLICIT[0]):
    return "explicit"
  if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  if os.environ.get("OMPI_MCA_orte_hnp_uri") and int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "mpi"
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("TPU_PROCESS_ADDRESSES") or ""
  if len([h for h in hosts.split(",") if h]) > 1 or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  if os.environ.get("FEDGAN_DISTRIBUTED", "").lower() in ("1", "true"):
    return "forced"
  return None


def maybe_initialize_distributed() -> bool:
  """Calls ``jax.distributed.initialize()`` if this is one process of several.

  Call it first thing in ``main`` (before anything touches a device). With
  the explicit variables (see ``distributed_env``) the address, process count
  and id are passed on; on SLURM, Open MPI and TPU pods JAX detects them
  itself. Every process runs the same command; only ``is_primary()`` writes.

  Returns:
    True if the distributed runtime is (now) initialized.

  Raises:
    ValueError: the explicit variables are incomplete or not integers.
  """
  if jax.distributed.is_initialized():
    return True
  kind = distributed_env()
  if kind is None:
    return False
  if kind == "explicit":
    addr, num, pid = (_env(n) for n in _EXPLICIT)
    if num is None or pid is None:
      raise ValueError(
          f"JAX_COORDINATOR_ADDRESS={addr!r} is set, so JAX_NUM_PROCESSES and JAX_PROCESS_ID "
          f"(or NUM_PROCESSES / PROCESS_ID) must be set too; got {num!r} and {pid!r}.")
    try:
      num_i, pid_i = int(num), int(pid)
    except ValueError as e:
      raise ValueError(f"JAX_NUM_PROCESSES={num!r} and JAX_PROCESS_ID={pid!r} must be integers.") from e
    jax.distributed.initialize(coordinator_address=addr, num_processes=num_i, process_id=pid_i)
  else:
    jax.distributed.initialize()
  return True


def is_primary() -> bool:
  """True in the process that writes outputs (``jax.process_index() == 0``)."""
  return jax.process_index() == 0


# --------------------------------------------------------------------------- replicas


class ReplicatedProgram(NamedTuple):
  """``Program`` functions over a leading replica axis K (one seed per replica).

  Attributes:
    init: ``keys [K] -> RoundState`` (every leaf ``[K, ...]``).
    round: ``(states [K], data [K], keys [K]) -> (states [K], metrics [K, ...])``.
    sample: ``(g_vars [K], z) -> images [K, N, R, R, ch]`` (same ``z`` for every replica).
  """

  init: Callable[[jax.Array], round_lib.RoundState]
  round: Callable[..., tuple[round_lib.RoundState, dict]]
  sample: Callable[[PyTree, jax.Array], jax.Array]


def replicate(program: round_lib.Program) -> ReplicatedProgram:
  """Lifts a program over a leading replica axis with ``jax.vmap`` (not jitted).

  Args:
    program: from ``round_lib.build`` / ``build_from_config``.

  Returns:
    A ``ReplicatedProgram``; jit its ``round`` (``jit_round(...,
    replicas=True)`` to also shard clients).
  """
  return ReplicatedProgram(
      init=jax.vmap(program.init),
      round=jax.vmap(program.round),
      sample=jax.vmap(program.sample, in_axes=(0, None)))


def replica_seeds(seed: int, num_replicas: int) -> list[int]:
  """The seeds of the K replicas: ``seed, seed + 1, ..., seed + K - 1``.

  Raises:
    ValueError: if ``num_replicas`` < 1.
  """
  if not isinstance(num_replicas, int) or num_replicas < 1:
    raise ValueError(f"num_replicas={num_replicas!r} must be a positive integer.")
  return [seed + k for k in range(num_replicas)]


def replica_keys(seed: int, num_replicas: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-replica ``(k_init, k_rounds, k_eval)``, each ``[K]``, as ``experiment.run`` derives them.

  ``experiment.run`` splits ``jax.random.key(seed)`` into three; replica ``k``
  does the same with ``seed + k``, so it reproduces the single run of that seed.
  """
  keys = jnp.stack([jnp.stack(jax.random.split(jax.random.key(s), 3))
                    for s in replica_seeds(seed, num_replicas)])
  return keys[:, 0], keys[:, 1], keys[:, 2]


def round_keys(k_rounds: jax.Array, r: int | jax.Array) -> jax.Array:
  """This round's key for every replica: ``fold_in(k_rounds[k], r)``."""
  return jax.vmap(lambda k: jax.random.fold_in(k, r))(k_rounds)


def stack_replicas(datas: Sequence[round_lib.RoundData]) -> round_lib.RoundData:
  """Stacks per-replica ``RoundData`` on a new leading axis.

  Client shards may have different ``n_max`` across seeds (non-iid
  partitions): shorter ones are padded with zero images that are never drawn
  (batches index below ``counts``) and never poisoned.

  Raises:
    ValueError: the replicas differ in anything but ``n_max`` (e.g. C or R).
  """
  n_max = max(d.images.shape[1] for d in datas)
  padded = []
  for k, d in enumerate(datas):
    pad = n_max - d.images.shape[1]
    if d.images.shape[0] != datas[0].images.shape[0] or d.images.shape[2:] != datas[0].images.shape[2:]:
      raise ValueError(f"replica {k}: images {d.images.shape} do not match replica 0's "
                       f"{datas[0].images.shape} (replicas may differ only in seed).")
    if pad:
      d = d._replace(images=jnp.pad(d.images, ((0, 0), (0, pad)) + ((0, 0),) * 3),
                     poison_flags=jnp.pad(d.poison_flags, ((0, 0), (0, pad))))
    padded.append(d)
  return jax.tree.map(lambda *xs: jnp.stack(xs), *padded)


def setup_replica_data(config, num_replicas: int) -> tuple[round_lib.RoundData, list, list[dict]]:
  """``experiment.setup_data`` for seeds ``seed .. seed + K - 1``, stacked.

  Args:
    config: a validated config (its ``seed`` is replica 0's).
    num_replicas: K.

  Returns:
    (stacked ``RoundData`` ``[K, ...]``, the K held-out sets, the K info dicts).
  """
  from fedgan_jax import experiment
  config = copy.deepcopy(config)
  with config.unlocked():
    config.num_replicas = num_replicas
  datas, heldouts, infos = zip(*[experiment.setup_data(c) for c in experiment.replica_configs(config)])
  return stack_replicas(datas), list(heldouts), list(infos)


def unstack(tree: PyTree, k: int) -> PyTree:
  """Replica ``k`` of a replicated pytree (host or device arrays)."""
  return jax.tree.map(lambda x: x[k], tree)


def auto_client_mesh(num_clients: int) -> Mesh | None:
  """``client_mesh`` when the clients divide evenly over several devices, else ``None``.

  For ``experiment.run``: a run whose ``num_clients`` does not divide the
  device count still runs (unsharded, on the default device), with a warning.
  """
  n = jax.device_count()
  if n > 1 and num_clients % n:
    from absl import logging
    logging.warning("num_clients=%d is not a multiple of the %d devices: clients are not sharded.",
                    num_clients, n)
    return None
  return client_mesh(num_clients)


def run_replicas(config, workdir: str, num_replicas: int) -> list[dict[str, Any]]:
  """Trains ``num_replicas`` seeds of ``config`` as ONE vmapped program (resumable).

  ``experiment.run`` with ``num_replicas = K``: replica ``k`` is the run with
  ``seed + k`` and writes ``<workdir>/seed_<seed+k>/`` exactly as that single
  run would.

  Returns:
    The K summaries (also written to each replica's ``summary.json``).
  """
  from fedgan_jax import experiment
  config = copy.deepcopy(config)
  with config.unlocked():
    config.num_replicas = num_replicas
  out = experiment.run(config, workdir)
  return out.get("replicas", [out]) if out else []


__all__ = [
    "CLIENT_AXIS", "ReplicatedProgram", "auto_client_mesh", "client_mesh", "distributed_env", "is_primary", "jit_round",
    "maybe_initialize_distributed", "replica_keys", "replica_seeds", "replicate", "round_keys",
    "round_shardings", "run_replicas", "setup_replica_data", "shard_round_inputs", "stack_replicas", "unstack",
]
