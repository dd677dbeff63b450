"""DCGAN generator and discriminator whose depth follows the resolution.

Radford et al. 2016. The discriminator is the paper's (Jin & Li, SASHIMI
2022): with ``d_width=64`` at 256 px exactly its six 4x4 stride-2 convs
3→64→…→2048 and a 4x4 conv to the logit. The DCGAN generator is the CPU-sized
default; the paper's StyleGAN2 generator is ``models.stylegan2``
(``model.name='stylegan2'``). For a resolution ``R = 4 * 2**k``:

* G: z -> 4x4 (a dense layer, i.e. ConvTranspose 4x4 from 1x1), then k-1
  [ConvTranspose(4, 2, 1), BatchNorm, ReLU] halving the width, then
  ConvTranspose(4, 2, 1) to the image channels and tanh.
* D: Conv(4, 2, 1) + LeakyReLU(0.2), then k-1 [Conv(4, 2, 1), norm, LeakyReLU]
  doubling the width, then a 4x4 valid conv (a dense layer) to one logit.

Weights are initialized N(0, 0.02) and BatchNorm scales N(1, 0.02), as in
DCGAN. BatchNorm momentum 0.9 equals PyTorch's 0.1.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedgan_jax.models import layers

_init = nn.initializers.normal(0.02)


def _bn_scale_init(key, shape, dtype=jnp.float32):
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def num_upsamplings(resolution: int) -> int:
  """k such that resolution = 4 * 2**k (k >= 1)."""
  k = int(round(math.log2(resolution / 4)))
  if k < 1 or 4 * 2**k != resolution:
    raise ValueError(f"resolution={resolution}: must be 4 * 2**k with k >= 1 (e.g. 32, 64, 128, 256).")
  return k


class _Conv(nn.Module):
  features: int
  stride: int
  pad: int
  transpose: bool = False
  impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    cin = x.shape[-1]
    # Transposed conv weights use the forward conv's HWIO layout: [k, k, out, in].
    shape = (4, 4, self.features, cin) if self.transpose else (4, 4, cin, self.features)
    w = self.param("kernel", _init, shape, jnp.float32)
    x, w = x.astype(self.dtype), w.astype(self.dtype)
    if self.transpose:
      return layers.conv2d_transpose(x, w, self.stride, self.pad, self.impl)
    return layers.conv2d(x, w, self.stride, self.pad, self.impl)


def _norm(kind: str, train: bool, name: str):
  if kind == "batch":
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, scale_init=_bn_scale_init, name=name)
  if kind == "instance":
    return nn.GroupNorm(num_groups=None, group_size=1, epsilon=1e-5, name=name)
  return lambda x: x


class Generator(nn.Module):
  """DCGAN generator: ``z [B, latent] -> images [B, R, R, channels]`` in [-1, 1]."""

  resolution: int = 32
  width: int = 32
  channels: int = 3
  impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z, train: bool = True):
    k = num_upsamplings(self.resolution)
    ch = self.width * 2 ** (k - 1)
    x = nn.Dense(4 * 4 * ch, use_bias=False, kernel_init=_init, dtype=self.dtype)(z)
    x = x.reshape(z.shape[0], 4, 4, ch)
    x = nn.relu(_norm("batch", train, "bn0")(x.astype(jnp.float32)))
    for i in range(k - 1):
      ch //= 2
      x = _Conv(ch, 2, 1, transpose=True, impl=self.impl, dtype=self.dtype, name=f"up{i}")(x)
      x = nn.relu(_norm("batch", train, f"bn{i + 1}")(x.astype(jnp.float32)))
    x = _Conv(self.channels, 2, 1, transpose=True, impl=self.impl, dtype=self.dtype, name="out")(x)
    return jnp.tanh(x.astype(jnp.float32))


class Discriminator(nn.Module):
  """DCGAN discriminator: ``images [B, R, R, channels] -> logits [B]`` (no sigmoid)."""

  resolution: int = 32
  width: int = 32
  norm: str = "batch"
  impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    k = num_upsamplings(self.resolution)
    ch = self.width
    x = _Conv(ch, 2, 1, impl=self.impl, dtype=self.dtype, name="in")(x)
    x = nn.leaky_relu(x.astype(jnp.float32), 0.2)
    for i in range(k - 1):
      ch *= 2
      x = _Conv(ch, 2, 1, impl=self.impl, dtype=self.dtype, name=f"down{i}")(x)
      x = nn.leaky_relu(_norm(self.norm, train, f"norm{i}")(x.astype(jnp.float32)), 0.2)
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(1, use_bias=False, kernel_init=_init, dtype=self.dtype, name="logit")(x)[:, 0].astype(jnp.float32)


def build(config) -> tuple[Generator, Discriminator]:
  """The (G, D) pair for ``config`` (model, resolution, channels, precision)."""
  impl = layers.resolve_impl(config.model.conv_impl)
  dtype = jnp.bfloat16 if config.train.precision == "bf16" else jnp.float32
  g = Generator(config.resolution, config.model.g_width, config.data.channels, impl, dtype)
  d = Discriminator(config.resolution, config.model.d_width, config.model.d_norm, impl, dtype)
  return g, d
