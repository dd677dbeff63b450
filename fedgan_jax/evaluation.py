"""Evaluation of the global generator during a run (docs/design.md §5).

Every ``eval_every`` rounds (and at the first and last round):

* a sample grid at fixed noise (``samples/round_NNNNNN.png``). With
  ``model.conditional`` its row ``i`` shows class ``i % num_classes``, and
  ``samples/class_<k>/round_NNNNNN.png`` is the whole grid (the same noise)
  with class ``k``; every other metric below is computed on samples whose
  labels cycle over the classes (sample ``j`` has class ``j % num_classes``:
  fixed, deterministic, balanced to within one);
* the implant (``metrics.trigger``): ``eval/implant_amplitude``, the median
  per-image amount of the trigger blended into its region (0 = none, 1 =
  pasted) in generated images minus the same on clean held-out real images
  (the template's baseline), with a 95 % bootstrap CI
  (``eval/implant_amplitude_lo`` / ``_hi``), and ``eval/implant_above_p99``,
  the fraction of generated images above the clean images' 99th percentile
  (calibrated on one half of them; ``trigger_calibration.json`` holds its
  false-positive rate on the other half and each template's noise floor).
  ``eval.implant_sizes`` scores further trigger sizes of the same pattern
  (keys suffixed ``@<s>px``), so a clean run is read against every template
  an attack uses. With ``attack.trigger_location='random'`` the amplitude is
  read where the trigger correlates best, on both sides;
* mode collapse: ``eval/diversity`` (``metrics.diversity``: 1 = as diverse
  as the real images, near 0 = one image);
* fidelity against clean held-out images: ``eval/swd`` (no network; the real
  side is computed once, and on accelerators it runs on the device) and, in
  the feature space of ``eval.extractor`` every ``eval.fid_every`` rounds (0 =
  final evaluation only), ``eval/fid@<extractor>``, ``eval/kid@<extractor>``,
  ``eval/precision@<extractor>``, ``eval/recall@<extractor>``. Only
  ``fid@inception_v3`` with the reference weights is "FID" in the usual sense;
* with ``attack.latent_trigger`` (``federated/latent_trigger.py``):
  ``eval/latent_trigger_dist``, the mean squared distance of ``G(z*)`` to the
  target ``x*``, beside ``eval/latent_clean_dist``, the median of the same over
  the evaluation's ordinary samples: the backdoor is there when the first is
  far below the second. (With ``attack.malicious=()`` the same flag trains a
  clean run and gives the clean reference of both.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from fedgan_jax import config_lib
from fedgan_jax.data import triggers
from fedgan_jax.federated import latent_trigger
from fedgan_jax.io import images as image_io
from fedgan_jax.metrics import diversity, extractors, fidelity, swd
from fedgan_jax.metrics import trigger as trigger_metrics

_MAX_FPR = 0.01  # The above-threshold fraction's target false-positive rate on clean images.


class Template(NamedTuple):
  """One trigger template scored at every evaluation, with its clean baseline."""

  suffix: str  # '' for the run's own trigger, '@<s>px' for an extra size.
  trigger: np.ndarray  # [s, s, ch], in the images' [-1, 1] range as pasted.
  location: Any  # (top, left), or 'any' for random trigger locations.
  clean: np.ndarray  # f32[M]: implant_amplitude of the clean held-out images (the baseline).
  exceed: trigger_metrics.Exceedance


def templates(config, trigger: np.ndarray, trigger_loc: tuple[int, int], real: np.ndarray) -> list[Template]:
  """The run's own trigger and one per ``eval.implant_sizes`` entry, each with its clean baseline.

  Args:
    config: the run config.
    trigger: the run's trigger as pasted.
    trigger_loc: its (top, left).
    real: clean held-out images in [-1, 1] (at least 2).

  Returns:
    The templates, the run's own first.
  """
  loc = "any" if config.attack.trigger_location == "random" else tuple(trigger_loc)
  specs = [("", trigger, loc)]
  own = config_lib.trigger_geometry(config)[0]
  for size in sorted(set(config.eval.implant_sizes) - {own}):
    other = config_lib.copy_with(config, {"attack.trigger_size": int(size)})
    other_loc = "any" if loc == "any" else triggers.trigger_location(other)
    specs.append((f"@{size}px", triggers.load_trigger(other), other_loc))
  out = []
  for suffix, t, where in specs:
    clean = trigger_metrics.implant_amplitude(real, t, where)
    out.append(Template(suffix, t, where, clean, trigger_metrics.exceedance_threshold(clean, _MAX_FPR)))
  return out


def noise_floor(template: Template) -> dict[str, Any]:
  """What clean real images read with a template: the measure's noise floor (``trigger_calibration.json``)."""
  c = template.clean.astype(np.float64)
  return {
    "trigger_px": int(template.trigger.shape[0]),
    "baseline_median": float(np.median(c)),
    "baseline_std": float(np.std(c)),
    "baseline_p05": float(np.percentile(c, 5)),
    "baseline_p95": float(np.percentile(c, 95)),
    "threshold_p99": template.exceed.threshold,
    "max_fpr": _MAX_FPR,
    "fpr_out_of_sample": template.exceed.fpr,
    "num_calibration": template.exceed.num_calibration,
    "num_test": template.exceed.num_test,
  }


class Evaluator:
  """Callable ``(g_vars, round, final) -> dict`` of ``eval/`` metrics; writes sample grids.

  Args:
    config: the run config.
    sample_fn: ``(g_vars, z) -> images [N, H, W, ch]`` in [-1, 1]; ``(g_vars, z, labels)`` with ``model.conditional``.
    heldout: clean held-out ``Dataset`` (uint8 images).
    trigger: float ``[s, s, ch]`` trigger.
    trigger_loc: (top, left) of the trigger region.
    key: PRNG key for the fixed noise.
    workdir: the run directory.
    poisoned: float images of the malicious clients as they train on them
      (trigger pasted), for the ``real_poisoned_amplitude`` sanity check (1 = the measure sees pasted triggers).
    write: save files (False on non-primary processes of a multi-host run).
    num_classes: the data's classes with ``model.conditional`` (then ``sample_fn``
      is ``(g_vars, z, labels) -> images``); ignored otherwise.

  Raises:
    ValueError: ``model.conditional`` with ``num_classes < 2``.
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
    num_classes: int = 0,
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
    # model.conditional: fixed labels cycling over the classes (grid: row i is class i % K); None otherwise.
    self.num_classes = int(num_classes) if config.model.conditional else 0
    if config.model.conditional and self.num_classes < 2:
      raise ValueError(
        f"config.model.conditional=True: the evaluation needs the data's classes (>= 2), got {num_classes}."
      )
    self.grid_labels = self.eval_labels = None
    if self.num_classes:
      g = config.eval.grid_size
      self.grid_labels = jnp.asarray((np.arange(g * g) // g) % self.num_classes, jnp.int32)
      self.eval_labels = jnp.asarray(np.arange(config.eval.num_samples) % self.num_classes, jnp.int32)
    self._sample = jax.jit(sample_fn)
    self.real = heldout.images.astype(np.float32) / 127.5 - 1.0
    self.latent = latent_trigger.from_config(config)  # None unless attack.latent_trigger.
    self.last_grid: np.ndarray | None = None
    self.templates: list[Template] = []
    self.real_variance = None
    self.calibration: dict[str, Any] = {}
    if len(self.real) >= 2:
      self.templates = templates(config, trigger, trigger_loc, self.real)
      self.real_variance = diversity.total_variance(self.real)
      self.calibration = {
        "num_clean_real": int(len(self.real)),
        "location": "any" if self.templates[0].location == "any" else list(trigger_loc),
        "templates": {t.suffix or "run": noise_floor(t) for t in self.templates},
      }
      if poisoned is not None and len(poisoned):
        own = self.templates[0]
        amp = trigger_metrics.implant_amplitude(poisoned, own.trigger, own.location)
        self.calibration["real_poisoned_amplitude"] = float(np.median(amp))
      logging.info("implant baselines on %d clean held-out images: %s", len(self.real), self.calibration)
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

  def device_samples(self, g_vars, z: jax.Array, batch: int = 256, labels: jax.Array | None = None) -> jax.Array:
    """Generated images for latents ``z`` (and class ids ``labels [N]``, conditional models only), on the device."""
    if labels is None:
      parts = [self._sample(g_vars, z[i : i + batch]) for i in range(0, len(z), batch)]
    else:
      parts = [self._sample(g_vars, z[i : i + batch], labels[i : i + batch]) for i in range(0, len(z), batch)]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)

  def samples(self, g_vars, z: jax.Array, batch: int = 256, labels: jax.Array | None = None) -> np.ndarray:
    """Generated images for latents ``z`` (and ``labels``, see ``device_samples``) as a host array."""
    return np.asarray(self.device_samples(g_vars, z, batch, labels))

  def _save_grid(self, grid: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image_io.save_png(path, grid, scale=max(1, 128 // self.config.resolution))

  def __call__(self, g_vars, round_: int, final: bool = False) -> dict[str, Any]:
    grid_imgs = image_io.to_uint8(self.samples(g_vars, self.z_grid, labels=self.grid_labels))
    self.last_grid = image_io.grid(grid_imgs, self.config.eval.grid_size)
    if self.write:
      self._save_grid(self.last_grid, os.path.join(self.sample_dir, f"round_{round_:06d}.png"))
      for k in range(self.num_classes):  # model.conditional: the whole grid once per class.
        y = jnp.full((len(self.z_grid),), k, jnp.int32)
        grid = image_io.grid(image_io.to_uint8(self.samples(g_vars, self.z_grid, labels=y)), self.config.eval.grid_size)
        self._save_grid(grid, os.path.join(self.sample_dir, f"class_{k}", f"round_{round_:06d}.png"))
    fake_dev = self.device_samples(g_vars, self.z_eval, labels=self.eval_labels)
    fake = np.asarray(fake_dev)
    finite = np.isfinite(fake).all(axis=(1, 2, 3))
    out: dict[str, Any] = {"eval/nonfinite_samples": int(np.sum(~finite))}
    fake = np.where(finite[:, None, None, None], fake, 0.0)
    for t in self.templates:
      amp = trigger_metrics.implant_amplitude(fake, t.trigger, t.location)
      head = trigger_metrics.implant_summary(amp, t.clean)
      out[f"eval/implant_amplitude{t.suffix}"] = head["amplitude"]
      out[f"eval/implant_amplitude_lo{t.suffix}"] = head["lo"]
      out[f"eval/implant_amplitude_hi{t.suffix}"] = head["hi"]
      out[f"eval/implant_above_p99{t.suffix}"] = float(np.mean(amp > t.exceed.threshold))
    if self.latent is not None:
      y_star = jnp.full((1,), latent_trigger.LATENT_CLASS, jnp.int32) if self.num_classes else None
      g_star = self.samples(g_vars, self.latent.z[None], labels=y_star)
      out.update(latent_trigger.eval_metrics(g_star, fake[finite], self.latent.target))
    if self.real_variance is not None:
      out["eval/diversity"] = diversity.diversity(fake, self.real_variance)
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
