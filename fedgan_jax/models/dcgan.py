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

Class-conditional variants (``num_classes > 0``, ``model.conditional``): G
concatenates a learned label embedding (``embed``, one N(0, 1) row per class,
of z's size, like z itself) to z before its first layer (cGAN, Mirza & Osindero
2014); D adds the projection term of Miyato & Koyama (cGANs with Projection
Discriminator, ICLR 2018) to its logit, ``logit = psi(h) + <embed(y), h>``
with ``h`` the flattened features that its last layer ``psi`` reads and
``embed`` a ``[num_classes, dim h]`` table initialized as that layer's kernel.
With ``num_classes = 0`` (the default) none of it is built: the variables and
the program are those of the unconditional models.

Weights are initialized N(0, 0.02) and BatchNorm scales N(1, 0.02), as in
DCGAN. D's ``weight_init='torch'`` (``model.d_init``) is instead PyTorch's default
init, which the paper's scripts leave in place: kernels U(+-1/sqrt(fan_in))
(kaiming_uniform with a=sqrt(5)), norm scales 1 and biases 0. D's
``norm_first`` (``model.d_norm_first``) adds a norm after the first conv too,
as the paper's WGAN-GP critic (scripts/gp.py) has. BatchNorm momentum 0.9
equals PyTorch's 0.1.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedgan_jax.models import layers

_init = nn.initializers.normal(0.02)
# PyTorch's Conv2d default, kaiming_uniform(a=sqrt(5)): U(+-gain * sqrt(3 / fan_in)) with gain^2 = 2 / (1 + 5),
# i.e. U(+-1 / sqrt(fan_in)); flax's fan_in of an HWIO kernel is k * k * in, of a Dense kernel its input size.
_torch_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
D_INITS = ("dcgan", "torch")


def _bn_scale_init(key, shape, dtype=jnp.float32):
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def _kernel_init(init: str):
  if init not in D_INITS:
    raise ValueError(f"model.d_init={init!r}: accepted {list(D_INITS)}.")
  return _torch_init if init == "torch" else _init


def check_labels(labels, num_classes: int, batch: int, what: str) -> None:
  """Raises ``ValueError`` unless ``labels`` fit a model with ``num_classes`` (0 = unconditional).

  Args:
    labels: int ``[batch]`` class ids, or None.
    num_classes: the model's classes; 0 for an unconditional model.
    batch: the batch size of the model's input.
    what: the model's name, for the message.
  """
  if num_classes and labels is None:
    raise ValueError(
      f"the {what} is class-conditional (model.conditional=True, {num_classes} classes): it needs labels, "
      f"int32 [{batch}] class ids in [0, {num_classes})."
    )
  if not num_classes and labels is not None:
    raise ValueError(f"the {what} is unconditional (model.conditional=False): labels must be None.")
  if labels is not None and tuple(labels.shape) != (batch,):
    raise ValueError(f"the {what}'s labels have shape {tuple(labels.shape)}; expected ({batch},), one per input.")


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
  kernel_init: Any = _init

  @nn.compact
  def __call__(self, x):
    cin = x.shape[-1]
    # Transposed conv weights use the forward conv's HWIO layout: [k, k, out, in].
    shape = (4, 4, self.features, cin) if self.transpose else (4, 4, cin, self.features)
    w = self.param("kernel", self.kernel_init, shape, jnp.float32)
    x, w = x.astype(self.dtype), w.astype(self.dtype)
    if self.transpose:
      return layers.conv2d_transpose(x, w, self.stride, self.pad, self.impl)
    return layers.conv2d(x, w, self.stride, self.pad, self.impl)


def _norm(kind: str, train: bool, name: str, init: str = "dcgan"):
  if kind == "batch":
    # PyTorch's BatchNorm2d starts at scale 1; DCGAN draws it N(1, 0.02).
    scale_init = _bn_scale_init if init == "dcgan" else nn.initializers.ones
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, scale_init=scale_init, name=name)
  if kind == "instance":
    # InstanceNorm2d(affine=True): scale 1, bias 0 under both inits (flax's defaults).
    return nn.GroupNorm(num_groups=None, group_size=1, epsilon=1e-5, name=name)
  return lambda x: x


class Generator(nn.Module):
  """DCGAN generator: ``z [B, latent] -> images [B, R, R, channels]`` in [-1, 1]."""

  resolution: int = 32
  width: int = 32
  channels: int = 3
  impl: str = "xla"
  dtype: Any = jnp.float32
  num_classes: int = 0  # > 0: class-conditional (a label embedding concatenated to z).

  @nn.compact
  def __call__(self, z, train: bool = True, labels=None):
    check_labels(labels, self.num_classes, z.shape[0], "generator")
    k = num_upsamplings(self.resolution)
    ch = self.width * 2 ** (k - 1)
    if self.num_classes:
      e = nn.Embed(self.num_classes, z.shape[-1], embedding_init=nn.initializers.normal(1.0), name="embed")(labels)
      z = jnp.concatenate([z.astype(jnp.float32), e], axis=-1)
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
  """DCGAN discriminator: ``images [B, R, R, channels] -> logits [B]`` (no sigmoid).

  ``weight_init``: ``'dcgan'`` or ``'torch'`` (see the module docstring). ``norm_first``:
  a ``norm`` layer (``'norm_in'``) after the first conv as well. ``num_classes > 0``: the
  projection discriminator, ``D(x, labels)``; it sows ``h`` as ``intermediates/features``.
  """

  resolution: int = 32
  width: int = 32
  norm: str = "batch"
  impl: str = "xla"
  dtype: Any = jnp.float32
  weight_init: str = "dcgan"
  norm_first: bool = False
  num_classes: int = 0  # > 0: projection discriminator (Miyato & Koyama 2018).

  @nn.compact
  def __call__(self, x, train: bool = True, labels=None):
    check_labels(labels, self.num_classes, x.shape[0], "discriminator")
    k = num_upsamplings(self.resolution)
    kinit = _kernel_init(self.weight_init)
    ch = self.width
    x = _Conv(ch, 2, 1, impl=self.impl, dtype=self.dtype, kernel_init=kinit, name="in")(x).astype(jnp.float32)
    if self.norm_first:
      x = _norm(self.norm, train, "norm_in", self.weight_init)(x)
    x = nn.leaky_relu(x, 0.2)
    for i in range(k - 1):
      ch *= 2
      x = _Conv(ch, 2, 1, impl=self.impl, dtype=self.dtype, kernel_init=kinit, name=f"down{i}")(x)
      x = nn.leaky_relu(_norm(self.norm, train, f"norm{i}", self.weight_init)(x.astype(jnp.float32)), 0.2)
    x = x.reshape(x.shape[0], -1)
    # The paper's last layer, a 4x4 valid conv to one channel, as a Dense on the flattened 4x4 map: same fan-in.
    logit = nn.Dense(1, use_bias=False, kernel_init=kinit, dtype=self.dtype, name="logit")(x)
    out = logit[:, 0].astype(jnp.float32)
    if self.num_classes:
      # The projection <embed(y), h> on the features psi reads; the table initialized as psi's kernel, per column:
      # N(0, 0.02), or with d_init='torch' U(+-1/sqrt(dim h)) (PyTorch's Linear init over the same fan-in).
      einit = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=-1, out_axis=-2)
      self.sow("intermediates", "features", x)
      e = nn.Embed(
        self.num_classes, x.shape[-1], embedding_init=einit if self.weight_init == "torch" else _init, name="embed"
      )
      out = out + jnp.sum(e(labels).astype(jnp.float32) * x.astype(jnp.float32), axis=-1)
    return out


def build(config, num_classes: int = 0) -> tuple[Generator, Discriminator]:
  """The (G, D) pair for ``config`` (model, resolution, channels, precision, D's init and norms).

  Args:
    config: a validated run config.
    num_classes: the classes of class-conditional models (``model.conditional``; 0 = unconditional).
  """
  impl = layers.resolve_impl(config.model.conv_impl)
  dtype = jnp.bfloat16 if config.train.precision == "bf16" else jnp.float32
  g = Generator(config.resolution, config.model.g_width, config.data.channels, impl, dtype, num_classes=num_classes)
  m = config.model
  d = Discriminator(
    config.resolution,
    m.d_width,
    m.d_norm,
    impl,
    dtype,
    weight_init=m.d_init,
    norm_first=bool(m.d_norm_first),
    num_classes=num_classes,
  )
  return g, d
