"""The sample grids of a run as one strip (PNG) and as an animation (GIF)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedgan_jax.report import draw

MAX_STRIP = 8  # Rounds shown in the strip, evenly spaced over the run.


def _load_grid(path: str):
  from PIL import Image  # pylint: disable=import-outside-toplevel

  with Image.open(path) as im:
    return im.convert("RGB")


def plot_strip(samples: Sequence[tuple[int, str]], path: str) -> str | None:
  """At most ``MAX_STRIP`` sample grids side by side, titled by round.

  Args:
    samples: ``(round, png path)`` by round (``Run.samples()``).
    path: Where the PNG goes.

  Returns:
    ``path``, or None when there are no samples.
  """
  if not samples:
    return None
  idx = np.unique(np.round(np.linspace(0, len(samples) - 1, min(len(samples), MAX_STRIP))).astype(int))
  chosen = [samples[i] for i in idx]
  grids = [np.asarray(_load_grid(p)) for _, p in chosen]
  h, w = grids[0].shape[:2]
  panel_w = 3.0  # inches; the pixel size is set by the dpi below.
  # Each panel at most its native width, the whole strip at most ~2800 px wide.
  panel_px = min(max(min(w, 2800 / len(grids)), 220), 520)
  dpi = max(int(panel_px / panel_w), 60)
  fig = draw.figure(panel_w * len(grids), panel_w * h / w + 0.3)
  axes = np.atleast_1d(fig.subplots(1, len(grids), squeeze=False)).ravel()
  for ax, (r, _), g in zip(axes, chosen, grids):
    ax.imshow(g, interpolation="antialiased")  # Box-filtered when shrunk, nearest when enlarged.
    ax.set_title(f"round {r}", fontsize=9)
    ax.set_axis_off()
  return draw.save(fig, path, dpi=dpi, tight=True)


def write_gif(samples: Sequence[tuple[int, str]], path: str) -> str | None:
  """Every sample grid as one GIF frame, labelled with its round (the last frame held longer).

  Args:
    samples: ``(round, png path)`` by round (``Run.samples()``).
    path: Where the GIF goes.

  Returns:
    ``path``, or None when there are no samples.
  """
  if not samples:
    return None
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=import-outside-toplevel

  first = _load_grid(samples[0][1])
  # Small grids enlarged (nearest) to >= 256 px, large ones shrunk by an integer factor to <= 640 px.
  up = max(1, int(math.ceil(256 / max(min(first.size), 1))))
  down = max(1, int(math.ceil(max(first.size) / 640)))
  size = ((first.size[0] * up) // down, (first.size[1] * up) // down)
  band = 20
  try:
    font = ImageFont.load_default(size=14)
  except TypeError:  # Pillow < 10.1
    font = ImageFont.load_default()
  frames = []
  for r, p in samples:
    g = _load_grid(p)
    if g.size != first.size:
      g = g.resize(first.size, Image.NEAREST)
    g = g.resize(size, Image.NEAREST if down == 1 else Image.BOX)
    frame = Image.new("RGB", (size[0], size[1] + band), "white")
    frame.paste(g, (0, band))
    ImageDraw.Draw(frame).text((4, 2), f"round {r}", fill="black", font=font)
    frames.append(frame)
  durations = [400] * (len(frames) - 1) + [1500]
  frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
  return path
