"""Matplotlib helpers shared by the run figures and the sweep figure.

Figures are drawn with matplotlib's object-oriented API on the Agg canvas
(``matplotlib.figure.Figure``), so drawing inside another program (or a
notebook) never touches the global pyplot backend. matplotlib is imported
inside the functions so that importing the report package (the sweep runner
does, for its results table) stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

ATTACKER_COLOR = "#d62728"
HONEST_COLORS = [
  "#1f77b4",
  "#ff7f0e",
  "#2ca02c",
  "#9467bd",
  "#8c564b",
  "#e377c2",
  "#7f7f7f",
  "#bcbd22",
  "#17becf",
]  # tab10 without its red.
MANY_HONEST_COLOR = "#4a6fa5"


def figure(width: float, height: float):
  """A new constrained-layout ``Figure`` of ``width`` x ``height`` inches (no pyplot)."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  return Figure(figsize=(width, height), layout="constrained")


def save(fig, path: str, dpi: int = 110, tight: bool = False) -> str:
  """Writes ``fig`` to ``path`` and returns ``path``."""
  fig.savefig(path, dpi=dpi, **({"bbox_inches": "tight", "pad_inches": 0.05} if tight else {}))
  return path


def marker_for(values: np.ndarray, default: str | None = None) -> str | None:
  """``default``, or ``"o"`` when some finite value has no finite neighbour.

  A line needs two points: a metric evaluated once (or a per-client value
  between nulls) would otherwise leave an empty-looking axis.
  """
  finite = np.isfinite(np.asarray(values, float))
  left = np.concatenate([[False], finite[:-1]])
  right = np.concatenate([finite[1:], [False]])
  return "o" if (finite & ~left & ~right).any() else default


def client_styles(num_clients: int, malicious: Sequence[int]) -> list[dict[str, Any]]:
  """Line style per client: attackers red and thick, honest clients coloured (or grey when many)."""
  honest = [c for c in range(num_clients) if c not in malicious]
  many = len(honest) > len(HONEST_COLORS)
  styles = []
  for c in range(num_clients):
    if c in malicious:
      styles.append(dict(color=ATTACKER_COLOR, lw=2.2, zorder=3, alpha=1.0, label=f"client {c} (attacker)"))
    elif many:
      styles.append(
        dict(
          color=MANY_HONEST_COLOR,
          lw=0.8,
          zorder=2,
          alpha=0.35,
          label=f"honest clients ({len(honest)})" if c == honest[0] else None,
        )
      )
    else:
      styles.append(dict(color=HONEST_COLORS[honest.index(c)], lw=1.2, zorder=2, alpha=0.9, label=f"client {c}"))
  return styles


def edges(x: np.ndarray) -> np.ndarray:
  """Cell edges around sorted centres (rounds) for pcolormesh."""
  if len(x) == 1:
    return np.array([x[0] - 0.5, x[0] + 0.5])
  mid = (x[1:] + x[:-1]) / 2
  return np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])


def client_axis(ax, num_clients: int, malicious: Sequence[int]) -> None:
  """Y ticks 'client k', attackers in red bold; thinned when there are many clients."""
  step = 1 if num_clients <= 16 else int(math.ceil(num_clients / 16))
  regular = [c for c in range(0, num_clients, step) if all(abs(c - m) * 2 >= step for m in malicious)]
  ticks = sorted(set(regular) | set(malicious))  # Attackers always labelled, neighbours thinned out.
  ax.set_yticks(ticks)
  labels = [f"client {c}" + (" (attacker)" if c in malicious else "") for c in ticks]
  ax.set_yticklabels(labels, fontsize=8 if num_clients <= 32 else 6)
  for lbl, c in zip(ax.get_yticklabels(), ticks):
    if c in malicious:
      lbl.set_color(ATTACKER_COLOR)
      lbl.set_fontweight("bold")
  ax.set_ylim(num_clients - 0.5, -0.5)


def mark_attacker_rows(ax, x_edges: np.ndarray, malicious: Sequence[int]) -> None:
  """Outlines the heatmap rows of the attackers in red."""
  from matplotlib.patches import Rectangle  # pylint: disable=import-outside-toplevel

  for c in malicious:
    ax.add_patch(
      Rectangle(
        (x_edges[0], c - 0.5), x_edges[-1] - x_edges[0], 1.0, fill=False, edgecolor=ATTACKER_COLOR, lw=1.5, zorder=4
      )
    )


def heat_height(num_clients: int) -> float:
  """Height (inches) of a client x round heatmap."""
  return min(max(1.6, 0.22 * num_clients + 1.0), 6.5)


def round_axis(ax, rounds: np.ndarray) -> None:
  """Integer round ticks on the x axis (every round when there are few)."""
  from matplotlib.ticker import MaxNLocator  # pylint: disable=import-outside-toplevel

  if 0 < len(rounds) <= 12:
    ax.set_xticks(rounds)
  else:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=10))
  if len(rounds) == 1:
    ax.set_xlim(rounds[0] - 1, rounds[0] + 1)
