"""Pytree <-> flat numpy helpers shared by the aggregation tests (numpy references work on flat vectors)."""

from __future__ import annotations

import jax
import numpy as np


def flat(tree):
  """One float64 vector of every leaf's values, leaves in ``jax.tree.leaves`` order."""
  return np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in jax.tree.leaves(tree)])


def flat_clients(tree):
  """``[C, D]``: each client's flat vector of a stacked (leading client axis) pytree."""
  return np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in jax.tree.leaves(tree)], axis=1)


def from_flat(v, g):
  """Numpy flat vector(s) ``[..., D]`` -> float32 pytree shaped as ``g`` with the leading axes of ``v``."""
  leaves, treedef = jax.tree.flatten(g)
  out, off = [], 0
  for x in leaves:
    out.append(np.asarray(v[..., off : off + x.size], np.float32).reshape(v.shape[:-1] + x.shape))
    off += x.size
  return jax.tree.unflatten(treedef, out)
