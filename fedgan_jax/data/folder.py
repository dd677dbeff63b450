"""The ``folder`` source: a directory of JPEG/PNG files, decoded once and cached.

The layout ISIC / HAM10000 downloads unpack to (flat or nested folders), with
labels from a CSV or a ``<split>/<class>/`` layout (``fedgan_jax.data.labels``),
converted by ``fedgan_jax.data.images`` and cached by ``fedgan_jax.data.cache``.
"""

from __future__ import annotations

import concurrent.futures
import os
import warnings
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from fedgan_jax.data import cache as cache_lib
from fedgan_jax.data import images as images_lib
from fedgan_jax.data import labels as labels_lib
from fedgan_jax.data.common import MAX_INFO_NAMES, MAX_LISTED, LoaderResult, names_excerpt
from fedgan_jax.data.types import Dataset


def _list_images(root: Path) -> list[str]:
  """Relative POSIX paths of the images under ``root``, sorted.

  Hidden files and folders (names starting with ``.``, e.g. macOS ``._x.jpg``
  AppleDouble files) and ``__MACOSX`` folders are ignored.
  """
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__MACOSX"]
    for name in filenames:
      if not name.startswith(".") and name.lower().endswith(images_lib.IMAGE_EXTENSIONS):
        found.append(Path(dirpath, name).relative_to(root).as_posix())
  return sorted(found)


def _decode_all(
  root: Path, files: list[str], resolution: int, channels: int
) -> tuple[np.ndarray, list[int], list[str]]:
  """Decodes ``files`` in parallel threads (Pillow releases the GIL).

  Returns:
    (images of the readable files, their indices into ``files``,
    ``'name: reason'`` strings of the unreadable ones).
  """
  # Filled in place: no second full-size copy of a large set in memory.
  images = np.empty((len(files), resolution, resolution, channels), np.uint8)

  def one(i: int) -> str | None:
    try:
      images[i] = images_lib.decode_image(str(root / files[i]), resolution, channels)
      return None
    except images_lib.DECODE_ERRORS as e:
      return f"{files[i]}: {type(e).__name__}: {e}"

  workers = min(32, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    errors = list(pool.map(one, range(len(files))))
  ok = [i for i, err in enumerate(errors) if err is None]
  bad = [err for err in errors if err is not None]
  if bad:
    images = images[np.array(ok, np.int64)]
  return images, ok, bad


def _unreadable_error(root: Path, bad: list[str]) -> ValueError:
  return ValueError(
    f"{len(bad)} image file(s) under data.path={str(root)!r} could not be "
    f"decoded (truncated or not an image): {names_excerpt(bad)}. Remove or "
    "re-download them, or set data.skip_unreadable=True to skip them."
  )


def load_folder(config: ml_collections.ConfigDict) -> LoaderResult:
  """A directory of JPEG/PNG files (flat or nested), decoded once and cached.

  Labels, in order of preference: ``data.labels_csv`` (see
  ``labels.read_labels_csv``), a ``<split>/<class>/`` layout, or none (all 0).
  With a CSV, images are matched to rows by file stem: images without a row
  are dropped (counted in ``info['images_without_csv_row']``); rows naming
  images that are not in the folder raise ``ValueError`` if NONE match, else
  warn and are reported in ``info['csv_missing_images']``. Duplicate stems are
  an error when a CSV is used (the match would be ambiguous).

  The decoded set is cached as a compressed ``.npz`` in ``data.cache_dir``
  keyed by a hash of the absolute folder path, resolution, channels, the
  sorted file list with sizes and mtimes, the CSV path, size and mtime, and the
  group column; the held-out split is drawn after the cache.

  Args:
    config: reads ``resolution`` and ``data.{path, labels_csv, channels,
      skip_unreadable, cache_dir, group_column}``.

  Returns:
    ``(full set, None, info)``: ``load_data`` draws the held-out set.
  """
  if not config.data.path:
    raise ValueError("data.path is empty; data.source='folder' needs a directory of .jpg/.jpeg/.png images.")
  root = Path(config.data.path).expanduser().resolve()
  if not root.is_dir():
    raise FileNotFoundError(
      f"data.path={config.data.path!r} ({root}) is not a directory; "
      "data.source='folder' needs a directory of .jpg/.jpeg/.png images."
    )
  files = _list_images(root)
  if not files:
    raise FileNotFoundError(
      f"data.path={config.data.path!r} ({root}) contains no "
      f"{'/'.join(images_lib.IMAGE_EXTENSIONS)} images (searched recursively)."
    )
  csv_path = labels_lib.resolve_csv(config, root)
  if config.data.group_column and csv_path is None:
    raise ValueError(
      f"data.group_column={config.data.group_column!r} needs data.labels_csv "
      "(groups are read from a CSV column); set both, or clear group_column."
    )

  stats = []
  for rel in files:
    st = os.stat(root / rel)
    stats.append((rel, st.st_size, st.st_mtime_ns))
  csv_key = None
  if csv_path is not None:
    st = os.stat(csv_path)
    csv_key = (str(csv_path), st.st_size, st.st_mtime_ns)
  cache_path = cache_lib.cache_file(
    config,
    "folder",
    dict(
      path=str(root),
      resolution=int(config.resolution),
      channels=int(config.data.channels),
      files=stats,
      csv=csv_key,
      group_column=config.data.group_column,
    ),
  )

  cached = cache_lib.load_cache(cache_path)
  cache_hit = cached is not None
  if cached is not None:
    meta = cached["meta"]
    if meta["skipped_unreadable"] and not config.data.skip_unreadable:
      raise _unreadable_error(root, meta["skipped_unreadable"])
    logging.info("data: cache hit %s (%d images)", cache_path, len(cached["images"]))
  else:
    meta, images, labels, groups = _decode_folder(config, root, files, csv_path)
    cache_lib.save_cache(cache_path, images, labels, groups, meta)
    cached = dict(images=images, labels=labels, meta=meta)
    if groups is not None:
      cached["groups"] = groups
  meta = cached["meta"]
  ds = Dataset(
    images=cached["images"],
    labels=cached["labels"].astype(np.int32),
    groups=cached["groups"].astype(np.int32) if "groups" in cached else None,
    num_classes=max(1, len(meta["class_names"] or ())),
    class_names=tuple(meta["class_names"]) if meta["class_names"] else None,
  )
  info = {k: v for k, v in meta.items() if k != "class_names"}
  info.update(path=str(root), cache_hit=cache_hit, cache_path=str(cache_path))
  return ds, None, info


def _decode_folder(
  config: ml_collections.ConfigDict, root: Path, files: list[str], csv_path: Path | None
) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray | None]:
  """Matches labels, decodes and returns ``(meta, images, labels, groups)``."""
  meta: dict[str, Any] = dict(
    num_files=len(files),
    skipped_unreadable=[],
    num_skipped_unreadable=0,
    csv_missing_images=[],
    num_csv_missing_images=0,
    images_without_csv_row=0,
    group_names=None,
  )
  groups = None
  if csv_path is not None:
    table = labels_lib.read_labels_csv(csv_path, config.data.group_column)
    stems = [Path(f).stem for f in files]
    seen: dict[str, str] = {}
    dups = []
    for f, s in zip(files, stems):
      if s in seen:
        dups.append(f"{seen[s]} / {f}")
      seen[s] = f
    if dups:
      raise ValueError(
        f"data.path={str(root)!r} holds {len(dups)} images whose file stems "
        f"repeat, so rows of data.labels_csv cannot be matched unambiguously: "
        f"{names_excerpt(dups)}."
      )
    row_of: dict[str, int] = {}
    for i, s in enumerate(table["ids"]):
      if s in row_of and table["labels"][row_of[s]] != table["labels"][i]:
        raise ValueError(f"data.labels_csv={str(csv_path)!r} lists {s!r} twice with different labels.")
      row_of.setdefault(s, i)
    missing = sorted(s for s in row_of if s not in seen)
    keep = [i for i, s in enumerate(stems) if s in row_of]
    if not keep:
      raise ValueError(
        f"None of the {len(row_of)} images named in data.labels_csv="
        f"{str(csv_path)!r} (layout {table['layout']}) exist under data.path="
        f"{str(root)!r} (matched by file stem; e.g. CSV ids "
        f"{names_excerpt(sorted(row_of)[:3])} vs files "
        f"{names_excerpt(files[:3])})."
      )
    if missing:
      warnings.warn(
        f"{len(missing)} of the {len(row_of)} images named in data.labels_csv"
        f"={str(csv_path)!r} are not under data.path={str(root)!r}, e.g. "
        f"{names_excerpt(missing)}; training on the {len(keep)} found.",
        stacklevel=2,
      )
    rows = np.array([row_of[stems[i]] for i in keep], np.int64)
    labels = table["labels"][rows]
    if "groups" in table:
      groups = table["groups"][rows]
      meta["group_names"] = list(table["group_names"])
    meta.update(
      label_source=f"csv:{table['layout']}",
      labels_csv=str(csv_path),
      class_names=list(table["class_names"]),
      csv_missing_images=missing[:MAX_INFO_NAMES],
      num_csv_missing_images=len(missing),
      images_without_csv_row=len(files) - len(keep),
    )
    if meta["images_without_csv_row"]:
      logging.warning(
        "data: %d images under %s have no row in %s; dropped.", meta["images_without_csv_row"], root, csv_path
      )
    files = [files[i] for i in keep]
  else:
    from_folders = labels_lib.folder_labels(files)
    if from_folders is not None:
      labels, names = from_folders
      meta.update(label_source="folders", class_names=list(names))
    else:
      labels = np.zeros(len(files), np.int32)
      meta.update(label_source="none", class_names=None)
      subdirs = sorted({f.split("/")[0] for f in files if "/" in f})
      if subdirs:
        logging.warning(
          "data: no labels (no data.labels_csv, no <split>/<class>/ layout); "
          "images sit in subfolders %s. If these are classes, arrange them as "
          "train/<class>/ or give data.labels_csv.",
          subdirs[:MAX_LISTED],
        )

  logging.info("data: decoding %d images under %s", len(files), root)
  images, ok, bad = _decode_all(root, files, int(config.resolution), int(config.data.channels))
  if bad and not config.data.skip_unreadable:
    raise _unreadable_error(root, bad)
  if bad:
    warnings.warn(f"data: skipped {len(bad)} unreadable image(s) under {root}: {names_excerpt(bad)}", stacklevel=2)
  if not ok:
    raise ValueError(f"No readable images under data.path={str(root)!r}.")
  ok_idx = np.array(ok, np.int64)
  meta.update(skipped_unreadable=[b.split(":", 1)[0] for b in bad][:MAX_INFO_NAMES], num_skipped_unreadable=len(bad))
  labels = np.asarray(labels, np.int32)[ok_idx]
  if groups is not None:
    groups = groups[ok_idx]
  return meta, images, labels, groups
