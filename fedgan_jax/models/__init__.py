"""Flax generators and discriminators; ``build(config)`` picks the pair for a run."""

from __future__ import annotations

from fedgan_jax.models import dcgan, stylegan2
from fedgan_jax.models.dcgan import Discriminator, Generator


def build(config, num_classes: int = 0):
  """The ``(G, D)`` pair for ``config``.

  ``model.name='dcgan'``: the DCGAN generator; ``'stylegan2'``: the paper's
  StyleGAN2 generator (``models.stylegan2``, constant noise maps). The
  discriminator is the DCGAN discriminator in both cases, as in the paper.

  Args:
    config: a validated run config.
    num_classes: with ``model.conditional``, the data's classes (``Dataset.num_classes``); ignored otherwise.

  Raises:
    ValueError: ``model.conditional`` with fewer than 2 classes.
  """
  if config.model.conditional and num_classes < 2:
    raise ValueError(
      f"config.model.conditional=True needs the data's number of classes (>= 2) to build class-conditional "
      f"models; got num_classes={num_classes}."
    )
  k = int(num_classes) if config.model.conditional else 0
  g, d = dcgan.build(config, k)
  if config.model.name == "stylegan2":
    g = stylegan2.from_config(config, num_classes=k)
  return g, d


__all__ = ["Discriminator", "Generator", "build", "dcgan", "stylegan2"]
