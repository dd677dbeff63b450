"""Torch-free reader (and a tiny writer) for PyTorch ``.pth`` checkpoint files.

Pretrained feature-extractor weights ship as PyTorch ``state_dict`` files. We
read them with NumPy only, so the project never depends on ``torch``.

A ``.pth`` file is one of two layouts (``torch/serialization.py``):

* the *zip* layout (``torch.save`` since 1.6): ``<root>/data.pkl`` is a pickle
  whose tensors refer, through pickle persistent ids
  ``('storage', StorageType, key, location, numel)``, to raw little-endian
  buffers stored in the entries ``<root>/data/<key>``;
* the *legacy* layout (before 1.6): a stream of pickles -- magic number,
  protocol version, system info, the object (persistent ids
  ``('storage', StorageType, key, location, numel, view_metadata)``), the list
  of storage keys -- followed, for each key, by an int64 element count and the
  raw buffer.

The unpickler is *restricted*: only the handful of globals a plain state dict
needs (``collections.OrderedDict``, the ``torch.*Storage`` dtype tags and
``torch._utils._rebuild_tensor(_v2)`` / ``_rebuild_parameter``) are resolved,
each mapped to a NumPy stand-in; anything else raises ``pickle.UnpicklingError``,
so loading an untrusted file cannot execute code.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

__all__ = ["load_state_dict", "save_state_dict", "is_torch_checkpoint"]

# torch storage class name -> NumPy dtype (little endian, as torch writes them).
_STORAGE_DTYPES: dict[str, np.dtype] = {
  "FloatStorage": np.dtype("<f4"),
  "DoubleStorage": np.dtype("<f8"),
  "HalfStorage": np.dtype("<f2"),
  "LongStorage": np.dtype("<i8"),
  "IntStorage": np.dtype("<i4"),
  "ShortStorage": np.dtype("<i2"),
  "CharStorage": np.dtype("i1"),
  "ByteStorage": np.dtype("u1"),
  "BoolStorage": np.dtype("?"),
  "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
}
_DTYPE_TO_STORAGE = {v: k for k, v in _STORAGE_DTYPES.items()}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType:
  """Stand-in for a ``torch.<X>Storage`` class: only carries the dtype."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *unused: Any) -> np.ndarray:
  del unused  # requires_grad, backward hooks, metadata: irrelevant here.
  size = tuple(int(s) for s in size)
  stride = tuple(int(s) for s in stride)
  offset = int(offset)
  if len(stride) != len(size) or min(stride, default=0) < 0 or offset < 0:
    raise pickle.UnpicklingError(f"invalid tensor layout size={size} stride={stride}")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  # Bounds check: the file is data, never allowed to address outside its buffer.
  last = offset + sum((n - 1) * st for n, st in zip(size, stride))
  if last >= storage.shape[0]:
    raise pickle.UnpicklingError(f"tensor of size {size} exceeds its storage of {storage.shape[0]} elements")
  if not size:
    return np.array(storage[offset], dtype=storage.dtype)
  item = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size, strides=tuple(st * item for st in stride))
  return np.array(view)  # contiguous copy, detached from the file buffer


def _rebuild_parameter(data: np.ndarray, *unused: Any) -> np.ndarray:
  del unused
  return data


_ALLOWED_GLOBALS = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
  """Restricted unpickler: resolves storages through ``load_storage``."""

  def __init__(self, file: BinaryIO, load_storage):
    super().__init__(file, encoding="latin1")
    self._load_storage = load_storage

  def find_class(self, module: str, name: str) -> Any:
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    fn = _ALLOWED_GLOBALS.get((module, name))
    if fn is None:
      raise pickle.UnpicklingError(
        f"refusing to load global {module}.{name}: only plain tensor state dicts are supported by the torch-free reader"
      )
    return fn

  def persistent_load(self, pid: Any) -> Any:
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    return self._load_storage(pid)


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("data.pkl")]
    if not pkl:
      raise ValueError(f"{path}: zip checkpoint without data.pkl")
    root = pkl[0][: -len("data.pkl")]
    cache: dict[str, np.ndarray] = {}

    def load_storage(pid):
      _, stype, key, _location, numel = pid[:5]
      key = str(key)
      if key not in cache:
        raw = zf.read(f"{root}data/{key}")
        cache[key] = np.frombuffer(raw, dtype=stype.dtype, count=int(numel))
      return cache[key]

    with zf.open(pkl[0]) as f:
      return _Unpickler(io.BytesIO(f.read()), load_storage).load()


class _DataUnpickler(pickle.Unpickler):
  """Plain data only (the legacy header: magic number, version, sys info, keys)."""

  def find_class(self, module: str, name: str) -> Any:
    raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def is_torch_checkpoint(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a PyTorch ``torch.save`` file (zip or legacy layout)."""
  path = os.fspath(path)
  if zipfile.is_zipfile(path):
    return True
  try:
    with open(path, "rb") as f:
      return _DataUnpickler(f).load() == _LEGACY_MAGIC
  except Exception:  # pylint: disable=broad-except  (any non-torch content)
    return False


def _load_legacy(path: str) -> Any:
  with open(path, "rb") as f:
    raw_unpickler = _DataUnpickler
    magic = raw_unpickler(f).load()
    if magic != _LEGACY_MAGIC:
      raise ValueError(f"{path}: not a PyTorch checkpoint (bad magic number)")
    raw_unpickler(f).load()  # protocol version
    sys_info = raw_unpickler(f).load()
    if not sys_info.get("little_endian", True):
      raise ValueError(f"{path}: big-endian checkpoints are not supported")
    pending: dict[str, tuple] = {}  # key -> (dtype, numel)
    views: list = []
    storages: dict[str, np.ndarray] = {}

    class Lazy:  # placeholder filled in once the raw buffers are read
      def __init__(self, key):
        self.key = key

    def load_storage(pid):
      _, stype, key, _location, numel = pid[:5]
      view_meta = pid[5] if len(pid) > 5 else None
      pending[str(key)] = (stype.dtype, int(numel))
      if view_meta is not None:
        views.append((str(key), view_meta))
        return Lazy(str(view_meta[0]))
      return Lazy(str(key))

    # Tensors are rebuilt lazily: the buffers come after the object pickle.
    rebuilt: list = []

    def lazy_rebuild(storage, offset, size, stride, *unused):
      del unused
      holder = [storage, offset, size, stride, None]
      rebuilt.append(holder)
      return holder

    global_map = dict(_ALLOWED_GLOBALS)
    global_map[("torch._utils", "_rebuild_tensor")] = lazy_rebuild
    global_map[("torch._utils", "_rebuild_tensor_v2")] = lazy_rebuild

    class LegacyUnpickler(_Unpickler):
      def find_class(self, module, name):
        if (module, name) in global_map and name.startswith("_rebuild_tensor"):
          return global_map[(module, name)]
        return super().find_class(module, name)

    obj = LegacyUnpickler(f, load_storage).load()
    keys = raw_unpickler(f).load()
    for key in keys:
      key = str(key)
      dtype, _ = pending[key]
      (numel,) = struct.unpack("<q", f.read(8))
      buf = f.read(numel * dtype.itemsize)
      storages[key] = np.frombuffer(buf, dtype=dtype, count=numel)
    view_arrays = {}
    for view_key, meta in views:
      root_key, off, vsize = str(meta[0]), int(meta[1]), int(meta[2])
      view_arrays[view_key] = storages[root_key][off : off + vsize]
    for h in rebuilt:
      stor = h[0]
      arr = storages[stor.key] if stor.key in storages else view_arrays[stor.key]
      h[4] = _rebuild_tensor(arr, h[1], h[2], h[3])
  return _resolve(obj)


def _resolve(obj: Any) -> Any:
  """Replaces lazy tensor holders (legacy layout) by their arrays."""
  if isinstance(obj, list) and len(obj) == 5 and isinstance(obj[4], np.ndarray):
    return obj[4]
  if isinstance(obj, collections.OrderedDict):
    return collections.OrderedDict((k, _resolve(v)) for k, v in obj.items())
  if isinstance(obj, dict):
    return {k: _resolve(v) for k, v in obj.items()}
  if isinstance(obj, tuple):
    return tuple(_resolve(v) for v in obj)
  if isinstance(obj, list):
    return [_resolve(v) for v in obj]
  return obj


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a PyTorch ``.pth`` state dict into NumPy arrays, without torch.

  Args:
    path: a file written by ``torch.save(model.state_dict(), path)`` (zip or
      legacy layout). A checkpoint wrapping the state dict under a
      ``'state_dict'`` key is unwrapped.

  Returns:
    An ordered ``{name: np.ndarray}`` dict (arrays are copies, in the
    checkpoint's dtype and shape).

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    pickle.UnpicklingError: if the file needs anything but plain tensors.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(path)
  obj = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
  if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
  return collections.OrderedDict((k, np.asarray(v)) for k, v in obj.items() if isinstance(v, np.ndarray))


# ----------------------------------------------------------------------------
# Writer: used by tests to produce torch-loadable state dicts without torch.


class _StorageRef:
  def __init__(self, key: str, storage_name: str, numel: int):
    self.key, self.storage_name, self.numel = key, storage_name, numel


class _TensorRef:
  def __init__(self, storage: _StorageRef, shape: tuple):
    self.storage, self.shape = storage, shape


def save_state_dict(state: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
  """Writes ``{name: array}`` as a torch-loadable zip ``.pth`` (no torch needed).

  The file is what ``torch.save(state_dict)`` writes for contiguous CPU
  tensors, so both ``torch.load`` and :func:`load_state_dict` read it.

  Args:
    state: names to NumPy arrays (float32/float64/int64/... , any shape).
    path: output file path.
  """
  tensors = collections.OrderedDict()
  blobs = {}
  for i, (name, value) in enumerate(state.items()):
    arr = np.array(value, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
    dtype = arr.dtype.newbyteorder("<") if arr.dtype.itemsize > 1 else arr.dtype
    arr = arr.astype(dtype, copy=False)
    sname = _DTYPE_TO_STORAGE.get(np.dtype(dtype))
    if sname is None:
      raise ValueError(f"state[{name!r}]: unsupported dtype {arr.dtype}")
    key = str(i)
    blobs[key] = arr.tobytes()
    tensors[name] = _TensorRef(_StorageRef(key, sname, arr.size), arr.shape)

  buf = io.BytesIO()
  _write_pickle(buf, tensors)
  root = "archive"
  with zipfile.ZipFile(os.fspath(path), "w", zipfile.ZIP_STORED) as zf:
    zf.writestr(f"{root}/data.pkl", buf.getvalue())
    zf.writestr(f"{root}/byteorder", "little")
    for key, blob in blobs.items():
      zf.writestr(f"{root}/data/{key}", blob)
    zf.writestr(f"{root}/version", "3\n")


def _write_pickle(buf: io.BytesIO, tensors: Mapping[str, _TensorRef]) -> None:
  """Emits the state-dict pickle by hand-crafted opcodes (protocol 2).

  Python's pickler would pickle our stand-in classes under *their* names; the
  file must instead reference ``torch._utils._rebuild_tensor_v2`` and
  ``torch.FloatStorage`` etc., so the few opcodes needed are written directly.
  """
  out = buf

  def global_(module: str, name: str) -> None:
    out.write(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

  def string(s: str) -> None:
    b = s.encode("utf-8")
    out.write(b"X" + struct.pack("<I", len(b)) + b)

  def integer(v: int) -> None:
    out.write(b"\x8a" + bytes([8]) + struct.pack("<q", int(v)))

  def tuple_(items) -> None:
    out.write(b"(")
    for it in items:
      integer(it)
    out.write(b"t")

  out.write(b"\x80\x02")
  global_("collections", "OrderedDict")
  out.write(b")R")  # EMPTY_TUPLE, REDUCE -> OrderedDict()
  for name, ref in tensors.items():
    string(name)
    shape = tuple(int(s) for s in ref.shape)
    stride, acc = [], 1
    for s in reversed(shape):
      stride.append(acc)
      acc *= s
    stride = tuple(reversed(stride))
    global_("torch._utils", "_rebuild_tensor_v2")
    out.write(b"(")  # MARK for the args tuple
    # persistent id tuple: ('storage', torch.XStorage, key, 'cpu', numel)
    out.write(b"(")
    string("storage")
    global_("torch", ref.storage.storage_name)
    string(ref.storage.key)
    string("cpu")
    integer(ref.storage.numel)
    out.write(b"tQ")  # TUPLE, BINPERSID
    integer(0)
    tuple_(shape)
    tuple_(stride)
    out.write(b"\x89")  # NEWFALSE (requires_grad)
    global_("collections", "OrderedDict")
    out.write(b")R")  # backward hooks: OrderedDict()
    out.write(b"tR")  # TUPLE, REDUCE -> tensor
    out.write(b"s")  # SETITEM into the dict
  out.write(b".")
