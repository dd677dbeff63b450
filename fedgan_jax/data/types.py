"""In-memory data structures shared by every data source and partition."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Dataset(NamedTuple):
  """What every data source returns (host memory, source-agnostic).

  Attributes:
    images: uint8 ``[N, H, W, ch]`` with ``H == W == resolution``.
    labels: int32 ``[N]`` class ids (all zeros when the source has no labels).
    groups: optional int32 ``[N]`` site/group ids for ``partition='by_group'``.
    num_classes: number of distinct classes (1 when unlabeled).
    class_names: optional names of the classes, index-aligned.
  """

  images: np.ndarray
  labels: np.ndarray
  groups: np.ndarray | None = None
  num_classes: int = 1
  class_names: tuple[str, ...] | None = None


class ClientData(NamedTuple):
  """Per-client shards stacked on a leading client axis (one static shape).

  Clients with fewer than ``n_max`` images are padded; batches are drawn
  uniformly from ``[0, counts[c])`` so padding is never sampled.

  Attributes:
    images: uint8 ``[C, n_max, H, W, ch]``.
    labels: int32 ``[C, n_max]``.
    counts: int32 ``[C]`` real images per client.
  """

  images: np.ndarray
  labels: np.ndarray
  counts: np.ndarray
