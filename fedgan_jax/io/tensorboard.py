"""TensorBoard event files without TensorFlow.

Uses the ``tensorboard`` pip package's own event writer and protos
(``tensorboard.summary.writer.event_file_writer.EventFileWriter``,
``tensorboard.compat.proto``), imported lazily. Without ``tensorboard``
installed the writer is a no-op that logs once how to enable it::

    pip install -e ".[tensorboard]"

Typical use, beside ``metrics.jsonl``::

    tb = TensorBoardWriter(os.path.join(workdir, "tb"))
    tb.scalars(round_, record)          # per-client lists -> name/client_k
    tb.image(round_, "samples", grid)   # uint8 [H, W, ch]
    tb.close()

On resume, ``TensorBoardWriter(logdir, keep_until=round)`` cuts the run's
history back to the restored checkpoint: the events of earlier files up to
that round are copied into the new file and the old files removed, so
TensorBoard never shows a round twice.
"""

from __future__ import annotations

import glob
import io
import math
import numbers
import os
import struct
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

_WARNED = False
INSTALL_HINT = 'pip install -e ".[tensorboard]"'


def _warn_once(reason: str) -> None:
  global _WARNED
  if not _WARNED:
    _WARNED = True
    logging.warning("TensorBoard logging disabled (%s); enable it with: %s", reason, INSTALL_HINT)


def _flatten_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
  """``{name: scalar | [C] list}`` -> ``{tag: float}``; skips None/NaN/non-numeric values.

  Per-client lists become ``name/client_k``; booleans become 0/1.

  Args:
    metrics: One round's record (as written to ``metrics.jsonl``) or any dict.

  Returns:
    Finite float scalars by tag (the ``round`` key is dropped: it is the step).
  """
  out: dict[str, float] = {}

  def put(tag: str, v: Any) -> None:
    if v is None or isinstance(v, str):
      return
    if isinstance(v, (bool, np.bool_)):
      out[tag] = float(v)
      return
    if isinstance(v, numbers.Number) or (isinstance(v, np.ndarray) and v.ndim == 0) or isinstance(v, np.generic):
      try:
        f = float(v)
      except (TypeError, ValueError):
        return
      if math.isfinite(f):
        out[tag] = f

  for name, v in metrics.items():
    if name == "round":
      continue
    if hasattr(v, "__array__") and not isinstance(v, np.ndarray):
      v = np.asarray(v)  # jax arrays
    if isinstance(v, np.ndarray) and v.ndim > 0:
      v = v.tolist()
    if isinstance(v, (list, tuple)):
      for k, x in enumerate(v):
        if isinstance(x, (list, tuple)):
          continue  # Deeper nesting has no TensorBoard scalar form.
        put(f"{name}/client_{k}", x)
    else:
      put(name, v)
  return out


def _encode_png(image: np.ndarray) -> tuple[bytes, int, int, int]:
  from PIL import Image  # pylint: disable=import-outside-toplevel

  a = np.asarray(image)
  if a.dtype != np.uint8:
    raise ValueError(f"TensorBoardWriter.image expects a uint8 [H, W, ch] array, got dtype {a.dtype}.")
  if a.ndim == 2:
    a = a[..., None]
  if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
    raise ValueError(f"TensorBoardWriter.image expects [H, W, ch] with ch in 1/3/4, got shape {a.shape}.")
  h, w, ch = a.shape
  buf = io.BytesIO()
  Image.fromarray(a[..., 0] if ch == 1 else a).save(buf, format="PNG")
  return buf.getvalue(), h, w, ch


def _records(path: str):
  """The payloads of a TFRecord file; a torn last record (a killed writer) ends the file."""
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos + 12 <= len(data):
    (length,) = struct.unpack("<Q", data[pos : pos + 8])
    end = pos + 12 + length + 4  # length, its CRC, payload, its CRC.
    if end > len(data):
      return
    yield data[pos + 12 : pos + 12 + length]
    pos = end


def event_files(logdir: str) -> list[str]:
  """The event files in ``logdir``, oldest first (their names start with the creation time)."""
  return sorted(glob.glob(os.path.join(glob.escape(logdir), "events.out.tfevents.*")))


def read_events(logdir: str) -> list:
  """Every ``Event`` proto in ``logdir``'s event files, in file order (needs ``tensorboard``)."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=import-outside-toplevel

  events = []
  for path in event_files(logdir):
    for payload in _records(path):
      try:
        events.append(event_pb2.Event.FromString(payload))
      except Exception:  # pylint: disable=broad-except
        break  # A damaged record: what follows it cannot be trusted.
  return events


class TensorBoardWriter:
  """Scalars and images as TensorBoard event files, no TensorFlow needed.

  A no-op (logging one warning) when the ``tensorboard`` package is missing.

  Attributes:
    logdir: Directory the event file is written into.
    enabled: Whether events are actually written.
  """

  def __init__(self, logdir: str, flush_secs: int = 30, active: bool = True, keep_until: int | None = None):
    """Opens an event file in ``logdir`` (created if needed).

    Args:
      logdir: Output directory, e.g. ``<workdir>/tb``.
      flush_secs: Background flush interval of the underlying writer.
      active: False makes a silent no-op writer (non-primary processes).
      keep_until: on resume, the restored round: earlier event files are cut
        back to the steps ``<= keep_until`` (copied into the new file, each
        step and tag once) and removed. None leaves existing files alone.
    """
    self.logdir = logdir
    self._writer = None
    self._pb = None
    if not active:
      return
    try:
      # pylint: disable=import-outside-toplevel
      from tensorboard.compat.proto import event_pb2, summary_pb2
      from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError as e:
      _warn_once(f"the 'tensorboard' package is not importable: {e}")
      return
    self._pb = (event_pb2, summary_pb2)
    old = event_files(logdir) if keep_until is not None else []
    kept = self._history(logdir, keep_until) if old else []
    self._writer = EventFileWriter(logdir, flush_secs=flush_secs)
    if old:
      for event in kept:
        self._writer.add_event(event)
      self._writer.flush()  # The copy is on disk before the originals go.
      for path in old:
        os.remove(path)

  @staticmethod
  def _history(logdir: str, keep_until: int) -> list:
    """The events of ``logdir`` with a step ``<= keep_until``, each (step, tags) once."""
    seen, kept = set(), []
    for event in read_events(logdir):
      if not event.HasField("summary") or event.step > keep_until:
        continue  # File-version headers are rewritten by the new file; later steps are redone.
      key = (event.step, tuple(v.tag for v in event.summary.value))
      if key not in seen:  # A copy left by a run killed between copying and removing.
        seen.add(key)
        kept.append(event)
    return kept

  @property
  def enabled(self) -> bool:
    return self._writer is not None

  def _add(self, step: int, values: list) -> None:
    event_pb2, summary_pb2 = self._pb
    event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values))
    self._writer.add_event(event)

  def scalars(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Writes every finite scalar of ``metrics`` at ``step``.

    Args:
      step: The round.
      metrics: ``{name: scalar | [C] list}``; lists become ``name/client_k``;
        None/NaN/Inf and strings are skipped, booleans written as 0/1.
    """
    if not self.enabled:
      return
    _, summary_pb2 = self._pb
    values = [summary_pb2.Summary.Value(tag=tag, simple_value=v) for tag, v in _flatten_scalars(metrics).items()]
    if values:
      self._add(step, values)

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    """Writes one image (PNG-encoded ``Summary.Image``) at ``step``.

    Args:
      step: The round.
      tag: Image tag, e.g. ``"samples"``.
      image: uint8 ``[H, W, ch]`` (ch 1, 3 or 4) or ``[H, W]``.
    """
    if not self.enabled:
      return
    _, summary_pb2 = self._pb
    png, h, w, ch = _encode_png(image)
    img = summary_pb2.Summary.Image(height=h, width=w, colorspace=ch, encoded_image_string=png)
    self._add(step, [summary_pb2.Summary.Value(tag=tag, image=img)])

  def flush(self) -> None:
    """Writes pending events to disk."""
    if self.enabled:
      self._writer.flush()

  def close(self) -> None:
    """Flushes and closes the event file (further calls are no-ops)."""
    if self.enabled:
      self._writer.close()
      self._writer = None

  def __enter__(self) -> TensorBoardWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
