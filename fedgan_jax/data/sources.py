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
  ``<split>/<class>/`` folder layout, or none. Decoded once and cached.
* ``npz`` -- a MedMNIST-style ``.npz`` read with NumPy alone.
* ``tfds`` -- a TFDS dataset already prepared on disk in ArrayRecord format,
  read with ``tfds`` random-access data sources (no TensorFlow needed).

``load_data(config) -> (train, heldout, info)``. Every source returns uint8
images ``[N, R, R, ch]`` with ``R = config.resolution`` and ``ch =
config.data.channels``, int32 labels and optional int32 groups. ``heldout`` is
a clean evaluation split that is never given to clients; ``info`` is a
JSON-serialisable dict of facts for the logs and ``summary.json``.

Image conversion (shared by every source that has to resize or convert):

* Center crop to a square of side ``min(H, W)`` (offset ``(W - side) // 2``,
  ``(H - side) // 2``, i.e. rounded down when odd), then resize to ``R x R``
  with Pillow's ``LANCZOS`` filter (antialiased; the usual choice for
  downsampling a dataset once, e.g. StyleGAN's ``dataset_tool``). No resize
  happens when the crop is already ``R x R``. Large JPEGs are decoded with
  Pillow's ``draft`` at a DCT-reduced scale that still keeps at least ``2R``
  pixels on the short side before the LANCZOS resize (much faster on
  multi-megapixel ISIC images, visually identical at GAN resolutions).
* ``channels=3`` from a grayscale source replicates the gray value into R, G
  and B; ``channels=1`` from a colour source converts to Pillow's ``'L'``
  (ITU-R 601-2 luma: ``L = 0.299 R + 0.587 G + 0.114 B``). Alpha channels are
  dropped (not composited). 16-bit grayscale (``I;16``) is scaled to 8 bits by
  dividing by 257; 32-bit ``I`` images whose maximum exceeds 255 are treated
  as 16-bit as well. EXIF orientation tags are ignored (as in most ML
  pipelines).
"""

from __future__ import annotations

import concurrent.futures
import csv
import hashlib
import importlib
import json
import os
from pathlib import Path
import tempfile
from typing import Any, Callable, Optional, Sequence
import warnings

from absl import logging
import ml_collections
import numpy as np
from PIL import Image

from fedgan_jax.data.types import Dataset

Info = dict[str, Any]
LoaderResult = tuple[Dataset, Optional[Dataset], Info]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Folder names read as the first level of a `<split>/<class>/<file>` layout.
SPLIT_NAMES = ("train", "training", "val", "valid", "validation", "test",
               "testing", "dev")
# Bump when the cache layout or the decoding changes, to invalidate old files.
_CACHE_VERSION = 1
# Stream id that separates the held-out draw from other uses of config.seed.
_HELDOUT_STREAM = 0x4E1D
_MAX_LISTED = 10  # names quoted in error messages
_MAX_INFO_NAMES = 100  # names kept in info

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError,
                  Image.DecompressionBombError)

# CSV layouts, detected from the header (first match wins).
ISIC2019_CLASSES = ("MEL", "NV", "BCC", "AK", "AKIEC", "BKL", "DF", "VASC",
                    "SCC", "UNK")
_GENERIC_ID_COLUMNS = ("image", "filename", "file", "image_id", "image_name",
                       "path")
_GENERIC_LABEL_COLUMNS = ("label", "class", "target", "dx")


# ----------------------------------------------------------------------------
# Image conversion.


def _to_8bit(img: Image.Image) -> Image.Image:
  """Maps 16/32-bit integer and float images to 8-bit ``'L'``."""
  if img.mode.startswith("I;16"):
    arr = np.asarray(img).astype(np.float64) / 257.0
  elif img.mode == "I":
    arr = np.asarray(img).astype(np.float64)
    if arr.size and arr.max() > 255:
      arr = arr / 257.0
  elif img.mode == "F":
    arr = np.asarray(img).astype(np.float64)
  else:
    return img
  return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def convert_image(img: Image.Image, resolution: int, channels: int,
                  resample: int = Image.Resampling.LANCZOS) -> np.ndarray:
  """Center-crops, resizes and converts one image (see the module docstring).

  Args:
    img: a Pillow image of any mode and size.
    resolution: output side R.
    channels: 3 (RGB) or 1 (luminance).
    resample: Pillow resampling filter (``LANCZOS`` everywhere in the package;
      tests pass ``NEAREST`` for exact expectations).

  Returns:
    uint8 ``[R, R, channels]``.
  """
  img = _to_8bit(img)
  img = img.convert("RGB" if channels == 3 else "L")
  w, h = img.size
  side = min(w, h)
  if (w, h) != (side, side):
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
  if side != resolution:
    img = img.resize((resolution, resolution), resample=resample)
  arr = np.asarray(img, dtype=np.uint8)
  if arr.ndim == 2:
    arr = arr[:, :, None]
  return arr


def _decode_image(path: str, resolution: int, channels: int) -> np.ndarray:
  """Decodes one image file fully (truncated files raise ``OSError``).

  Args:
    path: file path.
    resolution: output side R.
    channels: 3 or 1.

  Returns:
    uint8 ``[R, R, channels]``.
  """
  with Image.open(path) as img:
    if img.format == "JPEG":
      # DCT-domain downscale (1/2, 1/4, 1/8) keeping >= 2R px on each side.
      img.draft(img.mode, (2 * resolution, 2 * resolution))
    img.load()
    return convert_image(img, resolution, channels)


def _array_to_image(arr: np.ndarray) -> Image.Image:
  """A uint8 ``[H, W]``, ``[H, W, 1]`` or ``[H, W, 3|4]`` array as a Pillow image."""
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[:, :, 0]
  return Image.fromarray(np.ascontiguousarray(arr))


def _convert_array_images(images: np.ndarray, resolution: int,
                          channels: int) -> np.ndarray:
  """Converts a stack of uint8 images to ``[N, R, R, channels]``."""
  if images.ndim == 3:
    images = images[..., None]
  n, h, w, c = images.shape
  if h == w == resolution and c == channels:
    return np.ascontiguousarray(images)
  if h == w == resolution and c == 1 and channels == 3:
    return np.repeat(images, 3, axis=-1)
  out = np.empty((n, resolution, resolution, channels), np.uint8)
  for i in range(n):
    out[i] = convert_image(_array_to_image(images[i]), resolution, channels)
  return out


# ----------------------------------------------------------------------------
# Shared helpers.


def _take(ds: Dataset, idx: np.ndarray) -> Dataset:
  """The subset of ``ds`` at indices ``idx`` (metadata kept)."""
  return ds._replace(
      images=ds.images[idx], labels=ds.labels[idx],
      groups=None if ds.groups is None else ds.groups[idx])


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
        f"training image, but the source has only {n} images.")
  perm = np.random.default_rng((seed, _HELDOUT_STREAM)).permutation(n)
  held, train = np.sort(perm[:num_heldout]), np.sort(perm[num_heldout:])
  return _take(ds, train), _take(ds, held)


def _names_excerpt(names: Sequence[str]) -> str:
  shown = ", ".join(names[:_MAX_LISTED])
  return shown + (f", ... ({len(names) - _MAX_LISTED} more)"
                  if len(names) > _MAX_LISTED else "")


def _cache_dir(config: ml_collections.ConfigDict) -> Path:
  return Path(config.data.cache_dir or "~/.cache/fedgan_jax").expanduser()


def _cache_file(config: ml_collections.ConfigDict, prefix: str,
                key_obj: Any) -> Path:
  """Cache path keyed by a SHA-256 of a JSON description of the inputs."""
  blob = json.dumps([_CACHE_VERSION, key_obj], sort_keys=True).encode()
  digest = hashlib.sha256(blob).hexdigest()[:24]
  return _cache_dir(config) / (
      f"{prefix}_{config.resolution}px_{config.data.channels}ch_{digest}.npz")


def _load_cache(path: Path) -> Optional[dict[str, Any]]:
  """Reads a cache file written by ``_save_cache``; None when absent or bad."""
  if not path.is_file():
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      out = {k: z[k] for k in z.files}
    out["meta"] = json.loads(str(out["meta"]))
    return out
  except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
    warnings.warn(f"Ignoring unreadable cache file {path} ({e}); rebuilding it.")
    return None


def _save_cache(path: Path, images: np.ndarray, labels: np.ndarray,
                groups: Optional[np.ndarray], meta: dict[str, Any]) -> None:
  """Writes the decoded set atomically as a compressed ``.npz``."""
  path.parent.mkdir(parents=True, exist_ok=True)
  arrays = dict(images=images, labels=labels, meta=np.array(json.dumps(meta)))
  if groups is not None:
    arrays["groups"] = groups
  fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez_compressed(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _check_common(config: ml_collections.ConfigDict) -> None:
  if config.data.channels not in (1, 3):
    raise ValueError(f"data.channels={config.data.channels!r}; accepted: 1 or 3.")
  if int(config.resolution) < 1:
    raise ValueError(f"resolution={config.resolution!r} must be a positive int.")
  if int(config.data.heldout) < 0:
    raise ValueError(f"data.heldout={config.data.heldout!r} must be >= 0.")


# ----------------------------------------------------------------------------
# synthetic


def _load_synthetic(config: ml_collections.ConfigDict) -> LoaderResult:
  """The embedded procedural set: first ``num_images`` train, the rest held out."""
  synthetic = importlib.import_module("fedgan_jax.data.synthetic")
  n, h = int(config.data.num_images), int(config.data.heldout)
  if n < 1:
    raise ValueError(f"data.num_images={n} must be >= 1 for data.source='synthetic'.")
  images, labels = synthetic.make_synthetic(n + h, int(config.resolution),
                                            int(config.seed), int(config.data.channels))
  images = np.asarray(images, np.uint8)
  labels = np.asarray(labels, np.int32)
  full = Dataset(images=images, labels=labels, num_classes=int(synthetic.NUM_CLASSES),
                 class_names=tuple(synthetic.CLASS_NAMES))
  train = _take(full, np.arange(n))
  heldout = _take(full, np.arange(n, n + h))
  return train, heldout, {"label_source": "synthetic"}


# ----------------------------------------------------------------------------
# folder


def _list_images(root: Path) -> list[str]:
  """Relative POSIX paths of the images under ``root``, sorted.

  Hidden files and folders (names starting with ``.``, e.g. macOS ``._x.jpg``
  AppleDouble files) and ``__MACOSX`` folders are ignored.
  """
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__MACOSX"]
    for name in filenames:
      if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
        found.append(Path(dirpath, name).relative_to(root).as_posix())
  return sorted(found)


def _strip_image_ext(name: str) -> str:
  """``'dir/ISIC_1.jpg' -> 'ISIC_1'``; ids without an image extension keep dots."""
  base = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
  if base.lower().endswith(IMAGE_EXTENSIONS):
    base = base.rsplit(".", 1)[0]
  return base


def _resolve_csv(config: ml_collections.ConfigDict, root: Path) -> Optional[Path]:
  """``data.labels_csv`` as given, else relative to ``data.path``; None if unset."""
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
      "'' for no CSV.")


def _label_ids(values: list[str]) -> tuple[np.ndarray, tuple[str, ...]]:
  """Maps label strings to ids: integers as is, else sorted unique names."""
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
          f"layout (columns {onehot}) but has a non-numeric cell: {e}") from None
    bad = np.flatnonzero(mat.max(axis=1) <= 0)
    if bad.size:
      raise ValueError(
          f"data.labels_csv={str(csv_path)!r}: {bad.size} rows have no class "
          f"set in the one-hot columns {onehot}, e.g. "
          f"{_names_excerpt([ids[i] for i in bad])}.")
    labels = mat.argmax(axis=1).astype(np.int32)
    class_names = tuple(onehot)
  elif "image_name" in col and "target" in col:
    layout, ids = "isic2020", column("image_name")
    labels, _ = _label_ids(column("target"))
    class_names = ("benign", "malignant")
  elif "image_id" in col and "dx" in col:
    layout, ids = "ham10000", column("image_id")
    labels, class_names = _label_ids(column("dx"))
  else:
    id_col = next((c for c in _GENERIC_ID_COLUMNS if c in col), None)
    label_col = next((c for c in _GENERIC_LABEL_COLUMNS if c in col), None)
    if id_col is None or label_col is None:
      raise ValueError(
          f"data.labels_csv={str(csv_path)!r} has columns {header}, which match "
          "no known layout. Accepted: isic2019 (image + one-hot MEL,NV,BCC,...),"
          " isic2020 (image_name, target), ham10000 (image_id, dx), generic "
          f"(one of {list(_GENERIC_ID_COLUMNS)} + one of "
          f"{list(_GENERIC_LABEL_COLUMNS)}).")
    layout, ids = "generic", column(id_col)
    labels, class_names = _label_ids(column(label_col))
  ids = [_strip_image_ext(i) for i in ids]
  out: dict[str, Any] = dict(layout=layout, ids=ids, labels=labels,
                             class_names=class_names)
  if group_column:
    if group_column not in col:
      raise ValueError(
          f"data.group_column={group_column!r} is not a column of "
          f"data.labels_csv={str(csv_path)!r}; columns found: {header}.")
    values = [v or "(missing)" for v in column(group_column)]
    names = tuple(sorted(set(values)))
    lut = {n: i for i, n in enumerate(names)}
    out["groups"] = np.array([lut[v] for v in values], np.int32)
    out["group_names"] = names
  return out


def _folder_labels(files: list[str]) -> Optional[tuple[np.ndarray, tuple[str, ...]]]:
  """Labels from a ``<split>/<class>/<file>`` layout, or None if not one.

  Read as that layout only when every image is exactly two folders deep and
  every first-level folder is a split name (``SPLIT_NAMES``); all splits are
  pooled (the held-out set is drawn afterwards).
  """
  parts = [f.split("/") for f in files]
  if not parts or any(len(p) != 3 for p in parts):
    return None
  if any(p[0].lower() not in SPLIT_NAMES for p in parts):
    return None
  names = tuple(sorted({p[1] for p in parts}))
  lut = {n: i for i, n in enumerate(names)}
  return np.array([lut[p[1]] for p in parts], np.int32), names


def _decode_all(root: Path, files: list[str], resolution: int,
                channels: int) -> tuple[np.ndarray, list[int], list[str]]:
  """Decodes ``files`` in parallel threads (Pillow releases the GIL).

  Returns:
    (images of the readable files, their indices into ``files``,
    ``'name: reason'`` strings of the unreadable ones).
  """
  # Filled in place: no second full-size copy of a large set in memory.
  images = np.empty((len(files), resolution, resolution, channels), np.uint8)

  def one(i: int) -> Optional[str]:
    try:
      images[i] = _decode_image(str(root / files[i]), resolution, channels)
      return None
    except _DECODE_ERRORS as e:
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
      f"decoded (truncated or not an image): {_names_excerpt(bad)}. Remove or "
      "re-download them, or set data.skip_unreadable=True to skip them.")


def _load_folder(config: ml_collections.ConfigDict) -> LoaderResult:
  """A directory of JPEG/PNG files (flat or nested), decoded once and cached.

  Labels, in order of preference: ``data.labels_csv`` (see
  ``read_labels_csv``), a ``<split>/<class>/`` layout, or none (all 0). With a
  CSV, images are matched to rows by file stem: images without a row are
  dropped (counted in ``info['images_without_csv_row']``); rows naming images
  that are not in the folder raise ``ValueError`` if NONE match, else warn and
  are reported in ``info['csv_missing_images']``. Duplicate stems are an error
  when a CSV is used (the match would be ambiguous).

  The decoded set is cached as a compressed ``.npz`` in ``data.cache_dir``
  keyed by a hash of the absolute folder path, resolution, channels, the
  sorted file list with sizes and mtimes, the CSV path, size and mtime, and the
  group column; the held-out split is drawn after the cache.
  """
  if not config.data.path:
    raise ValueError("data.path is empty; data.source='folder' needs a directory "
                     "of .jpg/.jpeg/.png images.")
  root = Path(config.data.path).expanduser().resolve()
  if not root.is_dir():
    raise FileNotFoundError(
        f"data.path={config.data.path!r} ({root}) is not a directory; "
        "data.source='folder' needs a directory of .jpg/.jpeg/.png images.")
  files = _list_images(root)
  if not files:
    raise FileNotFoundError(
        f"data.path={config.data.path!r} ({root}) contains no "
        f"{'/'.join(IMAGE_EXTENSIONS)} images (searched recursively).")
  csv_path = _resolve_csv(config, root)
  if config.data.group_column and csv_path is None:
    raise ValueError(
        f"data.group_column={config.data.group_column!r} needs data.labels_csv "
        "(groups are read from a CSV column); set both, or clear group_column.")

  stats = []
  for rel in files:
    st = os.stat(root / rel)
    stats.append((rel, st.st_size, st.st_mtime_ns))
  csv_key = None
  if csv_path is not None:
    st = os.stat(csv_path)
    csv_key = (str(csv_path), st.st_size, st.st_mtime_ns)
  cache_path = _cache_file(config, "folder", dict(
      path=str(root), resolution=int(config.resolution),
      channels=int(config.data.channels), files=stats, csv=csv_key,
      group_column=config.data.group_column))

  cached = _load_cache(cache_path)
  cache_hit = cached is not None
  if cached is not None:
    meta = cached["meta"]
    if meta["skipped_unreadable"] and not config.data.skip_unreadable:
      raise _unreadable_error(root, meta["skipped_unreadable"])
    logging.info("data: cache hit %s (%d images)", cache_path, len(cached["images"]))
  else:
    meta, images, labels, groups = _decode_folder(config, root, files, csv_path)
    _save_cache(cache_path, images, labels, groups, meta)
    cached = dict(images=images, labels=labels, meta=meta)
    if groups is not None:
      cached["groups"] = groups
  meta = cached["meta"]
  ds = Dataset(
      images=cached["images"], labels=cached["labels"].astype(np.int32),
      groups=cached["groups"].astype(np.int32) if "groups" in cached else None,
      num_classes=max(1, len(meta["class_names"] or ())),
      class_names=tuple(meta["class_names"]) if meta["class_names"] else None)
  info = {k: v for k, v in meta.items() if k != "class_names"}
  info.update(path=str(root), cache_hit=cache_hit, cache_path=str(cache_path))
  return ds, None, info


def _decode_folder(config: ml_collections.ConfigDict, root: Path,
                   files: list[str], csv_path: Optional[Path]):
  """Matches labels, decodes and returns ``(meta, images, labels, groups)``."""
  meta: dict[str, Any] = dict(
      num_files=len(files), skipped_unreadable=[], num_skipped_unreadable=0,
      csv_missing_images=[], num_csv_missing_images=0,
      images_without_csv_row=0, group_names=None)
  groups = None
  if csv_path is not None:
    table = read_labels_csv(csv_path, config.data.group_column)
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
          f"{_names_excerpt(dups)}.")
    row_of: dict[str, int] = {}
    for i, s in enumerate(table["ids"]):
      if s in row_of and table["labels"][row_of[s]] != table["labels"][i]:
        raise ValueError(f"data.labels_csv={str(csv_path)!r} lists {s!r} twice "
                         "with different labels.")
      row_of.setdefault(s, i)
    missing = sorted(s for s in row_of if s not in seen)
    keep = [i for i, s in enumerate(stems) if s in row_of]
    if not keep:
      raise ValueError(
          f"None of the {len(row_of)} images named in data.labels_csv="
          f"{str(csv_path)!r} (layout {table['layout']}) exist under data.path="
          f"{str(root)!r} (matched by file stem; e.g. CSV ids "
          f"{_names_excerpt(sorted(row_of)[:3])} vs files "
          f"{_names_excerpt(files[:3])}).")
    if missing:
      warnings.warn(
          f"{len(missing)} of the {len(row_of)} images named in data.labels_csv"
          f"={str(csv_path)!r} are not under data.path={str(root)!r}, e.g. "
          f"{_names_excerpt(missing)}; training on the {len(keep)} found.")
    rows = np.array([row_of[stems[i]] for i in keep], np.int64)
    labels = table["labels"][rows]
    if "groups" in table:
      groups = table["groups"][rows]
      meta["group_names"] = list(table["group_names"])
    meta.update(label_source=f"csv:{table['layout']}", labels_csv=str(csv_path),
                class_names=list(table["class_names"]),
                csv_missing_images=missing[:_MAX_INFO_NAMES],
                num_csv_missing_images=len(missing),
                images_without_csv_row=len(files) - len(keep))
    if meta["images_without_csv_row"]:
      logging.warning("data: %d images under %s have no row in %s; dropped.",
                      meta["images_without_csv_row"], root, csv_path)
    files = [files[i] for i in keep]
  else:
    from_folders = _folder_labels(files)
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
            "train/<class>/ or give data.labels_csv.", subdirs[:_MAX_LISTED])

  logging.info("data: decoding %d images under %s", len(files), root)
  images, ok, bad = _decode_all(root, files, int(config.resolution),
                                int(config.data.channels))
  if bad and not config.data.skip_unreadable:
    raise _unreadable_error(root, bad)
  if bad:
    warnings.warn(f"data: skipped {len(bad)} unreadable image(s) under "
                  f"{root}: {_names_excerpt(bad)}")
  if not ok:
    raise ValueError(f"No readable images under data.path={str(root)!r}.")
  ok_idx = np.array(ok, np.int64)
  meta.update(skipped_unreadable=[b.split(":", 1)[0] for b in bad][:_MAX_INFO_NAMES],
              num_skipped_unreadable=len(bad))
  labels = np.asarray(labels, np.int32)[ok_idx]
  if groups is not None:
    groups = groups[ok_idx]
  return meta, images, labels, groups


# ----------------------------------------------------------------------------
# npz


def _load_npz(config: ml_collections.ConfigDict) -> LoaderResult:
  """A MedMNIST-style ``.npz`` read with NumPy alone.

  Keys ``{train,val,test}_{images,labels}``; images uint8 ``(N, H, W)`` or
  ``(N, H, W, 1|3)``; labels ``(N,)`` or ``(N, 1)``. Train = ``train_*`` only
  (``val_*`` is not used). Held-out = the ``test_*`` split (``val_*`` when there
  is no test split): its first ``data.heldout`` images, or all of it when
  ``data.heldout == 0``; with neither split, a seeded random ``data.heldout``
  of train. Multi-label ``(N, K>1)`` labels (e.g. ChestMNIST) are not single
  classes: they are ignored with a warning (unlabeled). Images are resized /
  converted to ``resolution`` / ``data.channels`` when they differ.
  """
  path = Path(config.data.path).expanduser()
  if not config.data.path or not path.is_file():
    raise FileNotFoundError(
        f"data.path={config.data.path!r} is not a file; data.source='npz' needs "
        "a MedMNIST-style .npz with train_images (+ train_labels, test_*).")
  try:
    z = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ValueError(f"data.path={str(path)!r} is not a readable .npz: {e}") from None
  with z:
    keys = sorted(z.files)
    if "train_images" not in keys:
      raise ValueError(
          f"data.path={str(path)!r} has no 'train_images'; keys found: {keys}. "
          "Expected MedMNIST-style keys {train,val,test}_{images,labels}.")
    arrays = {k: z[k] for k in keys}
  info: Info = dict(path=str(path.resolve()), npz_keys=keys)

  def split(prefix: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
    images = arrays[f"{prefix}_images"]
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (
        images.ndim == 4 and images.shape[-1] not in (1, 3)):
      raise ValueError(
          f"data.path={str(path)!r}: '{prefix}_images' has dtype {images.dtype} "
          f"and shape {images.shape}; accepted: uint8 (N,H,W) or (N,H,W,1|3).")
    labels = arrays.get(f"{prefix}_labels")
    if labels is not None:
      labels = np.asarray(labels)
      if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"data.path={str(path)!r}: '{prefix}_labels' has {labels.shape[0]} "
            f"rows but '{prefix}_images' has {images.shape[0]}.")
      if labels.ndim == 1 or (labels.ndim == 2 and labels.shape[1] == 1):
        labels = labels.reshape(-1).astype(np.int32)
      else:
        warnings.warn(f"data: '{prefix}_labels' in {path} has shape "
                      f"{labels.shape} (multi-label); treating the set as unlabeled.")
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
            f"data.path={str(path)!r} has only {len(ho_images)} images.")
      ho_images = ho_images[:int(config.data.heldout)]
      ho_labels = None if ho_labels is None else ho_labels[:int(config.data.heldout)]
    labelled = labelled and ho_labels is not None
  if not labelled:
    tr_labels = np.zeros(len(tr_images), np.int32)
    ho_labels = None if ho_images is None else np.zeros(len(ho_images), np.int32)
  k = int(max(tr_labels.max(initial=0),
              0 if ho_labels is None else ho_labels.max(initial=0))) + 1
  num_classes = k if labelled else 1
  train = Dataset(images=_convert_array_images(tr_images, res, ch), labels=tr_labels,
                  num_classes=num_classes)
  if ho_images is None:
    train, heldout = split_heldout(train, int(config.data.heldout), int(config.seed))
    info["heldout_from"] = "train (random)"
  else:
    heldout = Dataset(images=_convert_array_images(ho_images, res, ch),
                      labels=ho_labels, num_classes=num_classes)
    info["heldout_from"] = held_prefix
  info.update(label_source="npz" if labelled else "none",
              source_shape=list(tr_images.shape[1:]))
  return train, heldout, info


# ----------------------------------------------------------------------------
# tfds


def _tfds_feature_keys(builder: Any) -> list[str]:
  return sorted(builder.info.features.keys())


def _load_tfds(config: ml_collections.ConfigDict) -> LoaderResult:
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
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "data.source='tfds' needs tensorflow-datasets: pip install -e .") from e
  name, split = config.data.tfds_name, config.data.tfds_split
  data_dir = config.data.tfds_data_dir or None
  if not name:
    raise ValueError("data.tfds_name is empty; data.source='tfds' needs a dataset name.")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise FileNotFoundError(
        f"data.tfds_name={name!r} is neither a registered TFDS dataset nor "
        f"prepared under data.tfds_data_dir={config.data.tfds_data_dir!r}.") from None
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"data.tfds_name={name!r} is not prepared under data.tfds_data_dir="
        f"{config.data.tfds_data_dir!r} (looked in {builder.data_dir}); nothing "
        "is downloaded at run time. Prepare it first, e.g. `tfds build "
        f"{name} --file_format=array_record --data_dir=...`.")
  keys = _tfds_feature_keys(builder)
  if config.data.image_key not in keys:
    raise ValueError(f"data.image_key={config.data.image_key!r} is not a feature of "
                     f"{name!r}; features found: {keys}.")
  label_key = config.data.label_key
  if label_key and label_key not in keys:
    raise ValueError(f"data.label_key={label_key!r} is not a feature of {name!r}; "
                     f"features found: {keys} (use label_key='' for no labels).")

  file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
  dir_files = sorted(
      (p.name, p.stat().st_size, p.stat().st_mtime_ns)
      for p in Path(str(builder.data_dir)).iterdir() if p.is_file())
  cache_path = _cache_file(config, "tfds", dict(
      name=name, split=split, data_dir=str(builder.data_dir), files=dir_files,
      image_key=config.data.image_key, label_key=label_key,
      resolution=int(config.resolution), channels=int(config.data.channels)))
  cached = _load_cache(cache_path)
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
    _save_cache(cache_path, images, labels, None, meta)
    cached = dict(images=images, labels=labels, meta=meta)
  meta = cached["meta"]
  ds = Dataset(images=cached["images"], labels=cached["labels"].astype(np.int32),
               num_classes=max(1, len(meta["class_names"] or ())),
               class_names=tuple(meta["class_names"]) if meta["class_names"] else None)
  info = dict(tfds_name=name, tfds_split=split, tfds_dir=str(builder.data_dir),
              file_format=meta["file_format"], cache_hit=cache_hit,
              cache_path=str(cache_path),
              label_source="tfds" if label_key else "none")
  return ds, None, info


def _read_tfds(builder: Any, split: str, config: ml_collections.ConfigDict,
               file_format: str) -> tuple[np.ndarray, np.ndarray]:
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
          "needs TensorFlow to read. Install it with `pip install -e \".[tfds]\"`"
          ", or re-prepare the dataset in ArrayRecord format (`tfds build "
          f"{config.data.tfds_name} --file_format=array_record`).") from None
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    records = tfds.as_numpy(builder.as_dataset(split=split))
  images, labels = [], []
  for ex in records:
    images.append(convert_image(_array_to_image(np.asarray(ex[image_key])), res, ch))
    labels.append(int(np.asarray(ex[label_key]).reshape(-1)[0]) if label_key else 0)
  if not images:
    raise ValueError(f"data.tfds_split={split!r} of {config.data.tfds_name!r} is empty.")
  return np.stack(images), np.array(labels, np.int32)


def _iter_data_source(source: Any, chunk: int = 512):
  """Yields the records of a random-access data source in chunks."""
  n = len(source)
  for start in range(0, n, chunk):
    idx = list(range(start, min(n, start + chunk)))
    if hasattr(source, "__getitems__"):
      yield from source.__getitems__(idx)
    else:
      yield from (source[i] for i in idx)


# ----------------------------------------------------------------------------
# Public API.


SOURCES: dict[str, Callable[[ml_collections.ConfigDict], LoaderResult]] = {
    "synthetic": _load_synthetic,
    "folder": _load_folder,
    "npz": _load_npz,
    "tfds": _load_tfds,
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
    assert ds.images.dtype == np.uint8 and ds.images.shape[1:] == (r, r, ch), (
        name, ds.images.dtype, ds.images.shape)
  if len(train.images) == 0:
    raise ValueError(f"data.source={source!r} gave no training images.")
  info = {
      "source": source, "resolution": r, "channels": ch,
      "num_train": int(len(train.images)), "num_heldout": int(len(heldout.images)),
      "num_classes": int(train.num_classes),
      "class_names": list(train.class_names) if train.class_names else None,
      "class_counts": np.bincount(train.labels,
                                  minlength=train.num_classes).tolist(),
      "cache_hit": False, **info}
  logging.info("data: %s", {k: v for k, v in info.items()
                            if not isinstance(v, list) or len(v) <= 20})
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
        "clients, or a smaller batch.")
