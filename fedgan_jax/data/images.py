"""Image conversion: any Pillow image or uint8 array to uint8 ``[R, R, ch]``.

Shared by every source that has to resize or convert:

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

import numpy as np
from PIL import Image

# File types the folder source decodes (matched case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# What a truncated, corrupt or non-image file raises while decoding.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


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


def convert_image(
  img: Image.Image, resolution: int, channels: int, resample: int = Image.Resampling.LANCZOS
) -> np.ndarray:
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


def decode_image(path: str, resolution: int, channels: int) -> np.ndarray:
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


def array_to_image(arr: np.ndarray) -> Image.Image:
  """A uint8 array as a Pillow image.

  Args:
    arr: uint8 ``[H, W]``, ``[H, W, 1]`` or ``[H, W, 3|4]``.

  Returns:
    The image (mode ``'L'``, ``'RGB'`` or ``'RGBA'``).
  """
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[:, :, 0]
  return Image.fromarray(np.ascontiguousarray(arr))


def convert_array_images(images: np.ndarray, resolution: int, channels: int) -> np.ndarray:
  """Converts a stack of uint8 images to ``[N, R, R, channels]``.

  Arrays already at the target size are returned without a per-image pass
  (bit-exact; gray to RGB is a plain channel repeat).

  Args:
    images: uint8 ``[N, H, W]`` or ``[N, H, W, 1|3]``.
    resolution: output side R.
    channels: 3 or 1.

  Returns:
    uint8 ``[N, R, R, channels]``.
  """
  if images.ndim == 3:
    images = images[..., None]
  n, h, w, c = images.shape
  if h == w == resolution and c == channels:
    return np.ascontiguousarray(images)
  if h == w == resolution and c == 1 and channels == 3:
    return np.repeat(images, 3, axis=-1)
  out = np.empty((n, resolution, resolution, channels), np.uint8)
  for i in range(n):
    out[i] = convert_image(array_to_image(images[i]), resolution, channels)
  return out
