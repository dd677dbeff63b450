"""Data: sources, client partitions, triggers and poisoning."""

from fedgan_jax.data.types import ClientData, Dataset

__all__ = ["ClientData", "Dataset"]
