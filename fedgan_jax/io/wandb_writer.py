"""Weights & Biases logging beside ``metrics.jsonl`` and TensorBoard (optional; ``pip install -e ".[wandb]"``).

On with ``--config.wandb.project=<name>``; ``wandb.mode='offline'`` keeps
everything under ``<workdir>/wandb`` for a later ``wandb sync`` (the mode
the tests use), ``'online'`` streams it. Each run directory is one W&B run
whose id is derived from the directory's absolute path, so a resumed run
continues the same W&B run (``resume='allow'``), and each replica of a
vmapped group (``seed_<s>/``) is its own run, grouped by ``wandb.group``.

The scalars are the same records ``metrics.jsonl`` gets (per-client lists
become ``name/client_k``, as in TensorBoard), stepped by round; the sample
grid is logged as an image at every evaluation; the run's config is the
validated config as a flat dict. W&B keeps steps increasing: rounds that a
resumed run trains again after its last checkpoint are not logged twice
there (``metrics.jsonl`` and TensorBoard are cut back and rewritten).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedgan_jax.io.tensorboard import _flatten_scalars

INSTALL_HINT = 'pip install -e ".[wandb]"'


def run_id(workdir: str) -> str:
  """A stable W&B run id for a run directory (W&B ids: up to 64 characters of [a-z0-9])."""
  return hashlib.sha1(os.path.abspath(workdir).encode()).hexdigest()[:16]


def _flat_config(config) -> dict[str, Any]:
  out: dict[str, Any] = {}

  def walk(prefix: str, node) -> None:
    for k, v in node.items():
      if hasattr(v, "items"):
        walk(f"{prefix}{k}.", v)
      else:
        out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v

  walk("", config)
  return out


class WandbWriter:
  """One W&B run per run directory; a no-op when ``config.wandb.project`` is '' or ``active`` is False.

  Raises:
    ValueError: ``wandb.project`` is set but the ``wandb`` package is not installed.
  """

  def __init__(self, config, workdir: str, active: bool = True):
    self._run = None
    if not config.wandb.project or not active:
      return
    try:
      import wandb
    except ImportError as e:
      raise ValueError(
        f"config.wandb.project={config.wandb.project!r} needs the wandb package: {INSTALL_HINT} "
        "(or leave wandb.project empty)."
      ) from e
    self._wandb = wandb
    self._run = wandb.init(
      project=config.wandb.project,
      entity=config.wandb.entity or None,
      group=config.wandb.group or None,
      name=os.path.basename(os.path.abspath(workdir)),
      id=run_id(workdir),
      resume="allow",
      dir=workdir,
      mode=config.wandb.mode,
      config=_flat_config(config),
      reinit="create_new",
    )

  @property
  def active(self) -> bool:
    return self._run is not None

  def scalars(self, round_: int, record: Mapping[str, Any]) -> None:
    if self._run is not None:
      self._run.log(_flatten_scalars(record), step=int(round_))

  def image(self, round_: int, name: str, grid: np.ndarray | None) -> None:
    if self._run is not None and grid is not None:
      self._run.log({name: self._wandb.Image(np.asarray(grid))}, step=int(round_))

  def close(self) -> None:
    if self._run is not None:
      self._run.finish()
      self._run = None
