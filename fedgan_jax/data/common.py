"""What every source loader shares: its result type, the held-out draw, name lists.

A loader is ``config -> (full, heldout_or_None, info)`` (``LoaderResult``);
``fedgan_jax.data.sources.load_data`` draws the held-out set with
``split_heldout`` when a loader returns ``None`` for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedgan_jax.data.types import Dataset

Info = dict[str, Any]
LoaderResult = tuple[Dataset, Dataset | None, Info]

MAX_LISTED = 10  # names quoted in error messages
MAX_INFO_NAMES = 100  # names kept in info
# Stream id that separates the held-out draw from other uses of config.seed.
_HELDOUT_STREAM = 0x4E1D


def take(ds: Dataset, idx: np.ndarray) -> Dataset:
  """The subset of ``ds`` at some indices (metadata kept).

  Args:
    ds: the dataset.
    idx: int indices into ``ds``.

  Returns:
    ``ds`` with images, labels and groups (if any) indexed by ``idx``.
  """
  return ds._replace(images=ds.images[idx], labels=ds.labels[idx], groups=None if ds.groups is None else ds.groups[idx])


def split_heldout(ds: Dataset, num_heldout: int, seed: int) -> tuple[Dataset, Dataset]:
  """Splits off a seeded random clean held-out set.

  The draw uses ``np.random.default_rng((seed, _HELDOUT_STREAM))`` so it does
  not correlate with other uses of the same seed (e.g. the partition).

  Args:
    ds: the full dataset.
    num_heldout: size of the held-out set (``data.heldout``), ``0 <= n < N``.
    seed: ``config.seed``.

  Returns:
    ``(train, heldout)``, each in the original order.
  """
  n = len(ds.images)
  if num_heldout < 0 or num_heldout >= n:
    raise ValueError(
      f"data.heldout={num_heldout} must be >= 0 and leave at least one "
      f"training image, but the source has only {n} images."
    )
  perm = np.random.default_rng((seed, _HELDOUT_STREAM)).permutation(n)
  held, train = np.sort(perm[:num_heldout]), np.sort(perm[num_heldout:])
  return take(ds, train), take(ds, held)


def names_excerpt(names: Sequence[str]) -> str:
  """The first ``MAX_LISTED`` names, comma-separated, for an error message.

  Args:
    names: the names (file paths, ids, ...).

  Returns:
    e.g. ``'a, b, ... (3 more)'``.
  """
  shown = ", ".join(names[:MAX_LISTED])
  return shown + (f", ... ({len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else "")
