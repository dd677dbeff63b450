"""The ``npz`` source: a MedMNIST-style ``.npz`` read with NumPy alone."""

from __future__ import annotations

import warnings
from pathlib import Path

import ml_collections
import numpy as np

from fedgan_jax.data.common import Info, LoaderResult, split_heldout
from fedgan_jax.data.images import convert_array_images
from fedgan_jax.data.types import Dataset


def load_npz(config: ml_collections.ConfigDict) -> LoaderResult:
  """A MedMNIST-style ``.npz`` read with NumPy alone.

  Keys ``{train,val,test}_{images,labels}``; images uint8 ``(N, H, W)`` or
  ``(N, H, W, 1|3)``; labels ``(N,)`` or ``(N, 1)``. Train = ``train_*`` only
  (``val_*`` is not used). Held-out = the ``test_*`` split (``val_*`` when there
  is no test split): its first ``data.heldout`` images, or all of it when
  ``data.heldout == 0``; with neither split, a seeded random ``data.heldout``
  of train. Multi-label ``(N, K>1)`` labels (e.g. ChestMNIST) are not single
  classes: they are ignored with a warning (unlabeled). Images are resized /
  converted to ``resolution`` / ``data.channels`` when they differ.

  Args:
    config: reads ``resolution``, ``seed`` and ``data.{path, channels,
      heldout}``.

  Returns:
    ``(train, heldout, info)``.
  """
  path = Path(config.data.path).expanduser()
  if not config.data.path or not path.is_file():
    raise FileNotFoundError(
      f"data.path={config.data.path!r} is not a file; data.source='npz' needs "
      "a MedMNIST-style .npz with train_images (+ train_labels, test_*)."
    )
  try:
    z = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ValueError(f"data.path={str(path)!r} is not a readable .npz: {e}") from None
  with z:
    keys = sorted(z.files)
    if "train_images" not in keys:
      raise ValueError(
        f"data.path={str(path)!r} has no 'train_images'; keys found: {keys}. "
        "Expected MedMNIST-style keys {train,val,test}_{images,labels}."
      )
    arrays = {k: z[k] for k in keys}
  info: Info = dict(path=str(path.resolve()), npz_keys=keys)

  def split(prefix: str) -> tuple[np.ndarray, np.ndarray | None]:
    images = arrays[f"{prefix}_images"]
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
      raise ValueError(
        f"data.path={str(path)!r}: '{prefix}_images' has dtype {images.dtype} "
        f"and shape {images.shape}; accepted: uint8 (N,H,W) or (N,H,W,1|3)."
      )
    labels = arrays.get(f"{prefix}_labels")
    if labels is not None:
      labels = np.asarray(labels)
      if labels.shape[0] != images.shape[0]:
        raise ValueError(
          f"data.path={str(path)!r}: '{prefix}_labels' has {labels.shape[0]} "
          f"rows but '{prefix}_images' has {images.shape[0]}."
        )
      if labels.ndim == 1 or (labels.ndim == 2 and labels.shape[1] == 1):
        labels = labels.reshape(-1).astype(np.int32)
      else:
        warnings.warn(
          f"data: '{prefix}_labels' in {path} has shape {labels.shape} (multi-label); treating the set as unlabeled.",
          stacklevel=2,
        )
        info["labels_note"] = f"multi-label {labels.shape[1:]} ignored"
        labels = None
    return images, labels

  res, ch = int(config.resolution), int(config.data.channels)
  tr_images, tr_labels = split("train")
  held_prefix = next((p for p in ("test", "val") if f"{p}_images" in arrays), None)
  labelled = tr_labels is not None
  ho_images = ho_labels = None
  if held_prefix is not None:
    ho_images, ho_labels = split(held_prefix)
    if int(config.data.heldout) > 0:
      if int(config.data.heldout) > len(ho_images):
        raise ValueError(
          f"data.heldout={config.data.heldout} but '{held_prefix}_images' in "
          f"data.path={str(path)!r} has only {len(ho_images)} images."
        )
      ho_images = ho_images[: int(config.data.heldout)]
      ho_labels = None if ho_labels is None else ho_labels[: int(config.data.heldout)]
    labelled = labelled and ho_labels is not None
  if not labelled:
    tr_labels = np.zeros(len(tr_images), np.int32)
    ho_labels = None if ho_images is None else np.zeros(len(ho_images), np.int32)
  k = int(max(tr_labels.max(initial=0), 0 if ho_labels is None else ho_labels.max(initial=0))) + 1
  num_classes = k if labelled else 1
  train = Dataset(images=convert_array_images(tr_images, res, ch), labels=tr_labels, num_classes=num_classes)
  if ho_images is None:
    train, heldout = split_heldout(train, int(config.data.heldout), int(config.seed))
    info["heldout_from"] = "train (random)"
  else:
    heldout = Dataset(images=convert_array_images(ho_images, res, ch), labels=ho_labels, num_classes=num_classes)
    info["heldout_from"] = held_prefix
  info.update(label_source="npz" if labelled else "none", source_shape=list(tr_images.shape[1:]))
  return train, heldout, info
