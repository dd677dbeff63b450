"""Flax generators and discriminators."""

from fedgan_jax.models.dcgan import Discriminator, Generator, build

__all__ = ["Discriminator", "Generator", "build"]
