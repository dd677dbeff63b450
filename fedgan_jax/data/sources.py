"""Data sources: where the real images of an experiment come from.

Jin & Li (SASHIMI 2022, arXiv 2207.00762) train on ISIC dermoscopy images; the
FedDetect extension (MedIA 2023, arXiv 2210.10886) adds chest X-rays. Users
bring their own downloads (nothing is fetched at run time) in one of four
forms, selected by ``config.data.source`` from the registry ``SOURCES``:

* ``synthetic`` -- the embedded procedural set (``fedgan_jax.data.synthetic``),
  so that every demo and test runs with no download.
* ``folder`` -- a directory of JPEG/PNG files as ISIC / HAM10000 unpack, with
  labels from a CSV (ISIC 2019 one-hot ground truth, ISIC 2020 ``train.csv``,
  HAM10000 metadata, or a generic ``image,label`` file), from a
  ``<split>/<class>/`` folder layout, or none. Decoded once and cached
  (``fedgan_jax.data.folder``, ``.labels``, ``.cache``).
* ``npz`` -- a MedMNIST-style ``.npz`` read with NumPy alone
  (``fedgan_jax.data.npz``).
* ``tfds`` -- a TFDS dataset already prepared on disk in ArrayRecord format,
  read with ``tfds`` random-access data sources (no TensorFlow needed;
  ``fedgan_jax.data.tfds``).

``load_data(config) -> (train, heldout, info)``. Every source returns uint8
images ``[N, R, R, ch]`` with ``R = config.resolution`` and ``ch =
config.data.channels``, int32 labels and optional int32 groups. ``heldout`` is
a clean evaluation split that is never given to clients; ``info`` is a
JSON-serialisable dict of facts for the logs and ``summary.json``.

Image conversion (center crop, LANCZOS resize, channel conversion) is shared
by every source that has to resize or convert: see ``fedgan_jax.data.images``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import ml_collections
import numpy as np
from absl import logging

from fedgan_jax.data.common import Info, LoaderResult, split_heldout, take
from fedgan_jax.data.folder import load_folder
from fedgan_jax.data.images import convert_image
from fedgan_jax.data.labels import read_labels_csv
from fedgan_jax.data.npz import load_npz
from fedgan_jax.data.tfds import load_tfds
from fedgan_jax.data.types import Dataset

__all__ = [
  "Dataset",
  "Info",
  "LoaderResult",
  "SOURCES",
  "check_enough",
  "convert_image",
  "load_data",
  "read_labels_csv",
  "split_heldout",
]


def _check_common(config: ml_collections.ConfigDict) -> None:
  if config.data.channels not in (1, 3):
    raise ValueError(f"data.channels={config.data.channels!r}; accepted: 1 or 3.")
  if int(config.resolution) < 1:
    raise ValueError(f"resolution={config.resolution!r} must be a positive int.")
  if int(config.data.heldout) < 0:
    raise ValueError(f"data.heldout={config.data.heldout!r} must be >= 0.")


def _load_synthetic(config: ml_collections.ConfigDict) -> LoaderResult:
  """The embedded procedural set: first ``num_images`` train, the rest held out.

  Args:
    config: reads ``resolution``, ``seed`` and ``data.{num_images, heldout,
      channels}``.

  Returns:
    ``(train, heldout, info)``.
  """
  # Resolved at call time (not a top-level import) so that whatever module
  # sys.modules holds then is used: tests substitute a fake generator.
  synthetic = importlib.import_module("fedgan_jax.data.synthetic")
  n, h = int(config.data.num_images), int(config.data.heldout)
  if n < 1:
    raise ValueError(f"data.num_images={n} must be >= 1 for data.source='synthetic'.")
  images, labels = synthetic.make_synthetic(n + h, int(config.resolution), int(config.seed), int(config.data.channels))
  images = np.asarray(images, np.uint8)
  labels = np.asarray(labels, np.int32)
  full = Dataset(
    images=images, labels=labels, num_classes=int(synthetic.NUM_CLASSES), class_names=tuple(synthetic.CLASS_NAMES)
  )
  train = take(full, np.arange(n))
  heldout = take(full, np.arange(n, n + h))
  return train, heldout, {"label_source": "synthetic"}


SOURCES: dict[str, Callable[[ml_collections.ConfigDict], LoaderResult]] = {
  "synthetic": _load_synthetic,
  "folder": load_folder,
  "npz": load_npz,
  "tfds": load_tfds,
}


def load_data(config: ml_collections.ConfigDict) -> tuple[Dataset, Dataset, Info]:
  """Loads the training set and a clean held-out set per ``config.data.source``.

  Args:
    config: the experiment config; reads ``resolution``, ``seed`` and
      ``data.{source, path, labels_csv, channels, num_images, heldout,
      skip_unreadable, cache_dir, tfds_name, tfds_split, tfds_data_dir,
      image_key, label_key, group_column}``.

  Returns:
    ``(train, heldout, info)``: two ``Dataset``s with uint8 images
    ``[N, R, R, ch]`` (``heldout`` may be empty when ``data.heldout == 0``) and
    a JSON-serialisable dict of facts (source, sizes, class names and counts,
    cache hit, skipped files, ...).

  Raises:
    ValueError / FileNotFoundError: naming the config field at fault and what
      is accepted.
  """
  source = config.data.source
  if source not in SOURCES:
    raise ValueError(f"data.source={source!r} is not known; accepted: {sorted(SOURCES)}.")
  _check_common(config)
  full, heldout, info = SOURCES[source](config)
  if heldout is None:
    train, heldout = split_heldout(full, int(config.data.heldout), int(config.seed))
  else:
    train = full
  r, ch = int(config.resolution), int(config.data.channels)
  for name, ds in (("train", train), ("heldout", heldout)):
    assert ds.images.dtype == np.uint8 and ds.images.shape[1:] == (r, r, ch), (name, ds.images.dtype, ds.images.shape)
  if len(train.images) == 0:
    raise ValueError(f"data.source={source!r} gave no training images.")
  info = {
    "source": source,
    "resolution": r,
    "channels": ch,
    "num_train": int(len(train.images)),
    "num_heldout": int(len(heldout.images)),
    "num_classes": int(train.num_classes),
    "class_names": list(train.class_names) if train.class_names else None,
    "class_counts": np.bincount(train.labels, minlength=train.num_classes).tolist(),
    "cache_hit": False,
    **info,
  }
  logging.info("data: %s", {k: v for k, v in info.items() if not isinstance(v, list) or len(v) <= 20})
  return train, heldout, info


def check_enough(ds: Dataset, config: ml_collections.ConfigDict) -> None:
  """Raises if ``ds`` has fewer than ``num_clients * train.batch_size`` images.

  Args:
    ds: the training set.
    config: reads ``num_clients``, ``train.batch_size`` and ``data.source``.
  """
  n, c, b = len(ds.images), int(config.num_clients), int(config.train.batch_size)
  if n < c * b:
    raise ValueError(
      f"data.source={config.data.source!r} gave {n} training images, fewer than "
      f"num_clients={c} x train.batch_size={b} = {c * b}. Use more images "
      "(data.num_images for 'synthetic', a smaller data.heldout), fewer "
      "clients, or a smaller batch."
    )
