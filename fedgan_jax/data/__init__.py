"""Data: sources, client partitions, triggers and poisoning.

``sources.load_data`` dispatches to one module per source (``folder``, ``npz``,
``tfds``; ``synthetic`` generates its images), sharing ``images`` (conversion),
``labels`` (CSV and folder label layouts), ``cache`` (decoded-set cache) and
``common`` (loader result type, held-out split).
"""

from fedgan_jax.data.types import ClientData, Dataset

__all__ = ["ClientData", "Dataset"]
