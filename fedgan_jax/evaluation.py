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
* membership inference (``metrics.membership``, GAN-Leaks' full black box)
  with the feature metrics: ``eval/mia_auc``, the ROC AUC of telling
  ``eval.mia_samples`` clean training images (members) from as many held-out
  ones by their distance to the nearest generated sample, in the extractor's
  features (pixels with ``eval.extractor='none'``); 0.5 = no leak;
* with ``model.conditional`` (``metrics.utility``), every
  ``eval.utility_every`` rounds (0 = final evaluation only, -1 = never):
  ``eval/tstr_{acc,bacc,auc}`` (a small classifier trained on
  ``eval.utility_samples`` generated images labelled as a fixed subset of
  the clean training images, tested on the held-out images),
  ``eval/trtr_{acc,bacc,auc}`` (the same classifier, key and steps, trained on
  those real images), ``eval/trigger_transfer`` (the fraction of held-out
  predictions of the TSTR classifier that change when the trigger is pasted)
  beside ``eval/trigger_transfer_real`` (the same for the TRTR classifier:
  what pasting a patch does by itself), and, when the attacker's images have
  labels, ``eval/trigger_target_rate`` (``_real``): BadNets' attack success
  rate toward their most common class.
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
from fedgan_jax.aggregation.fltrust import root_size_of
from fedgan_jax.data import triggers
from fedgan_jax.federated import latent_trigger
from fedgan_jax.io import images as image_io
from fedgan_jax.metrics import diversity, extractors, fidelity, membership, swd, utility
from fedgan_jax.metrics import trigger as trigger_metrics

_MAX_FPR = 0.01  # The above-threshold fraction's target false-positive rate on clean images.
_TRANSFER_KEYS = {"flip_rate": "transfer", "target_rate": "target_rate"}  # utility.trigger_transfer -> eval/trigger_*.


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
    sample_fn: ``(g_vars, z) -> images [N, H, W, ch]`` in [-1, 1]; with
      ``model.conditional``, ``(g_vars, z, labels int32[N]) -> images``.
    heldout: clean held-out ``Dataset`` (uint8 images; labels for the utility metrics).
    trigger: float ``[s, s, ch]`` trigger.
    trigger_loc: (top, left) of the trigger region.
    key: PRNG key for the fixed noise.
    workdir: the run directory.
    poisoned: float images of the malicious clients as they train on them
      (trigger pasted), for the ``real_poisoned_amplitude`` sanity check (1 = the measure sees pasted triggers).
    write: save files (False on non-primary processes of a multi-host run).
    num_classes: the data's classes with ``model.conditional`` (then ``sample_fn``
      is ``(g_vars, z, labels) -> images``; 0 = read them from ``heldout`` and
      ``members``); ignored otherwise.
    members: clean training images with labels (uint8 ``Dataset``, a fixed
      random subset: ``assemble.RunData.members``): the membership
      inference's members and TRTR's training set. None = neither.
    target_class: the class ``eval/trigger_target_rate`` reads the backdoor
      toward (-1 = none).

  Raises:
    ValueError: ``model.conditional`` with fewer than 2 classes.
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
    members=None,
    target_class: int = -1,
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
    self.conditional = bool(config.model.conditional)
    self.real = heldout.images.astype(np.float32) / 127.5 - 1.0
    # model.conditional: the data's classes (given, or read from the labelled images); 0 otherwise.
    self.num_classes = 0
    if self.conditional:
      labelled = [np.asarray(d.labels) for d in (heldout, members) if getattr(d, "labels", None) is not None]
      self.num_classes = int(num_classes) or max(
        [int(getattr(d, "num_classes", 1)) for d in (heldout, members) if d is not None]
        + [int(y.max()) + 1 for y in labelled if len(y)]
        + [1]
      )
      if self.num_classes < 2:
        raise ValueError(
          f"config.model.conditional=True: the evaluation needs the data's classes (>= 2), got {self.num_classes}."
        )
    # Fixed labels cycling over the classes (grid: row i is class i % K); None when unconditional.
    self.grid_labels = self.eval_labels = None
    if self.num_classes:
      g = config.eval.grid_size
      self.grid_labels = jnp.asarray((np.arange(g * g) // g) % self.num_classes, jnp.int32)
      self.eval_labels = jnp.asarray(np.arange(config.eval.num_samples) % self.num_classes, jnp.int32)
    self._sample = jax.jit(sample_fn)
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
    self.references: dict[str, Any] = {}  # What the membership and utility metrics are computed on (summary.json).
    self._init_membership(config, members)
    self._init_utility(config, heldout, members, key, target_class)

  def _init_membership(self, config, members) -> None:
    """Members: the first ``eval.mia_samples`` clean training images; non-members: as many held-out ones."""
    self.mia_members: np.ndarray | None = None
    self._member_feats = None
    # fltrust's server trains on the first root_size held-out images: they are not non-members.
    n_root = root_size_of(config.aggregation.name, config.aggregation.kwargs)
    m = min(config.eval.mia_samples, 0 if members is None else len(members.images), max(len(self.real) - n_root, 0))
    self.mia_nonmembers = slice(n_root, n_root + m)
    if m:
      self.mia_members = members.images[:m].astype(np.float32) / 127.5 - 1.0
      space = config.eval.extractor if self.extractor is not None else "pixels"
      self.references["membership"] = {"members": m, "nonmembers": m, "space": space}
    elif config.eval.mia_samples:
      logging.warning("eval/mia_auc off: no clean training images or held-out images to compare")

  def _init_utility(self, config, heldout, members, key: jax.Array, target_class: int) -> None:
    """TSTR / TRTR training sets, test set, trigger locations (model.conditional, eval.utility_every >= 0)."""
    self.utility_on = False
    self._trtr: dict[str, float] | None = None
    if not self.conditional or config.eval.utility_every < 0:
      return
    test_labels = getattr(heldout, "labels", None)
    n = min(config.eval.utility_samples, 0 if members is None else len(members.images))
    if self.num_classes < 2 or n < 2 or test_labels is None or not len(self.real):
      logging.warning(
        "utility metrics off: need >= 2 classes (got %d), >= 2 labelled training images (got %d) and labelled "
        "held-out images (got %d)",
        self.num_classes,
        n,
        0 if test_labels is None else len(self.real),
      )
      return
    self.utility_on = True
    side = config.eval.utility_resolution
    self.util_side = side
    self.util_labels = jnp.asarray(members.labels[:n], jnp.int32)
    self.util_real = utility.downsample(members.images[:n].astype(np.float32) / 127.5 - 1.0, side)
    self.util_test = utility.downsample(self.real, side)
    self.util_test_labels = np.asarray(test_labels, np.int32)
    # New streams of the evaluation key: the existing draws (grid and evaluation noise) are unchanged.
    self.z_util = jax.random.normal(jax.random.fold_in(key, 1), (n, config.model.latent_dim))
    self.util_key = jax.random.fold_in(key, 2)  # One classifier key: TSTR and TRTR differ only in their images.
    if config.attack.trigger_location == "random":
      k_loc = jax.random.fold_in(key, 3)
      self.util_loc = triggers.random_locations(k_loc, len(self.real), self.trigger.shape[0], config.resolution)
    else:
      self.util_loc = jnp.asarray(self.loc, jnp.int32)
    self.target_class = None if target_class < 0 else int(target_class)
    self.references["utility"] = {
      "train_images": n,
      "test_images": len(self.real),
      "num_classes": self.num_classes,
      "target_class": target_class,
      "classifier_steps": config.eval.utility_steps,
      "classifier_resolution": side or config.resolution,
    }

  def device_samples(self, g_vars, z: jax.Array, batch: int = 256, labels: jax.Array | None = None) -> jax.Array:
    """Generated images for latents ``z`` (and ``labels`` of a conditional G), left on the device.

    A conditional generator given no labels draws class ``i % num_classes`` for the i-th latent.
    """
    if not self.conditional:
      parts = [self._sample(g_vars, z[i : i + batch]) for i in range(0, len(z), batch)]
    else:
      if labels is None:
        labels = jnp.arange(len(z), dtype=jnp.int32) % self.num_classes
      parts = [self._sample(g_vars, z[i : i + batch], labels[i : i + batch]) for i in range(0, len(z), batch)]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)

  def samples(self, g_vars, z: jax.Array, batch: int = 256, labels: jax.Array | None = None) -> np.ndarray:
    """Generated images for latents ``z`` (and ``labels``) as a host array."""
    return np.asarray(self.device_samples(g_vars, z, batch, labels))

  def _save_grid(self, grid: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image_io.save_png(path, grid, scale=max(1, 128 // self.config.resolution))

  def features_due(self, round_: int, final: bool) -> bool:
    """Whether this evaluation computes the feature-space metrics and the membership inference."""
    every = self.config.eval.fid_every
    return final or bool(every and round_ % every == 0)

  def utility_due(self, round_: int, final: bool) -> bool:
    """Whether this evaluation computes TSTR/TRTR and trigger transfer."""
    every = self.config.eval.utility_every
    return self.utility_on and (final or bool(every > 0 and round_ % every == 0))

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
      if self.features_due(round_, final):
        feats = None
        if self.extractor is not None:
          feats = self.extractor.fn(fake)
          out.update(self.feature_metrics(fake, feats))
        if self.mia_members is not None:
          out["eval/mia_auc"] = self.membership_auc(fake, feats)
    if self.utility_due(round_, final):
      out.update(self.utility_metrics(g_vars))
    return out

  def membership_auc(self, fake: np.ndarray, fake_feats: np.ndarray | None = None) -> float:
    """GAN-Leaks' full black-box AUC of the members against as many held-out images (extractor features or pixels).

    Args:
      fake: the generated images.
      fake_feats: their extractor features when there is an extractor (computed here if None).
    """
    if self.extractor is None:
      return membership.mia_auc(self.mia_members, self.real[self.mia_nonmembers], fake)
    if self._real_feats is None:
      self._real_feats = self.extractor.fn(self.real)
    if self._member_feats is None:
      self._member_feats = self.extractor.fn(self.mia_members)
    if fake_feats is None:
      fake_feats = self.extractor.fn(fake)
    return membership.mia_auc(self._member_feats, self._real_feats[self.mia_nonmembers], fake_feats)

  def utility_metrics(self, g_vars) -> dict[str, float]:
    """TSTR and TRTR accuracy / balanced accuracy / AUC, and trigger transfer (``metrics.utility``)."""
    cfg = self.config.eval
    syn = self.samples(g_vars, self.z_util, labels=self.util_labels)
    syn = np.where(np.isfinite(syn).all(axis=(1, 2, 3), keepdims=True), syn, 0.0)
    train = lambda x: utility.train_and_test(
      x,
      self.util_labels,
      self.util_test,
      self.util_test_labels,
      self.num_classes,
      self.util_key,
      steps=cfg.utility_steps,
    )
    tstr, clf = train(utility.downsample(syn, self.util_side))
    transfer = lambda c: utility.trigger_transfer(
      c, self.real, self.util_test_labels, self.trigger, self.util_loc, self.target_class, self.util_side
    )
    if self._trtr is None:  # The real side does not change during the run: computed once.
      trtr, real_clf = train(self.util_real)
      self._trtr = {f"eval/trtr_{k}": v for k, v in trtr.items()}
      self._trtr.update({f"eval/trigger_{_TRANSFER_KEYS[k]}_real": v for k, v in transfer(real_clf).items()})
    out = {f"eval/tstr_{k}": v for k, v in tstr.items()}
    out.update({f"eval/trigger_{_TRANSFER_KEYS[k]}": v for k, v in transfer(clf).items()})
    return {**out, **self._trtr}

  def feature_metrics(self, fake: np.ndarray, feats: np.ndarray | None = None) -> dict[str, float]:
    """FD, KID and precision/recall in the extractor's feature space (``feats``: the extractor's of ``fake``)."""
    name = self.extractor.name
    if self._real_feats is None:
      self._real_feats = self.extractor.fn(self.real)
    f = self.extractor.fn(fake) if feats is None else feats
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
