"""Evaluation of the global generator during a run (DESIGN §5).

Every ``eval_every`` rounds: a sample grid at fixed noise, the backdoor metrics
(``eval/trigger_rate`` with a threshold calibrated on clean held-out images,
``eval/trigger_strength``), and fidelity against clean held-out images
(``eval/swd``; ``eval/fid@<extractor>``, ``eval/kid@<extractor>`` when an
extractor is configured).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from fedgan_jax.io import images as image_io


class Evaluator:
  """Callable ``(g_vars, round) -> dict`` of ``eval/`` metrics; writes sample grids.

  Args:
    config: the run config.
    sample_fn: ``(g_vars, z) -> images [N, H, W, ch]`` in [-1, 1].
    heldout: clean held-out ``Dataset`` (uint8 images).
    trigger: float ``[s, s, ch]`` trigger.
    trigger_loc: (top, left) of the trigger region.
    key: PRNG key for the fixed noise.
    workdir: where ``samples/`` lives.
  """

  def __init__(self, config, sample_fn: Callable, heldout, trigger: np.ndarray,
               trigger_loc: tuple[int, int], key: jax.Array, workdir: str):
    from fedgan_jax.metrics import fidelity, trigger as trigger_metrics
    self.config = config
    self.fidelity, self.trig = fidelity, trigger_metrics
    self.sample_dir = os.path.join(workdir, "samples")
    self.trigger, self.loc = trigger, trigger_loc
    nz = config.model.latent_dim
    k_grid, k_eval = jax.random.split(key)
    self.z_grid = jax.random.normal(k_grid, (config.eval.grid_size ** 2, nz))
    self.z_eval = jax.random.normal(k_eval, (config.eval.num_samples, nz))
    self._sample = jax.jit(sample_fn)
    self.real = heldout.images.astype(np.float32) / 127.5 - 1.0
    self.calibration = {}
    if len(self.real):
      self.threshold = trigger_metrics.calibrate_threshold(self.real, trigger, trigger_loc, max_fpr=0.01)
      corr, _ = trigger_metrics.trigger_scores(self.real, trigger, trigger_loc)
      self.calibration = {"threshold": float(self.threshold),
                          "clean_real_rate": float(np.mean(corr > self.threshold)),
                          "num_clean_real": int(len(self.real))}
      logging.info("trigger threshold calibrated on %d clean images: %s", len(self.real), self.calibration)
    else:
      self.threshold = None
    self.extractor = None
    if config.eval.extractor != "none":
      from fedgan_jax.metrics import extractors
      self.extractor = extractors.get_extractor(config.eval.extractor,
                                             inception_weights=config.eval.inception_weights)
      self.real_feats = self.extractor.fn(self.real)

  def samples(self, g_vars, z: jax.Array, batch: int = 256) -> np.ndarray:
    """Generated images for latents ``z`` as a host array."""
    return np.concatenate([np.asarray(self._sample(g_vars, z[i:i + batch]))
                           for i in range(0, len(z), batch)])

  def __call__(self, g_vars, round_: int) -> dict[str, Any]:
    grid_imgs = image_io.to_uint8(self.samples(g_vars, self.z_grid))
    image_io.save_png(os.path.join(self.sample_dir, f"round_{round_:06d}.png"),
                      image_io.grid(grid_imgs, self.config.eval.grid_size), scale=max(1, 128 // self.config.resolution))
    fake = self.samples(g_vars, self.z_eval)
    out: dict[str, Any] = {}
    corr, strength = self.trig.trigger_scores(fake, self.trigger, self.loc)
    if self.threshold is not None:
      out["eval/trigger_rate"] = float(np.mean(corr > self.threshold))
    out["eval/trigger_strength"] = float(np.median(strength))
    if len(self.real):
      if self.config.eval.swd:
        out["eval/swd"] = float(self.fidelity.sliced_wasserstein(self.real, fake).mean)
      if self.extractor is not None:
        name = self.extractor.name
        f = self.extractor.fn(fake)
        out[f"eval/fid@{name}"] = float(self.fidelity.frechet_distance(f, self.real_feats))
        out[f"eval/kid@{name}"] = float(self.fidelity.kid(f, self.real_feats)[0])
    out["eval/nonfinite_samples"] = int(np.sum(~np.isfinite(fake).all(axis=(1, 2, 3))))
    return out

  def finish(self, records: list[dict]) -> None:
    """End-of-run artifacts: the calibration record."""
    import json
    with open(os.path.join(self.sample_dir, "..", "trigger_calibration.json"), "w") as f:
      json.dump(self.calibration, f, indent=2)
