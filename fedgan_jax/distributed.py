"""Multi-host runs: start JAX's distributed runtime when launched as one process of several.

Every process runs the same command; the client mesh spans every process's
devices; only the primary process (``is_primary()``, process 0) writes
outputs. Launch commands are in docs/benchmarks.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax

# Explicit launch: the same three variables on every host (process id differs).
_EXPLICIT = (
  ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS"),
  ("JAX_NUM_PROCESSES", "NUM_PROCESSES"),
  ("JAX_PROCESS_ID", "PROCESS_ID"),
)


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
        f"(or NUM_PROCESSES / PROCESS_ID) must be set too; got {num!r} and {pid!r}."
      )
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
