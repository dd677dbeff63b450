"""Sample grids as PNG files."""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 (rounded, clipped)."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def grid(images: np.ndarray, rows: int, pad: int = 2) -> np.ndarray:
  """Tiles ``[N, H, W, ch]`` uint8 images into one ``[rows*(H+pad)+pad, ...]`` image."""
  n, h, w, ch = images.shape
  cols = int(np.ceil(n / rows))
  out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, ch), 255, np.uint8)
  for i in range(n):
    r, c = divmod(i, cols)
    out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = images[i]
  return out


def save_png(path: str, image: np.ndarray, scale: int = 1) -> None:
  """Writes a uint8 ``[H, W, ch]`` image (nearest-neighbour upscaled by ``scale``)."""
  if scale > 1:
    image = image.repeat(scale, 0).repeat(scale, 1)
  if image.shape[-1] == 1:
    image = image[..., 0]
  Image.fromarray(image).save(path)
