"""Where the labels of a folder of images come from: a CSV, or the folder layout.

CSV layouts are detected from the header (first match wins; see
``read_labels_csv``): ISIC 2019 one-hot ``GroundTruth.csv``, ISIC 2020
``train.csv``, HAM10000 ``metadata.csv``, or a generic ``image,label`` file.
Without a CSV, a ``<split>/<class>/<file>`` layout gives class labels
(``folder_labels``).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from fedgan_jax.data.common import names_excerpt
from fedgan_jax.data.images import IMAGE_EXTENSIONS

# Folder names read as the first level of a `<split>/<class>/<file>` layout.
SPLIT_NAMES = ("train", "training", "val", "valid", "validation", "test", "testing", "dev")

# CSV layouts, detected from the header (first match wins).
ISIC2019_CLASSES = ("MEL", "NV", "BCC", "AK", "AKIEC", "BKL", "DF", "VASC", "SCC", "UNK")
_GENERIC_ID_COLUMNS = ("image", "filename", "file", "image_id", "image_name", "path")
_GENERIC_LABEL_COLUMNS = ("label", "class", "target", "dx")


def strip_image_ext(name: str) -> str:
  """A CSV id or file path reduced to the stem files are matched by.

  Args:
    name: e.g. ``'dir/ISIC_1.jpg'`` or ``'ISIC_1'``.

  Returns:
    ``'ISIC_1'``; ids without an image extension keep their dots.
  """
  base = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
  if base.lower().endswith(IMAGE_EXTENSIONS):
    base = base.rsplit(".", 1)[0]
  return base


def resolve_csv(config: ml_collections.ConfigDict, root: Path) -> Path | None:
  """Finds ``data.labels_csv``: as given, else relative to ``data.path``.

  Args:
    config: reads ``data.labels_csv``.
    root: the resolved ``data.path`` folder.

  Returns:
    The absolute CSV path; None when ``data.labels_csv`` is unset.

  Raises:
    FileNotFoundError: when it is set but exists in neither place.
  """
  if not config.data.labels_csv:
    return None
  given = Path(config.data.labels_csv).expanduser()
  for cand in (given, root / given):
    if cand.is_file():
      return cand.resolve()
  raise FileNotFoundError(
    f"data.labels_csv={config.data.labels_csv!r} does not exist (looked at "
    f"{given.resolve()} and {root / given}). Accepted: a CSV of one of the "
    "layouts isic2019 (image + one-hot MEL,NV,...), isic2020 (image_name, "
    "target), ham10000 (image_id, dx) or generic (image|filename, label), or "
    "'' for no CSV."
  )


def label_ids(values: list[str]) -> tuple[np.ndarray, tuple[str, ...]]:
  """Maps label strings to ids: integers as is, else sorted unique names.

  Args:
    values: one label string per row.

  Returns:
    ``(int32 ids, class names)``; for integer labels the names are
    ``'0' .. str(max)``.
  """
  try:
    ints = [int(float(v)) for v in values]
    if min(ints, default=0) < 0:
      raise ValueError
    k = max(ints, default=0) + 1
    return np.array(ints, np.int32), tuple(str(i) for i in range(k))
  except ValueError:
    names = tuple(sorted(set(values)))
    lut = {n: i for i, n in enumerate(names)}
    return np.array([lut[v] for v in values], np.int32), names


def read_labels_csv(csv_path: Path, group_column: str = "") -> dict[str, Any]:
  """Reads a labels CSV, auto-detecting its layout from the header.

  Layouts (first match wins):

  * ``isic2019``: an ``image`` column plus one-hot class columns among
    ``MEL, NV, BCC, AK, BKL, DF, VASC, SCC, UNK`` (also ISIC 2018's
    ``AKIEC``); label = argmax; classes are the one-hot columns in header
    order (so ISIC 2019 keeps its official 9 ids, UNK included though empty).
  * ``isic2020``: ``image_name`` and ``target`` (0 benign / 1 malignant).
  * ``ham10000``: ``image_id`` and ``dx``; classes are the sorted ``dx`` values
    (``akiec, bcc, bkl, df, mel, nv, vasc``).
  * ``generic``: an id column (``image, filename, file, image_id, image_name,
    path``) and a label column (``label, class, target, dx``); integer labels
    are kept as ids, strings map to their sorted unique values.

  Ids are matched to files by stem (directory and image extension stripped).

  Args:
    csv_path: the CSV file.
    group_column: optional column whose values become groups (sorted unique
      names; an empty cell is its own group ``'(missing)'``).

  Returns:
    dict with ``layout``, ``ids`` (list of stems), ``labels`` (int32),
    ``class_names``, and when ``group_column`` is set ``groups`` (int32) and
    ``group_names``.
  """
  with open(csv_path, newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f)
    rows = [r for r in reader if any(c.strip() for c in r)]
  if not rows:
    raise ValueError(f"data.labels_csv={str(csv_path)!r} is empty.")
  header = [c.strip() for c in rows[0]]
  body = rows[1:]
  if not body:
    raise ValueError(f"data.labels_csv={str(csv_path)!r} has a header but no rows.")
  col = {name: i for i, name in enumerate(header)}

  def column(name: str) -> list[str]:
    i = col[name]
    return [r[i].strip() if i < len(r) else "" for r in body]

  onehot = [c for c in header if c.upper() in ISIC2019_CLASSES]
  if "image" in col and onehot:
    layout, ids = "isic2019", column("image")
    try:
      mat = np.array([[float(v or 0) for v in column(c)] for c in onehot]).T
    except ValueError as e:
      raise ValueError(
        f"data.labels_csv={str(csv_path)!r} looks like the ISIC 2019 one-hot "
        f"layout (columns {onehot}) but has a non-numeric cell: {e}"
      ) from None
    bad = np.flatnonzero(mat.max(axis=1) <= 0)
    if bad.size:
      raise ValueError(
        f"data.labels_csv={str(csv_path)!r}: {bad.size} rows have no class "
        f"set in the one-hot columns {onehot}, e.g. "
        f"{names_excerpt([ids[i] for i in bad])}."
      )
    labels = mat.argmax(axis=1).astype(np.int32)
    class_names = tuple(onehot)
  elif "image_name" in col and "target" in col:
    layout, ids = "isic2020", column("image_name")
    labels, _ = label_ids(column("target"))
    class_names = ("benign", "malignant")
  elif "image_id" in col and "dx" in col:
    layout, ids = "ham10000", column("image_id")
    labels, class_names = label_ids(column("dx"))
  else:
    id_col = next((c for c in _GENERIC_ID_COLUMNS if c in col), None)
    label_col = next((c for c in _GENERIC_LABEL_COLUMNS if c in col), None)
    if id_col is None or label_col is None:
      raise ValueError(
        f"data.labels_csv={str(csv_path)!r} has columns {header}, which match "
        "no known layout. Accepted: isic2019 (image + one-hot MEL,NV,BCC,...),"
        " isic2020 (image_name, target), ham10000 (image_id, dx), generic "
        f"(one of {list(_GENERIC_ID_COLUMNS)} + one of "
        f"{list(_GENERIC_LABEL_COLUMNS)})."
      )
    layout, ids = "generic", column(id_col)
    labels, class_names = label_ids(column(label_col))
  ids = [strip_image_ext(i) for i in ids]
  out: dict[str, Any] = dict(layout=layout, ids=ids, labels=labels, class_names=class_names)
  if group_column:
    if group_column not in col:
      raise ValueError(
        f"data.group_column={group_column!r} is not a column of "
        f"data.labels_csv={str(csv_path)!r}; columns found: {header}."
      )
    values = [v or "(missing)" for v in column(group_column)]
    names = tuple(sorted(set(values)))
    lut = {n: i for i, n in enumerate(names)}
    out["groups"] = np.array([lut[v] for v in values], np.int32)
    out["group_names"] = names
  return out


def folder_labels(files: list[str]) -> tuple[np.ndarray, tuple[str, ...]] | None:
  """Labels from a ``<split>/<class>/<file>`` layout, or None if not one.

  Read as that layout only when every image is exactly two folders deep and
  every first-level folder is a split name (``SPLIT_NAMES``); all splits are
  pooled (the held-out set is drawn afterwards).

  Args:
    files: relative POSIX paths of the images.

  Returns:
    ``(int32 labels, sorted class folder names)``, or None.
  """
  parts = [f.split("/") for f in files]
  if not parts or any(len(p) != 3 for p in parts):
    return None
  if any(p[0].lower() not in SPLIT_NAMES for p in parts):
    return None
  names = tuple(sorted({p[1] for p in parts}))
  lut = {n: i for i, n in enumerate(names)}
  return np.array([lut[p[1]] for p in parts], np.int32), names
