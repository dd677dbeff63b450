"""The client axis sharded over a device mesh (docs/design.md §8).

``client_mesh(C)`` is a 1-D mesh named ``'clients'`` over every device;
``shard_round_inputs`` places each leaf that carries the client axis
(``RoundState.clients`` and the ``CLIENT_DATA_FIELDS`` of ``RoundData``)
sharded over it and replicates the rest (global models, aggregator states,
trigger); ``jit_round`` jits the round with those shardings, local training
under ``jax.shard_map`` (each device trains its own clients, no
communication) and the rest of the round (reports, aggregation) left to XLA's
partitioner (all-reduce / all-to-all over parameter slices). Leaving the whole
round to the partitioner is correct but moves activations between devices for
every conv (measured in docs/benchmarks.md), so it is only an option
(``jit_round(..., local_shard_map=False)``). ``num_clients`` must be a
multiple of the device count: an uneven client axis would need padding
clients, which every aggregation rule would then have to mask out. With
clients sampled per round (``config.clients_per_round = m``, ``sampling``)
so must m be: the m sampled clients are gathered from their devices and
trained under ``shard_map``, m / devices per device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fedgan_jax.federated.replicas import replicate
from fedgan_jax.federated.state import CLIENT_DATA_FIELDS, Program, RoundData, RoundState

PyTree = Any
CLIENT_AXIS = "clients"


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
      f"limit the devices (e.g. CUDA_VISIBLE_DEVICES)."
    )
  return Mesh(np.asarray(devices), (CLIENT_AXIS,))


def auto_client_mesh(num_clients: int, clients_per_round: int | None = None) -> Mesh | None:
  """``client_mesh`` when the clients divide evenly over several devices, else ``None``.

  For a run: one whose ``num_clients`` does not divide the device count still
  runs (unsharded, on the default device), with a warning.

  Args:
    num_clients: C.
    clients_per_round: m when clients are sampled (``sampling.clients_per_round``), else None.

  Raises:
    ValueError: the clients are sharded (C a multiple of the device count)
      and ``clients_per_round`` is not a multiple of the device count.
  """
  n = jax.device_count()
  if n > 1 and num_clients % n:
    logging.warning("num_clients=%d is not a multiple of the %d devices: clients are not sharded.", num_clients, n)
    return None
  check_clients_per_round(clients_per_round, n)
  return client_mesh(num_clients)


def check_clients_per_round(clients_per_round: int | None, num_devices: int) -> None:
  """Raises ``ValueError`` unless the sampled clients (if any) divide evenly over ``num_devices``."""
  if clients_per_round and num_devices > 1 and clients_per_round % num_devices:
    raise ValueError(
      f"config.clients_per_round={clients_per_round} is invalid on {num_devices} devices: the sampled clients "
      f"are trained sharded over the devices, so it must be a multiple of {num_devices} (or 0: every client); "
      "or limit the devices (e.g. CUDA_VISIBLE_DEVICES)."
    )


def _client_axis(state: RoundState, data: RoundData) -> tuple[PyTree, PyTree]:
  """Trees of bools (the structure of ``state`` and ``data``): does this leaf carry the client axis?"""
  no = lambda t: jax.tree.map(lambda _: False, t)
  state_flags = RoundState(
    round=False,
    g_global=no(state.g_global),
    d_global=no(state.d_global),
    g_agg=no(state.g_agg),
    d_agg=no(state.d_agg),
    clients=jax.tree.map(lambda _: True, state.clients),
  )
  data_flags = RoundData(
    **{f: jax.tree.map(lambda _: f in CLIENT_DATA_FIELDS, getattr(data, f)) for f in RoundData._fields}
  )
  return state_flags, data_flags


def _spec(client_axis: bool, replicas: bool) -> P:
  lead = (None,) if replicas else ()
  return P(*lead, CLIENT_AXIS) if client_axis else P()


def round_shardings(state: RoundState, data: RoundData, mesh: Mesh, replicas: bool = False) -> tuple[PyTree, PyTree]:
  """``NamedSharding`` trees for ``(state, data)`` (same structure as the inputs).

  Args:
    state: a ``RoundState`` (arrays or ``jax.ShapeDtypeStruct``s).
    data: a ``RoundData``.
    mesh: a mesh with a ``'clients'`` axis.
    replicas: the inputs carry a leading replica axis (``replicas.replicate``);
      the client axis is then the second one and the replica axis is not sharded.

  Returns:
    ``(state_shardings, data_shardings)``.
  """
  return jax.tree.map(lambda c: NamedSharding(mesh, _spec(c, replicas)), _client_axis(state, data))


def _put(x, sharding: NamedSharding):
  """Places ``x`` with ``sharding``; works when the mesh spans several processes."""
  is_key = hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
  if sharding.is_fully_addressable or is_key:
    return jax.device_put(x, sharding)
  # Multi-host: every process holds the same full value (the data and init are
  # deterministic from the seed); each keeps the slices its own devices hold.
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_round_inputs(
  state: RoundState, data: RoundData, mesh: Mesh | None, replicas: bool = False
) -> tuple[RoundState, RoundData]:
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


def sharded_round(program: Program, mesh: Mesh) -> Callable:
  """``program.round`` with local training under ``jax.shard_map`` over the clients.

  Each device trains its ``C / devices`` clients (vmapped) with no
  communication; the reports and the aggregation then run on the
  client-sharded outputs under ``jit``'s automatic partitioning (reductions
  over the client axis become all-reduces). The same keys as
  ``program.round``, so the result equals the single-device round.

  Args:
    program: from ``program.build``.
    mesh: from ``client_mesh``.

  Returns:
    ``round(state, data, key) -> (state, metrics)``, not jitted (``jit_round`` does).
  """

  def local(state, data, keys):
    # The clients of the round: all of them, or the sampled ones gathered (program.round_with).
    check_clients_per_round(keys.shape[0], mesh.size)
    state_specs, data_specs = jax.tree.map(lambda c: _spec(c, False), _client_axis(state, data))
    return jax.shard_map(
      program.local_round,
      mesh=mesh,
      in_specs=(state_specs, data_specs, P(CLIENT_AXIS)),
      out_specs=P(CLIENT_AXIS),
      check_vma=False,
    )(state, data, keys)

  def round_fn(state, data, key):
    return program.round_with(state, data, key, local_fn=local)

  return round_fn


def jit_round(
  program: Program,
  state: RoundState,
  data: RoundData,
  mesh: Mesh | None,
  replicas: bool = False,
  donate: bool = True,
  local_shard_map: bool = True,
) -> Callable:
  """The jitted round of ``program``, client-sharded on ``mesh``.

  Args:
    program: from ``program.build``.
    state: an example state (arrays or ``ShapeDtypeStruct``s) for the shardings.
    data: an example ``RoundData``.
    mesh: from ``client_mesh``; ``None`` gives a plain ``jax.jit(program.round)``.
    replicas: ``state``/``data`` carry a leading replica axis and the round
      is ``replicate(program).round`` (the replica axis is not sharded).
    donate: donate the state buffers (the caller must not reuse the old state).
    local_shard_map: run local training under ``shard_map`` (``sharded_round``).
      With False, the whole round is left to XLA's automatic partitioning,
      which on XLA:CPU gathers conv activations and weights to every device
      (docs/benchmarks.md).

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
  return jax.jit(
    fn,
    in_shardings=(state_sh, data_sh, replicated),
    out_shardings=(state_sh, replicated),
    donate_argnums=donate_argnums,
  )
