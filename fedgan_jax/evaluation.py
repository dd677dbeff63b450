"""Evaluation of the global generator during a run (docs/design.md §5).

Every ``eval_every`` rounds (and at the first and last round):

* a sample grid at fixed noise (``samples/round_NNNNNN.png``);
* backdoor success: ``eval/trigger_rate`` (normalized correlation of the
  trigger region with the trigger above a threshold calibrated so that clean
  held-out real images score <= 1 %) and ``eval/trigger_strength`` (median
  regression coefficient of the patch on the trigger: 1 = fully pasted, 0 =
  absent); with ``attack.trigger_location='random'`` also
  ``eval/trigger_rate_any`` (best position anywhere in the image);
* fidelity against clean held-out images: ``eval/swd`` (no network; the real
  side is computed once, and on accelerators it runs on the device) and, in
  the feature space of ``eval.extractor`` every ``eval.fid_every`` rounds (0 =
  final evaluation only), ``eval/fid@<extractor>``, ``eval/kid@<extractor>``,
  ``eval/precision@<extractor>``, ``eval/recall@<extractor>``. Only
  ``fid@inception_v3`` with the reference weights is "FID" in the usual sense.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from fedgan_jax.io import images as image_io
from fedgan_jax.metrics import extractors, fidelity, swd
from fedgan_jax.metrics import trigger as trigger_metrics


class Evaluator:
  """Callable ``(g_vars, round, final) -> dict`` of ``eval/`` metrics; writes sample grids.

  Args:
    config: the run config.
    sample_fn: ``(g_vars, z) -> images [N, H, W, ch]`` in [-1, 1].
    heldout: clean held-out ``Dataset`` (uint8 images).
    trigger: float ``[s, s, ch]`` trigger.
    trigger_loc: (top, left) of the trigger region.
    key: PRNG key for the fixed noise.
    workdir: the run directory.
    poisoned: float images of the malicious clients as they train on them
      (trigger pasted), for the ``trigger_rate_real_poisoned`` sanity check.
    write: save files (False on non-primary processes of a multi-host run).
  """

  def __init__(
    self,
    config,
    sample_fn: Callable,
    heldout,
    trigger: np.ndarray,
    trigger_loc: tuple[int, int],
    key: jax.Array,
    workdir: str,
    poisoned: np.ndarray | None = None,
    write: bool = True,
  ):
    self.config = config
    self.write = write
    self.workdir = workdir
    self.sample_dir = os.path.join(workdir, "samples")
    self.trigger, self.loc = trigger, trigger_loc
    nz = config.model.latent_dim
    k_grid, k_eval = jax.random.split(key)
    self.z_grid = jax.random.normal(k_grid, (config.eval.grid_size**2, nz))
    self.z_eval = jax.random.normal(k_eval, (config.eval.num_samples, nz))
    self._sample = jax.jit(sample_fn)
    self.real = heldout.images.astype(np.float32) / 127.5 - 1.0
    self.random_loc = config.attack.trigger_location == "random"
    self.last_grid: np.ndarray | None = None
    self.threshold = self.threshold_any = None
    self.calibration: dict[str, Any] = {}
    if len(self.real):
      self.threshold = trigger_metrics.calibrate_threshold(self.real, trigger, trigger_loc, max_fpr=0.01)
      corr, strength = trigger_metrics.trigger_scores(self.real, trigger, trigger_loc)
      self.calibration = {
        "threshold": float(self.threshold),
        "max_fpr": 0.01,
        "clean_real_rate": float(np.mean(corr > self.threshold)),
        "clean_real_strength": float(np.median(strength)),
        "num_clean_real": int(len(self.real)),
        "location": list(trigger_loc),
      }
      if self.random_loc:
        self.threshold_any = trigger_metrics.calibrate_threshold(self.real, trigger, "any", max_fpr=0.01)
        self.calibration["threshold_any"] = float(self.threshold_any)
      if poisoned is not None and len(poisoned):
        loc = "any" if self.random_loc else trigger_loc
        thr = self.threshold_any if self.random_loc else self.threshold
        self.calibration["trigger_rate_real_poisoned"] = trigger_metrics.trigger_rate(poisoned, trigger, loc, thr)
      logging.info("trigger threshold calibrated on %d clean held-out images: %s", len(self.real), self.calibration)
    # The real side of the SWD (patch draws, directions, sorted projections) is
    # the same at every evaluation: computed once here. On accelerators the
    # SWD runs on the device (jitted float32), on the samples where they are.
    self.swd_ref = None
    self.swd_backend = "numpy" if jax.default_backend() == "cpu" else "jax"
    if config.eval.swd and len(self.real):
      self.swd_ref = swd.swd_reference(self.real, num_other=config.eval.num_samples, backend=self.swd_backend)
    self.extractor = None
    self._real_feats = None
    if config.eval.extractor != "none" and len(self.real):
      # Built now so a missing weights file fails before training, not at the end.
      self.extractor = extractors.get_extractor(
        config.eval.extractor,
        inception_weights=config.eval.inception_weights,
        effnet_weights=config.eval.effnet_weights,
      )

  def device_samples(self, g_vars, z: jax.Array, batch: int = 256) -> jax.Array:
    """Generated images for latents ``z``, left on the device."""
    parts = [self._sample(g_vars, z[i : i + batch]) for i in range(0, len(z), batch)]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)

  def samples(self, g_vars, z: jax.Array, batch: int = 256) -> np.ndarray:
    """Generated images for latents ``z`` as a host array."""
    return np.asarray(self.device_samples(g_vars, z, batch))

  def __call__(self, g_vars, round_: int, final: bool = False) -> dict[str, Any]:
    grid_imgs = image_io.to_uint8(self.samples(g_vars, self.z_grid))
    self.last_grid = image_io.grid(grid_imgs, self.config.eval.grid_size)
    if self.write:
      image_io.save_png(
        os.path.join(self.sample_dir, f"round_{round_:06d}.png"),
        self.last_grid,
        scale=max(1, 128 // self.config.resolution),
      )
    fake_dev = self.device_samples(g_vars, self.z_eval)
    fake = np.asarray(fake_dev)
    finite = np.isfinite(fake).all(axis=(1, 2, 3))
    out: dict[str, Any] = {"eval/nonfinite_samples": int(np.sum(~finite))}
    fake = np.where(finite[:, None, None, None], fake, 0.0)
    corr, strength = trigger_metrics.trigger_scores(fake, self.trigger, self.loc)
    out["eval/trigger_strength"] = float(np.median(strength))
    if self.threshold is not None:
      out["eval/trigger_rate"] = float(np.mean(corr > self.threshold))
      if self.random_loc:
        out["eval/trigger_rate_any"] = trigger_metrics.trigger_rate(fake, self.trigger, "any", self.threshold_any)
    if len(self.real):
      if self.swd_ref is not None:
        if self.swd_backend == "jax":
          keep = jnp.asarray(finite)[:, None, None, None]
          swd_fake = jnp.where(keep, fake_dev.astype(jnp.float32), 0.0)
        else:
          swd_fake = fake
        out["eval/swd"] = float(self.swd_ref.distance(swd_fake, backend=self.swd_backend).mean)
      every = self.config.eval.fid_every
      if self.extractor is not None and (final or (every and round_ % every == 0)):
        out.update(self.feature_metrics(fake))
    return out

  def feature_metrics(self, fake: np.ndarray) -> dict[str, float]:
    """FD, KID and precision/recall in the extractor's feature space."""
    name = self.extractor.name
    if self._real_feats is None:
      self._real_feats = self.extractor.fn(self.real)
    f = self.extractor.fn(fake)
    precision, recall = fidelity.precision_recall(self._real_feats, f)
    return {
      f"eval/fid@{name}": float(fidelity.frechet_distance(f, self._real_feats)),
      f"eval/kid@{name}": float(fidelity.kid(f, self._real_feats)[0]),
      f"eval/precision@{name}": float(precision),
      f"eval/recall@{name}": float(recall),
    }

  def finish(self) -> None:
    """Writes ``trigger_calibration.json``."""
    if not self.write:
      return
    with open(os.path.join(self.workdir, "trigger_calibration.json"), "w") as f:
      json.dump(self.calibration, f, indent=2)
