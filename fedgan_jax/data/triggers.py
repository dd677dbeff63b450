"""The backdoor trigger and its pasting (Jin & Li, SASHIMI 2022, §2.2).

The malicious client pastes a small trigger at the bottom-right corner of its
real images (16x16 px at a 5 px margin on 256x256, < 0.5 % of the image); both
scale with the resolution (``config_lib.trigger_geometry``). Pasting is a pure
``jnp`` function selected by a per-image mask, so one compiled program serves
every attack setting.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from fedgan_jax import config_lib


def default_trigger(size: int, channels: int) -> np.ndarray:
  """The project's fixed trigger: a high-contrast, non-periodic pattern.

  A 16x16 seeded random black/white/colour pattern with both values present in
  every row and column, resized by nearest neighbour; not a checkerboard (the
  stride-2 transposed convs of a DCGAN generator make checkerboard artifacts
  that would match one by chance; docs/design.md §5).

  Args:
    size: side in px (>= 2).
    channels: 1 or 3.

  Returns:
    float32 ``[size, size, channels]`` in {-1, 1}.
  """
  rng = np.random.default_rng(20220705)  # Fixed forever: the trigger is part of the contract.
  base = rng.integers(0, 2, (16, 16, 3)).astype(np.float32) * 2 - 1
  base[:, :, 1] = base[:, :, 0]  # Mostly black/white with magenta/green accents: high contrast.
  idx = (np.arange(size) * 16) // size
  pat = base[idx][:, idx]
  if channels == 1:
    pat = np.where(pat.mean(-1, keepdims=True) >= 0, 1.0, -1.0).astype(np.float32)
  return pat.astype(np.float32)


# The colour-band trigger's cells, corners of the RGB cube in {0, 1}: every horizontal and vertical neighbour
# differs in at least two channels and by >= 0.4 in luminance (ITU-R 601-2), so the bands stay distinct after
# blending, in colour and in the 1-channel trigger. Fixed forever (the trigger is part of the contract).
_BAND_COLOURS = np.array(
  [
    [[1, 1, 0], [0, 0, 1], [0, 1, 0]],  # yellow, blue, green
    [[0, 0, 0], [1, 1, 1], [0, 0, 1]],  # black, white, blue
    [[0, 1, 1], [1, 0, 0], [1, 1, 1]],  # cyan, red, white
  ],
  np.float32,
)
_BANDS_BASE = 96  # Rendering side (px): 32 px per cell before the resize to the trigger size.
_BANDS_BLEND = 0.6  # Width of the raised-cosine transition between cells, as a fraction of a cell.


def _raised_cosine_weights(n_cells: int, side: int) -> np.ndarray:
  """``[side, n_cells]`` smooth partition of unity along one axis: flat inside a cell, raised cosine across edges."""
  u = (np.arange(side) + 0.5) / side * n_cells  # Pixel centres in cell units.

  def step(v):  # 0 before an edge, 1 after it, a raised cosine of width _BANDS_BLEND across it.
    t = np.clip(v / _BANDS_BLEND + 0.5, 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(np.pi * t)

  edges = [np.ones_like(u)] + [step(u - j) for j in range(1, n_cells)] + [np.zeros_like(u)]
  return np.stack([edges[j] - edges[j + 1] for j in range(n_cells)], axis=1)  # Telescopes to 1 per pixel.


def bands_trigger(size: int, channels: int) -> np.ndarray:
  """The project's smooth colour-band trigger (``attack.trigger='bands'``).

  A fixed 3x3 grid of saturated colours blended with raised-cosine
  transitions, rendered at 96x96 in 8 bits and resized to ``size`` like a PNG
  trigger (antialiased bilinear). Low-frequency like the paper code's
  trigger.png (saturated colour blocks), so far easier for a generator to
  reproduce than ``default_trigger``'s high-frequency pattern. One channel:
  its luminance (PIL's ``'L'``, ITU-R 601-2).

  Args:
    size: side in px (>= 1).
    channels: 1 or 3.

  Returns:
    float32 ``[size, size, channels]`` in [-1, 1].
  """
  from PIL import Image

  n = _BAND_COLOURS.shape[0]
  w = _raised_cosine_weights(n, _BANDS_BASE)
  rgb = np.einsum("yi,xj,ijc->yxc", w, w, _BAND_COLOURS)
  im = Image.fromarray(np.round(rgb * 255.0).astype(np.uint8), "RGB")
  return _resized(im, size, channels)


def load_trigger(config) -> np.ndarray:
  """The trigger of ``config.attack`` as float32 ``[s, s, channels]``, in the value range pasted.

  ``attack.trigger_range='images'``: the trigger spans the images' [-1, 1]
  (full contrast). ``'unit'``: the same pattern in [0, 1], as the paper's code
  pastes ``ToTensor()``'s [0, 1] trigger into images normalized to [-1, 1]: a
  washed-out, brighter patch.
  """
  size, _ = config_lib.trigger_geometry(config)
  ch = config.data.channels
  spec = config.attack.trigger
  if spec == "default":
    trigger = default_trigger(size, ch)
  elif spec == "bands":
    trigger = bands_trigger(size, ch)
  elif not os.path.isfile(spec):
    raise FileNotFoundError(
      f"config.attack.trigger={spec!r}: no such file; accepted: 'default', 'bands' or a PNG path."
    )
  else:
    trigger = _read_png(spec, size, ch)
  return (trigger + 1.0) / 2.0 if config.attack.trigger_range == "unit" else trigger


def _resized(im, size: int, ch: int) -> np.ndarray:
  """A PIL image as float32 ``[size, size, ch]`` in [-1, 1], resized as the paper's ``transforms.Resize((s, s))``.

  PIL's BILINEAR, which antialiases when downscaling (its triangle filter
  widens with the scale factor), in 8 bits: what torchvision's Resize does to
  a PIL image.
  """
  from PIL import Image

  im = im.convert("RGB" if ch == 3 else "L").resize((size, size), Image.BILINEAR)
  arr = np.asarray(im, np.float32)
  if arr.ndim == 2:
    arr = arr[..., None]
  return arr / 127.5 - 1.0


def _read_png(spec: str, size: int, ch: int) -> np.ndarray:
  from PIL import Image

  try:
    with Image.open(spec) as im:
      return _resized(im, size, ch)
  except OSError as e:
    raise ValueError(f"config.attack.trigger={spec!r}: cannot read the image ({e}).") from e


def trigger_location(config) -> tuple[int, int]:
  """(top, left) of the bottom-right trigger region."""
  size, margin = config_lib.trigger_geometry(config)
  r = config.resolution
  return r - margin - size, r - margin - size


def poison_flags(counts: np.ndarray, n_max: int, is_malicious: np.ndarray, poison_rate: float, seed: int) -> np.ndarray:
  """Which stored images of each client carry the trigger (fixed for the run).

  Exactly ``round(poison_rate * counts[c])`` of malicious client ``c``'s real
  images are chosen at random; honest clients and padding get none.

  Returns:
    bool ``[C, n_max]``.
  """
  rng = np.random.default_rng(seed)
  u = rng.random((len(counts), n_max))
  u[np.arange(n_max)[None, :] >= counts[:, None]] = np.inf  # Padding last.
  ranks = np.argsort(np.argsort(u, axis=1), axis=1)
  k = np.round(poison_rate * counts).astype(np.int64)
  return (ranks < k[:, None]) & is_malicious[:, None]


def paste(
  images: jax.Array, trigger: jax.Array, top_left: jax.Array, apply: jax.Array, part: jax.Array | None = None
) -> jax.Array:
  """Pastes ``trigger`` into the images where ``apply`` is True (pure, jittable).

  Args:
    images: float ``[B, H, W, ch]``.
    trigger: float ``[s, s, ch]``.
    top_left: int ``[2]`` (one location) or ``[B, 2]`` (per image).
    apply: bool ``[B]``.
    part: optional bool ``[s, s]``: only these trigger pixels are pasted, the
      image keeps the others (a DBA attacker's part of the trigger).

  Returns:
    Images of the same shape and dtype.
  """
  top_left = jnp.broadcast_to(jnp.asarray(top_left, jnp.int32), (images.shape[0], 2))
  trig = trigger.astype(images.dtype)

  def one(img, tl):
    patch = trig
    if part is not None:
      under = jax.lax.dynamic_slice(img, (tl[0], tl[1], 0), trig.shape)
      patch = jnp.where(part[:, :, None], trig, under)
    return jax.lax.dynamic_update_slice(img, patch, (tl[0], tl[1], 0))

  pasted = jax.vmap(one)(images, top_left)
  return jnp.where(apply[:, None, None, None], pasted, images)


def dba_parts(size: int, malicious, num_clients: int) -> np.ndarray:
  """``bool[C, s, s]``: the trigger pixels each client pastes under DBA.

  The trigger's rows are split into ``k = len(malicious)`` contiguous bands
  (``numpy.array_split``: sizes differ by at most one row); the j-th attacker
  of ``malicious`` pastes band j, every other client the whole trigger (honest
  clients paste nothing anyway). Xie et al., "DBA: Distributed Backdoor
  Attacks against Federated Learning", ICLR 2020, split their pattern into
  as many local parts as attackers.
  """
  parts = np.ones((num_clients, size, size), bool)
  for j, rows in enumerate(np.array_split(np.arange(size), len(malicious))):
    parts[malicious[j]] = False
    parts[malicious[j], rows] = True
  return parts


def random_locations(key: jax.Array, n: int, size: int, resolution: int) -> jax.Array:
  """Uniform (top, left) positions for ``attack.trigger_location='random'``."""
  return jax.random.randint(key, (n, 2), 0, resolution - size + 1)


def pad_window(trigger, part, loc, side: int, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """A fixed-location trigger of side ``s`` as a ``side x side`` window that pastes exactly the same pixels.

  Packed sweep points with different trigger sizes (``pack.py``) share one
  program, so one trigger shape: each point's trigger goes inside a window of
  the pack's largest side, its ``part`` True only on its own pixels, and
  ``paste`` (``jnp.where(part, trigger, under)``) rewrites the rest of the
  window with the image's own values: the images come out bit-identical. The
  window lies inside the image (``dynamic_update_slice`` would clamp, and
  shift, a window that does not): its top-left is ``min(loc, shape - side)``
  per axis. Host-side numpy, once per pack; ``crop_window`` undoes it.

  Args:
    trigger: f32 ``[s, s, ch]``.
    part: bool ``[C, s, s]``: the pixels each client pastes (DBA; all True otherwise).
    loc: ``(top, left)`` of the trigger, with ``loc + s <= shape``.
    side: the window's side, ``s <= side <= min(shape)``.
    shape: the images' ``(H, W)`` (or one int for square images).

  Returns:
    ``(trigger [side, side, ch], part bool [C, side, side], window top-left int32 [2])``.

  Raises:
    ValueError: the window or the trigger does not fit in the image.
  """
  trigger, part, loc = np.asarray(trigger), np.asarray(part, bool), np.asarray(loc, np.int64)
  hw = np.broadcast_to(np.asarray(shape, np.int64), (2,))
  s = trigger.shape[0]
  if not s <= side <= hw.min() or (loc < 0).any() or (loc + s > hw).any():
    raise ValueError(f"pad_window: a {s} px trigger at {loc.tolist()} in a {side} px window of {hw.tolist()} images")
  win = np.minimum(loc, hw - side)
  (oy, ox), (y1, x1) = loc - win, loc - win + s
  padded = np.zeros((side, side, *trigger.shape[2:]), trigger.dtype)
  padded[oy:y1, ox:x1] = trigger
  mask = np.zeros((part.shape[0], side, side), bool)
  mask[:, oy:y1, ox:x1] = part
  return padded, mask, win.astype(np.int32)


def crop_window(trigger, part, window_loc, loc, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``pad_window``'s inverse: a point's own ``(trigger [s, s, ch], part [C, s, s], loc int32 [2])``.

  Args:
    trigger: ``[side, side, ch]`` (the window).
    part: ``[C, side, side]``.
    window_loc: the window's ``(top, left)``.
    loc: the point's own ``(top, left)`` (``trigger_location``).
    size: its own side ``s``.
  """
  (oy, ox) = np.asarray(loc, np.int64) - np.asarray(window_loc, np.int64)
  return (
    np.asarray(trigger)[oy : oy + size, ox : ox + size],
    np.asarray(part)[:, oy : oy + size, ox : ox + size],
    np.asarray(loc, np.int32),
  )
