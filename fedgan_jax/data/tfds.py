"""The ``tfds`` source: a TFDS dataset already prepared on disk.

ArrayRecord datasets are read with ``tfds`` random-access data sources (no
TensorFlow needed); ``tensorflow_datasets`` (and TensorFlow, for TFRecord
datasets only) is imported when the source is used, not with this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from fedgan_jax.data import cache as cache_lib
from fedgan_jax.data import images as images_lib
from fedgan_jax.data.common import LoaderResult
from fedgan_jax.data.types import Dataset


def _tfds_feature_keys(builder: Any) -> list[str]:
  return sorted(builder.info.features.keys())


def load_tfds(config: ml_collections.ConfigDict) -> LoaderResult:
  """A TFDS dataset already prepared on disk, read without TensorFlow.

  Uses ``tfds.builder(name, data_dir=...).as_data_source(split)`` (what
  ``tfds.data_source(..., download=False)`` does), which reads ArrayRecord
  files with random access. Datasets prepared in the TFRecord format need
  TensorFlow: with it installed they are read with ``tfds.load``; without it a
  clear error says to ``pip install -e ".[tfds]"`` (or re-prepare with
  ``tfds build --file_format=array_record``). ``data.label_key == ''`` or a
  dataset without that feature gives an error / no labels (see below). The
  held-out set is a seeded random ``data.heldout`` of ``data.tfds_split``; the
  decoded set is cached like ``folder``.

  Args:
    config: reads ``resolution`` and ``data.{tfds_name, tfds_split,
      tfds_data_dir, image_key, label_key, channels, cache_dir}``.

  Returns:
    ``(full set, None, info)``: ``load_data`` draws the held-out set.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("data.source='tfds' needs tensorflow-datasets: pip install -e .") from e
  name, split = config.data.tfds_name, config.data.tfds_split
  data_dir = config.data.tfds_data_dir or None
  if not name:
    raise ValueError("data.tfds_name is empty; data.source='tfds' needs a dataset name.")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise FileNotFoundError(
      f"data.tfds_name={name!r} is neither a registered TFDS dataset nor "
      f"prepared under data.tfds_data_dir={config.data.tfds_data_dir!r}."
    ) from None
  if not builder.is_prepared():
    raise FileNotFoundError(
      f"data.tfds_name={name!r} is not prepared under data.tfds_data_dir="
      f"{config.data.tfds_data_dir!r} (looked in {builder.data_dir}); nothing "
      "is downloaded at run time. Prepare it first, e.g. `tfds build "
      f"{name} --file_format=array_record --data_dir=...`."
    )
  keys = _tfds_feature_keys(builder)
  if config.data.image_key not in keys:
    raise ValueError(f"data.image_key={config.data.image_key!r} is not a feature of {name!r}; features found: {keys}.")
  label_key = config.data.label_key
  if label_key and label_key not in keys:
    raise ValueError(
      f"data.label_key={label_key!r} is not a feature of {name!r}; "
      f"features found: {keys} (use label_key='' for no labels)."
    )

  file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
  dir_files = sorted(
    (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(str(builder.data_dir)).iterdir() if p.is_file()
  )
  cache_path = cache_lib.cache_file(
    config,
    "tfds",
    dict(
      name=name,
      split=split,
      data_dir=str(builder.data_dir),
      files=dir_files,
      image_key=config.data.image_key,
      label_key=label_key,
      resolution=int(config.resolution),
      channels=int(config.data.channels),
    ),
  )
  cached = cache_lib.load_cache(cache_path)
  cache_hit = cached is not None
  if cached is None:
    images, labels = _read_tfds(builder, split, config, file_format)
    class_names = None
    if label_key:
      feature = builder.info.features[label_key]
      if hasattr(feature, "names") and feature.names:
        class_names = list(feature.names)
      else:
        class_names = [str(i) for i in range(int(labels.max(initial=0)) + 1)]
    meta = dict(class_names=class_names, file_format=file_format)
    cache_lib.save_cache(cache_path, images, labels, None, meta)
    cached = dict(images=images, labels=labels, meta=meta)
  meta = cached["meta"]
  ds = Dataset(
    images=cached["images"],
    labels=cached["labels"].astype(np.int32),
    num_classes=max(1, len(meta["class_names"] or ())),
    class_names=tuple(meta["class_names"]) if meta["class_names"] else None,
  )
  info = dict(
    tfds_name=name,
    tfds_split=split,
    tfds_dir=str(builder.data_dir),
    file_format=meta["file_format"],
    cache_hit=cache_hit,
    cache_path=str(cache_path),
    label_source="tfds" if label_key else "none",
  )
  return ds, None, info


def _read_tfds(
  builder: Any, split: str, config: ml_collections.ConfigDict, file_format: str
) -> tuple[np.ndarray, np.ndarray]:
  """Reads every example of ``split`` as converted uint8 images and labels."""
  res, ch = int(config.resolution), int(config.data.channels)
  image_key, label_key = config.data.image_key, config.data.label_key
  try:
    source = builder.as_data_source(split=split)
    records = _iter_data_source(source)
  except NotImplementedError:  # TFRecord: no random access without TF.
    try:
      import tensorflow  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
    except ImportError:
      raise RuntimeError(
        f"data.tfds_name={config.data.tfds_name!r} under data.tfds_data_dir="
        f"{config.data.tfds_data_dir!r} is stored as {file_format}, which "
        'needs TensorFlow to read. Install it with `pip install -e ".[tfds]"`'
        ", or re-prepare the dataset in ArrayRecord format (`tfds build "
        f"{config.data.tfds_name} --file_format=array_record`)."
      ) from None
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    records = tfds.as_numpy(builder.as_dataset(split=split))
  images, labels = [], []
  for ex in records:
    img = images_lib.array_to_image(np.asarray(ex[image_key]))
    images.append(images_lib.convert_image(img, res, ch))
    labels.append(int(np.asarray(ex[label_key]).reshape(-1)[0]) if label_key else 0)
  if not images:
    raise ValueError(f"data.tfds_split={split!r} of {config.data.tfds_name!r} is empty.")
  return np.stack(images), np.array(labels, np.int32)


def _iter_data_source(source: Any, chunk: int = 512) -> Iterator[Any]:
  """Yields the records of a random-access data source in chunks."""
  n = len(source)
  for start in range(0, n, chunk):
    idx = list(range(start, min(n, start + chunk)))
    if hasattr(source, "__getitems__"):
      yield from source.__getitems__(idx)
    else:
      yield from (source[i] for i in idx)
