"""Flax generators and discriminators; ``build(config)`` picks the pair for a run."""

from __future__ import annotations

from fedgan_jax.models import dcgan, stylegan2
from fedgan_jax.models.dcgan import Discriminator, Generator


def build(config):
  """The ``(G, D)`` pair for ``config``.

  ``model.name='dcgan'``: the DCGAN generator; ``'stylegan2'``: the paper's
  StyleGAN2 generator (``models.stylegan2``, constant noise maps). The
  discriminator is the DCGAN discriminator in both cases, as in the paper.
  """
  g, d = dcgan.build(config)
  if config.model.name == "stylegan2":
    g = stylegan2.from_config(config)
  return g, d


__all__ = ["Discriminator", "Generator", "build", "dcgan", "stylegan2"]
