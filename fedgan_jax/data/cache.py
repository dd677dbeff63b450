"""The decoded-dataset cache: one compressed ``.npz`` per set of inputs.

Sources that decode images (``folder``, ``tfds``) store the converted uint8
arrays and a JSON ``meta`` dict under ``data.cache_dir`` (default
``~/.cache/fedgan_jax``), in a file named by the source, resolution, channels
and a hash of everything the decoded set depends on. A changed input is a new
file name, so stale files are never read; an unreadable file is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

# Bump when the cache layout or the decoding changes, to invalidate old files.
_CACHE_VERSION = 1


def _cache_dir(config: ml_collections.ConfigDict) -> Path:
  return Path(config.data.cache_dir or "~/.cache/fedgan_jax").expanduser()


def cache_file(config: ml_collections.ConfigDict, prefix: str, key_obj: Any) -> Path:
  """Cache path keyed by a SHA-256 of a JSON description of the inputs.

  Args:
    config: reads ``resolution``, ``data.channels`` and ``data.cache_dir``.
    prefix: the source name, first in the file name.
    key_obj: a JSON-serialisable description of every input of the decoded set.

  Returns:
    ``<cache_dir>/<prefix>_<R>px_<ch>ch_<digest>.npz``.
  """
  blob = json.dumps([_CACHE_VERSION, key_obj], sort_keys=True).encode()
  digest = hashlib.sha256(blob).hexdigest()[:24]
  return _cache_dir(config) / (f"{prefix}_{config.resolution}px_{config.data.channels}ch_{digest}.npz")


def load_cache(path: Path) -> dict[str, Any] | None:
  """Reads a cache file written by ``save_cache``.

  Args:
    path: the cache file.

  Returns:
    dict of its arrays (``images``, ``labels``, maybe ``groups``) and the
    decoded ``meta`` dict; None when the file is absent or unreadable (warned).
  """
  if not path.is_file():
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      out = {k: z[k] for k in z.files}
    out["meta"] = json.loads(str(out["meta"]))
    return out
  except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
    warnings.warn(f"Ignoring unreadable cache file {path} ({e}); rebuilding it.", stacklevel=2)
    return None


def save_cache(
  path: Path, images: np.ndarray, labels: np.ndarray, groups: np.ndarray | None, meta: dict[str, Any]
) -> None:
  """Writes the decoded set atomically as a compressed ``.npz``.

  Args:
    path: the cache file (its folder is created).
    images: uint8 ``[N, R, R, ch]``.
    labels: int ``[N]``.
    groups: optional int ``[N]``.
    meta: JSON-serialisable facts stored alongside.
  """
  path.parent.mkdir(parents=True, exist_ok=True)
  arrays = dict(images=images, labels=labels, meta=np.array(json.dumps(meta)))
  if groups is not None:
    arrays["groups"] = groups
  # Written to a temporary file and renamed, so a reader (or a crash) never
  # sees a half-written cache file.
  fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez_compressed(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
