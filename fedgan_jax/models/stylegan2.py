"""The paper's generator: StyleGAN2 (Karras et al. 2020) as modified by Projected GAN.

Jin & Li (SASHIMI 2022) train Projected GAN's StyleGAN2 generator, built
unconditional as ``Generator(z_dim=64, w_dim=128, c_dim=0, img_resolution=256,
img_channels=3)``, against a DCGAN discriminator. This is a port of its
mathematics (not of its code):

* mapping: z -> 2nd-moment normalization -> ``mapping_layers`` equalized
  fully connected layers (leaky ReLU, learning-rate multiplier ``mapping_lr_mult``)
  -> w, with a running average of w (decay ``w_avg_beta``) for truncation;
  class-conditional (``num_classes > 0``, ``model.conditional``) as
  stylegan2-ada's ``c_dim > 0``: the one-hot label through an equalized dense
  ``embed`` to ``w_dim``, 2nd-moment normalized, concatenated to z's;
* synthesis, "skip" architecture: a learned 4x4 constant, then one block per
  resolution 8..R of [up-conv 3x3, conv 3x3] with ``min(channel_base // res,
  channel_max)`` channels, and a toRGB (1x1) at every resolution whose output is
  added to the FIR-upsampled image of the block below. Every conv is modulated
  by a per-layer style (an affine map of w) and, except toRGB, demodulated;
  then noise, bias, leaky ReLU x sqrt(2), clamp to +-``conv_clamp``. The image
  is returned as is: the original has no output nonlinearity (no tanh), so
  images are unbounded (the D sees them as they are).

Written for the federated round's ``vmap`` over clients (docs/design.md §6):

* Modulation scales ACTIVATIONS around a conv with SHARED weights (``x * s ->
  conv(x, w) -> * d``), the original's non-fused form, equal up to rounding to
  its fused per-sample (grouped) conv; so every conv is an ordinary
  ``layers.conv2d``/``conv2d_transpose`` in the model's lowering (``impl``) and
  under ``gemm`` the vmapped G holds no convolution at all.
* The [1, 3, 3, 1] FIR filters of upsampling are separable fixed weights
  applied as shifted slices and adds, never a depthwise conv.

Equalized learning rate: weights are stored N(0, 1) / lr_mult and scaled at
run time by lr_mult / sqrt(fan_in). Under Adam (scale-invariant steps) the
effective weight then moves lr_mult times as far per step as a layer with
lr_mult = 1; under plain SGD the gradient is scaled too, so lr_mult**2.

Noise (``model.sg2.noise_mode``): ``'random'`` (the config's default) draws
fresh noise from the ``'noise'`` rng stream per call, as the paper's training
does (the round passes ``apply(..., rngs={'noise': key})``; required with
``train=True``; sampling without that rng uses the constant maps);
``'const'`` adds a fixed N(0, 1) map per layer, stored in the ``'buffers'``
collection, times the learned strength (StyleGAN2's ``noise_mode='const'``);
``'none'`` adds no noise.

Precision: with ``dtype=bfloat16`` the ``num_bf16_res`` highest-resolution
blocks (the original's fp16 blocks) run their activations and conv operands
in bf16; styles, demodulation coefficients, the mapping network and the image
sum stay float32, as the original keeps them.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedgan_jax.models import layers
from fedgan_jax.models.dcgan import check_labels, num_upsamplings

NOISE_MODES = ("const", "random", "none")
_SQRT2 = math.sqrt(2.0)


def _fir4(x, axis: int):
  """Valid correlation with [1, 3, 3, 1] / 4 along ``axis`` (length n -> n - 3).

  The per-axis factor of the original's 2-D filter: normalized to sum 1 and
  times the upsampling gain 4 in 2-D, i.e. sum 2 per axis.
  """
  n = x.shape[axis]
  tap = lambda i: jax.lax.slice_in_dim(x, i, n - 3 + i, axis=axis)
  return 0.25 * (tap(0) + tap(3)) + 0.75 * (tap(1) + tap(2))


def _upsample_axis(x, axis: int):
  """2x FIR upsampling along ``axis``: upfirdn2d(up=2, [1, 3, 3, 1]) written polyphase.

  With zeros inserted after every sample and the filter centred as the
  original pads it (2 before, 1 after), output 2m is 0.25 x[m-1] + 0.75 x[m]
  and output 2m+1 is 0.75 x[m] + 0.25 x[m+1] (zero outside): no multiply by
  an inserted zero.
  """
  n = x.shape[axis]
  widths = [(0, 0)] * x.ndim
  widths[axis] = (1, 1)
  xp = jnp.pad(x, widths)
  prev = jax.lax.slice_in_dim(xp, 0, n, axis=axis)
  nxt = jax.lax.slice_in_dim(xp, 2, n + 2, axis=axis)
  even = 0.75 * x + 0.25 * prev
  odd = 0.75 * x + 0.25 * nxt
  out = jnp.stack([even, odd], axis=axis + 1)
  return out.reshape(x.shape[:axis] + (2 * n,) + x.shape[axis + 1 :])


def upsample2d(x):
  """``[B, H, W, C] -> [B, 2H, 2W, C]``: the original's ``upfirdn2d.upsample2d`` with [1, 3, 3, 1]."""
  return _upsample_axis(_upsample_axis(x, 1), 2)


def _upconv(x, weight, impl: str):
  """The original's 3x3 up-conv: a stride-2 transposed conv (2H + 1 outputs) then the 4-tap FIR.

  ``layers.conv2d_transpose`` returns exactly ``stride * H`` outputs, one short
  of the full transposed conv the FIR needs (dropping either end changes the
  result). A zero row/column before the input shifts the full output by one
  stride, so the padding-1 transposed conv returns [0, full]; one more zero
  after it is the FIR's own padding. The zero input row costs (H+1)^2/H^2 of
  the conv's work: 1.6 % at 128 -> 256 px, 56 % at 4 -> 8 px.
  """
  x = jnp.pad(x, ((0, 0), (1, 0), (1, 0), (0, 0)))
  y = layers.conv2d_transpose(x, jnp.swapaxes(weight, 2, 3), 2, 1, impl)  # [B, 2H+2, 2W+2, O]
  y = jnp.pad(y, ((0, 0), (0, 1), (0, 1), (0, 0)))
  return _fir4(_fir4(y, 1), 2)


def modulated_conv2d(x, weight, styles, *, demodulate: bool = True, up: int = 1, impl: str = "xla"):
  """StyleGAN2's modulated conv as activation scaling around a shared-weight conv.

  Equal (up to rounding) to the conv of ``x[n]`` with the per-sample weight
  ``w[..., c, o] * styles[n, c] * d[n, o]``, where ``d[n, o] = (sum_{kh, kw, c}
  (w * styles[n])**2 + 1e-8)**-1/2`` with ``demodulate``, else 1.

  Args:
    x: ``[B, H, W, Cin]``, in the compute dtype.
    weight: ``[k, k, Cin, Cout]`` (HWIO; the original's ``[O, I, k, k]`` permuted), float32.
    styles: ``[B, Cin]``, float32.
    demodulate: normalize every output channel to unit expected variance.
    up: 1 (``k // 2`` same-padding conv) or 2 (transposed conv + FIR, 3x3 only).
    impl: the ``layers`` lowering.

  Returns:
    ``[B, up*H, up*W, Cout]`` in ``x.dtype``.
  """
  dtype = x.dtype
  x = x * styles.astype(dtype)[:, None, None, :]
  w = weight.astype(dtype)
  if up == 1:
    x = layers.conv2d(x, w, 1, weight.shape[0] // 2, impl)
  elif up == 2 and weight.shape[0] == 3:
    x = _upconv(x, w, impl)
  else:
    raise ValueError(f"up={up} with a {weight.shape[0]}x{weight.shape[0]} kernel: supported up=1, or up=2 with 3x3.")
  if demodulate:
    # sum_{kh,kw,c} (w s_c)^2 = s^2 @ sum_{kh,kw} w^2: one [B, Cin] x [Cin, Cout] product, in float32.
    d = jax.lax.rsqrt(jnp.square(styles) @ jnp.sum(jnp.square(weight), axis=(0, 1)) + 1e-8)
    x = x * d.astype(dtype)[:, None, None, :]
  return x


class EqualizedDense(nn.Module):
  """Fully connected layer with equalized learning rate and a learning-rate multiplier.

  Stored kernel ~ N(0, 1) / lr_mult, used as kernel * lr_mult / sqrt(fan_in);
  stored bias = bias_init, used as bias * lr_mult (the original's bias_gain).
  """

  features: int
  lr_mult: float = 1.0
  bias_init: float = 0.0
  lrelu: bool = False

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    kernel = self.param(
      "kernel", lambda k, s: jax.random.normal(k, s, jnp.float32) / self.lr_mult, (fan_in, self.features)
    )
    bias = self.param("bias", nn.initializers.constant(self.bias_init), (self.features,), jnp.float32)
    x = x @ (kernel * (self.lr_mult / math.sqrt(fan_in))) + bias * self.lr_mult
    return nn.leaky_relu(x, 0.2) * _SQRT2 if self.lrelu else x


def _normalize_2nd_moment(x):
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-8)


class MappingNetwork(nn.Module):
  """``z [B, Z] -> w [B, w_dim]``; tracks the average w in ``buffers/w_avg`` when training.

  With ``num_classes > 0`` (stylegan2-ada's ``c_dim``): ``w = fc(concat(norm(z), norm(embed(one_hot(c)))))``,
  ``embed`` an equalized dense layer to ``w_dim`` features (learning-rate multiplier 1, as the original's).
  """

  w_dim: int = 128
  num_layers: int = 8
  lr_mult: float = 0.01
  w_avg_beta: float = 0.998
  num_classes: int = 0

  @nn.compact
  def __call__(self, z, train: bool = True, truncation_psi: float = 1.0, labels=None):
    x = z.astype(jnp.float32)
    x = _normalize_2nd_moment(x)
    if self.num_classes:
      y = EqualizedDense(self.w_dim, name="embed")(jax.nn.one_hot(labels, self.num_classes, dtype=jnp.float32))
      x = jnp.concatenate([x, _normalize_2nd_moment(y)], axis=-1)
    for i in range(self.num_layers):
      x = EqualizedDense(self.w_dim, self.lr_mult, lrelu=True, name=f"fc{i}")(x)
    w_avg = self.variable("buffers", "w_avg", jnp.zeros, (self.w_dim,), jnp.float32)
    if train and not self.is_initializing() and self.is_mutable_collection("buffers"):
      batch_mean = jnp.mean(jax.lax.stop_gradient(x), axis=0)
      w_avg.value = batch_mean + self.w_avg_beta * (w_avg.value - batch_mean)
    if truncation_psi != 1.0:
      x = w_avg.value + truncation_psi * (x - w_avg.value)
    return x


class SynthesisLayer(nn.Module):
  """Modulated, demodulated 3x3 conv (optionally 2x up) + noise + bias + leaky ReLU + clamp."""

  features: int
  resolution: int  # Output side.
  up: int = 1
  conv_clamp: float = 256.0
  noise_mode: str = "const"
  impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, w, train: bool = True):
    cin = x.shape[-1]
    styles = EqualizedDense(cin, bias_init=1.0, name="affine")(w)
    weight = self.param("kernel", nn.initializers.normal(1.0), (3, 3, cin, self.features), jnp.float32)
    x = modulated_conv2d(x, weight, styles, demodulate=True, up=self.up, impl=self.impl)

    res = self.resolution
    noise_const = self.variable(
      "buffers", "noise_const", lambda: jax.random.normal(self.make_rng("params"), (res, res), jnp.float32)
    )
    strength = self.param("noise_strength", nn.initializers.zeros, (), jnp.float32)
    if self.noise_mode == "random" and (train or self.has_rng("noise")):
      # Drawn per call from the 'noise' stream; training without it fails here (make_rng), loudly.
      noise = jax.random.normal(self.make_rng("noise"), (x.shape[0], res, res, 1), jnp.float32)
      x = x + (noise * strength).astype(x.dtype)
    elif self.noise_mode != "none":
      x = x + (noise_const.value * strength).astype(x.dtype)[:, :, None]

    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    x = nn.leaky_relu(x + bias.astype(x.dtype), 0.2) * _SQRT2
    return jnp.clip(x, -self.conv_clamp, self.conv_clamp) if self.conv_clamp else x


class ToRGB(nn.Module):
  """Modulated (not demodulated) 1x1 conv to the image channels + bias + clamp; float32 out."""

  channels: int
  conv_clamp: float = 256.0
  impl: str = "xla"

  @nn.compact
  def __call__(self, x, w):
    cin = x.shape[-1]
    styles = EqualizedDense(cin, bias_init=1.0, name="affine")(w) / math.sqrt(cin)
    weight = self.param("kernel", nn.initializers.normal(1.0), (1, 1, cin, self.channels), jnp.float32)
    y = modulated_conv2d(x, weight, styles, demodulate=False, impl=self.impl)
    bias = self.param("bias", nn.initializers.zeros, (self.channels,), jnp.float32)
    y = y + bias.astype(y.dtype)
    if self.conv_clamp:
      y = jnp.clip(y, -self.conv_clamp, self.conv_clamp)
    return y.astype(jnp.float32)


class SynthesisBlock(nn.Module):
  """One resolution: [const | up-conv], conv, toRGB added to the upsampled image ("skip")."""

  features: int
  resolution: int
  channels: int
  conv_clamp: float = 256.0
  noise_mode: str = "const"
  impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, img, w, train: bool = True):
    kw = dict(conv_clamp=self.conv_clamp, noise_mode=self.noise_mode, impl=self.impl, dtype=self.dtype)
    res = self.resolution
    if x is None:
      const = self.param("const", nn.initializers.normal(1.0), (res, res, self.features), jnp.float32)
      x = jnp.broadcast_to(const.astype(self.dtype), (w.shape[0], *const.shape))
    else:
      x = x.astype(self.dtype)
      x = SynthesisLayer(self.features, res, up=2, name="conv0", **kw)(x, w, train)
    x = SynthesisLayer(self.features, res, name="conv1", **kw)(x, w, train)
    y = ToRGB(self.channels, self.conv_clamp, self.impl, name="torgb")(x, w)
    img = y if img is None else upsample2d(img) + y
    return x, img


class Generator(nn.Module):
  """StyleGAN2 generator: ``z [B, latent] -> images [B, R, R, channels]`` (unbounded, no tanh).

  Same interface as the DCGAN generator. Variables: ``params`` and
  ``buffers`` (``w_avg``, updated when ``train`` and ``buffers`` is mutable;
  the per-layer ``noise_const`` maps, never updated).
  """

  resolution: int = 256
  channels: int = 3
  w_dim: int = 128
  mapping_layers: int = 8
  mapping_lr_mult: float = 0.01
  w_avg_beta: float = 0.998
  channel_base: int = 32768
  channel_max: int = 512
  conv_clamp: float = 256.0
  num_bf16_res: int = 4
  noise_mode: str = "const"
  impl: str = "xla"
  dtype: Any = jnp.float32  # Compute dtype of the num_bf16_res highest resolutions.
  num_classes: int = 0  # > 0: class-conditional (labels embedded into the mapping network).

  def block_channels(self) -> dict[int, int]:
    """``{res: channels}`` for res = 4, 8, ..., resolution."""
    k = num_upsamplings(self.resolution)
    return {4 * 2**i: min(self.channel_base // (4 * 2**i), self.channel_max) for i in range(k + 1)}

  @nn.compact
  def __call__(self, z, train: bool = True, truncation_psi: float = 1.0, labels=None):
    if self.noise_mode not in NOISE_MODES:
      raise ValueError(f"noise_mode={self.noise_mode!r}: accepted {list(NOISE_MODES)}.")
    check_labels(labels, self.num_classes, z.shape[0], "generator")
    mapping = MappingNetwork(
      self.w_dim, self.mapping_layers, self.mapping_lr_mult, self.w_avg_beta, self.num_classes, name="mapping"
    )
    w = mapping(z, train, truncation_psi, labels)
    # The original's fp16 blocks: the num_bf16_res highest resolutions, never below 8 px.
    low = max(2 ** (int(math.log2(self.resolution)) + 1 - self.num_bf16_res), 8)
    x = img = None
    for res, ch in self.block_channels().items():
      dtype = self.dtype if res >= low else jnp.float32
      x, img = SynthesisBlock(
        ch, res, self.channels, self.conv_clamp, self.noise_mode, self.impl, dtype, name=f"b{res}"
      )(x, img, w, train)
    return img


def from_config(config, noise_mode: str | None = None, num_classes: int = 0) -> Generator:
  """The StyleGAN2 generator for ``config`` (``model.sg2.*``, resolution, channels, precision, conv_impl).

  Args:
    config: a validated run config.
    noise_mode: overrides ``model.sg2.noise_mode``.
    num_classes: > 0 for a class-conditional generator (``models.build`` passes the data's classes).
  """
  sg2 = config.model.sg2
  noise_mode = noise_mode or sg2.noise_mode
  return Generator(
    resolution=config.resolution,
    channels=config.data.channels,
    w_dim=sg2.w_dim,
    mapping_layers=sg2.mapping_layers,
    mapping_lr_mult=float(sg2.mapping_lr_mult),
    w_avg_beta=float(sg2.w_avg_beta),
    channel_base=sg2.channel_base,
    channel_max=sg2.channel_max,
    conv_clamp=float(sg2.conv_clamp),
    num_bf16_res=sg2.num_bf16_res,
    noise_mode=noise_mode,
    impl=layers.resolve_impl(config.model.conv_impl),
    dtype=jnp.bfloat16 if config.train.precision == "bf16" else jnp.float32,
    num_classes=num_classes,
  )
