"""Mode collapse, measured without a feature network: the spread of generated images against real ones.

``diversity = sqrt(sum_p var_gen(p) / sum_p var_real(p))`` over pixels and
channels ``p``, the variances taken across images. For independent draws
``E|x - y|² = 2 sum_p var(p)``, so it is the ratio of the RMS distance between
two generated images to that between two real ones: 1 = as diverse as the
real images, near 0 = one image for every noise (collapse). It does not say
whether the images are right (that is the fidelity metrics' job), only
whether they differ.
"""

from __future__ import annotations

import numpy as np

__all__ = ["COLLAPSED_BELOW", "collapse_warning", "diversity", "total_variance"]

# Below this the console, the report and the results page say the generator collapsed. Healthy runs of
# the embedded data read 0.6-1.1; the collapsed runs this was written for (one image at every noise) read
# below 0.1.
COLLAPSED_BELOW = 0.25


def total_variance(images) -> float:
  """``sum_p var(p)`` across images, per pixel and channel (float64; images in any one value range).

  Args:
    images: ``[N, H, W, ch]`` with N >= 2.

  Returns:
    The total variance (the real side of :func:`diversity`, computed once per run).
  """
  x = np.asarray(images, np.float64)
  if x.ndim != 4 or x.shape[0] < 2:
    raise ValueError(f"images must be [N >= 2, H, W, ch], got shape {x.shape}")
  return float(np.sum(np.var(x, axis=0)))


def diversity(images, reference) -> float:
  """Spread of ``images`` relative to ``reference`` (see the module docstring).

  Args:
    images: generated ``[N, H, W, ch]``, N >= 2.
    reference: real ``[M, H, W, ch]`` in the same value range, or its
      :func:`total_variance` (a float).

  Returns:
    ``diversity`` >= 0 (NaN if the reference has no spread).
  """
  ref = reference if isinstance(reference, float) else total_variance(reference)
  if ref <= 0.0:
    return float("nan")
  return float(np.sqrt(total_variance(images) / ref))


def collapse_warning(final: dict) -> str | None:
  """One sentence when a run's last ``eval/diversity`` says the generator collapsed, else None.

  Args:
    final: the last value of each metric (``summary.json``'s ``final``).
  """
  d = final.get("eval/diversity")
  if not isinstance(d, (int, float)) or not d < COLLAPSED_BELOW:
    return None
  return (
    f"the generator collapsed: diversity {d:.3f} at round {final.get('round', '?')} (1 = as diverse as the "
    f"real held-out images, below {COLLAPSED_BELOW} = collapsed: its samples are nearly one image)"
  )
