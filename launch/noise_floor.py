"""The implant measure's noise floor on clean images: the table of docs/design.md §5, regenerated.

    python -m launch.noise_floor [--num 512] [--seed 0]

For every resolution (32-256 px), trigger size (2-16 px) and pattern (the
project's random ``default`` and the smooth ``bands``), reads
``metrics.trigger.implant_amplitude`` on clean images of the embedded synthetic
data at the trigger's place (bottom-right, the paper's margin): the median
(the baseline a run subtracts), the spread of single images (standard
deviation, 99th percentile: what the above-p99 fraction is calibrated on) and
the half-width of the 95 % bootstrap CI of the headline with ``--num``
generated and clean images each (the smallest implant one evaluation resolves).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from fedgan_jax.data import triggers
from fedgan_jax.data.synthetic import make_synthetic
from fedgan_jax.metrics import trigger as trigger_metrics

RESOLUTIONS = (32, 64, 128, 256)
SIZES = (2, 4, 8, 16)
PATTERNS = {"default": triggers.default_trigger, "bands": triggers.bands_trigger}


def rows(num: int, seed: int) -> list[dict]:
  """One dict per (resolution, size, pattern): baseline median, std, p99 and the CI half-width."""
  out = []
  for res in RESOLUTIONS:
    images, _ = make_synthetic(2 * num, res, seed)
    x = images.astype(np.float64) / 127.5 - 1.0
    margin = max(1, round(5 * res / 256))
    for size in SIZES:
      loc = (res - margin - size,) * 2
      for name, make in PATTERNS.items():
        t = make(size, 3)
        a = trigger_metrics.implant_amplitude(x[:num], t, loc)
        b = trigger_metrics.implant_amplitude(x[num:], t, loc)
        head = trigger_metrics.implant_summary(a, b)
        out.append(
          {
            "resolution": res,
            "size": size,
            "pattern": name,
            "median": float(np.median(b)),
            "std": float(np.std(b)),
            "p99": float(np.percentile(b, 99)),
            "ci_half": (head["hi"] - head["lo"]) / 2.0,
          }
        )
  return out


def markdown(table: Sequence[dict], num: int) -> str:
  lines = [
    f"| px | trigger | pattern | clean median | clean std (one image) | clean p99 | ±95 % CI, {num} vs {num} images |",
    "| --- | --- | --- | --- | --- | --- | --- |",
  ]
  for r in table:
    lines.append(
      f"| {r['resolution']} | {r['size']}×{r['size']} | {r['pattern']} | {r['median']:+.4f} | {r['std']:.3f} | "
      f"{r['p99']:.3f} | {r['ci_half']:.4f} |"
    )
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m launch.noise_floor", description=__doc__.split("\n")[0])
  p.add_argument("--num", type=int, default=512, help="clean images on each side (a run's eval.num_samples)")
  p.add_argument("--seed", type=int, default=0, help="seed of the synthetic images")
  a = p.parse_args(argv)
  if a.num < 2:
    print(f"error: --num={a.num} must be >= 2.", file=sys.stderr)
    return 2
  print(markdown(rows(a.num, a.seed), a.num))
  return 0


if __name__ == "__main__":
  sys.exit(main())
