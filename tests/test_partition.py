"""Tests for fedgan_jax.data.partition: coverage, skew properties, errors."""

from __future__ import annotations

import numpy as np
import pytest

from fedgan_jax.data import partition as partition_lib
from fedgan_jax.data.types import Dataset


def labelled(num_classes: int = 10, per_class: int = 100, groups=None) -> Dataset:
  labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
  n = len(labels)
  # Each image's pixel holds its index, so stacking can be checked exactly.
  images = np.zeros((n, 2, 2, 1), np.uint8)
  images[:, 0, 0, 0] = np.arange(n) % 256
  images[:, 0, 1, 0] = np.arange(n) // 256
  return Dataset(
    images=images,
    labels=labels,
    groups=None if groups is None else np.asarray(groups, np.int32),
    num_classes=num_classes,
  )


def mean_label_entropy(assignment, labels, num_classes) -> float:
  ents = []
  for a in assignment:
    p = np.bincount(labels[a], minlength=num_classes) / len(a)
    p = p[p > 0]
    ents.append(-(p * np.log(p)).sum())
  return float(np.mean(ents))


@pytest.mark.parametrize(
  "method,kwargs",
  [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.1}),
    ("dirichlet", {"alpha": 100.0}),
    ("quantity", {"alpha": 0.1}),
    ("by_group", {}),
  ],
)
def test_every_image_exactly_once(method, kwargs):
  ds = labelled(groups=np.arange(1000) % 5)
  kwargs = {"alpha": 0.5, **kwargs}  # rules ignore alpha when unused
  assignment = partition_lib.partition_indices(ds, 5, method, seed=3, **kwargs)
  flat = np.sort(np.concatenate(assignment))
  np.testing.assert_array_equal(flat, np.arange(1000))
  clients = partition_lib.partition(ds, 5, method, seed=3, **kwargs)
  assert clients.counts.sum() == 1000 and (clients.counts >= 1).all()
  assert clients.images.shape[:2] == (5, clients.counts.max())
  # Real (unpadded) entries of the stack are exactly the dataset, once each.
  ids = clients.images[..., 0, 0, 0].astype(int) + 256 * clients.images[..., 0, 1, 0].astype(int)
  real = np.concatenate([ids[c, :n] for c, n in enumerate(clients.counts)])
  np.testing.assert_array_equal(np.sort(real), np.arange(1000))


def test_same_seed_same_assignment():
  ds = labelled()
  a = partition_lib.partition_indices(ds, 4, "dirichlet", seed=1, alpha=0.3)
  b = partition_lib.partition_indices(ds, 4, "dirichlet", seed=1, alpha=0.3)
  c = partition_lib.partition_indices(ds, 4, "dirichlet", seed=2, alpha=0.3)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_label_skew_grows_as_alpha_shrinks():
  ds = labelled()
  ent = {
    alpha: np.mean(
      [
        mean_label_entropy(partition_lib.partition_indices(ds, 5, "dirichlet", seed=s, alpha=alpha), ds.labels, 10)
        for s in range(5)
      ]
    )
    for alpha in (100.0, 1.0, 0.1)
  }
  assert ent[100.0] > 0.95 * np.log(10)  # near uniform
  assert ent[100.0] > ent[1.0] > ent[0.1]
  assert ent[0.1] < 0.6 * np.log(10)


def test_dirichlet_min_size():
  ds = labelled(num_classes=4, per_class=30)
  for seed in range(5):
    parts = partition_lib.partition_indices(ds, 6, "dirichlet", seed=seed, alpha=0.05, min_size=5)
    assert min(len(p) for p in parts) >= 5


def test_quantity_skew_sizes():
  ds = labelled()

  def spread(alpha):
    return np.mean(
      [
        np.std([len(p) for p in partition_lib.partition_indices(ds, 5, "quantity", seed=s, alpha=alpha)])
        for s in range(5)
      ]
    )

  assert spread(0.1) > 3 * spread(100.0)
  for seed in range(5):
    parts = partition_lib.partition_indices(ds, 5, "quantity", seed=seed, alpha=0.01, min_size=7)
    sizes = [len(p) for p in parts]
    assert min(sizes) >= 7 and sum(sizes) == 1000
  with pytest.raises(ValueError, match="min_size=300"):
    partition_lib.partition_indices(ds, 5, "quantity", seed=0, alpha=1.0, min_size=300)


def test_by_group_one_client_per_group():
  groups = np.array([2, 0, 1, 2, 2, 0, 1, 1, 0, 2])
  ds = labelled(num_classes=1, per_class=10, groups=groups)
  parts = partition_lib.partition_indices(ds, 3, "by_group")
  for client, p in enumerate(parts):
    assert set(groups[p].tolist()) == {client}
  clients = partition_lib.partition(ds, 3, "by_group")
  np.testing.assert_array_equal(clients.counts, [3, 3, 4])
  with pytest.raises(ValueError, match=r"3 groups.*num_clients=4"):
    partition_lib.partition(ds, 4, "by_group")
  with pytest.raises(ValueError, match="data.group_column"):
    partition_lib.partition(labelled(), 3, "by_group")


def test_errors():
  ds = labelled()
  with pytest.raises(
    ValueError, match=r"data.partition='shards'.*\['by_group', 'dirichlet', 'full', 'iid', 'quantity'\]"
  ):
    partition_lib.partition(ds, 4, "shards")
  with pytest.raises(ValueError, match="data.alpha > 0"):
    partition_lib.partition(ds, 4, "dirichlet", alpha=0.0)
  with pytest.raises(ValueError, match="data.alpha > 0"):
    partition_lib.partition(ds, 4, "quantity")
  with pytest.raises(ValueError, match="single class"):
    partition_lib.partition(labelled(num_classes=1), 4, "dirichlet", alpha=1.0)
  with pytest.raises(ValueError, match="cannot be split into num_clients=5"):
    partition_lib.partition(labelled(num_classes=1, per_class=4), 5)
  with pytest.raises(ValueError, match="could not give each"):
    partition_lib.dirichlet(ds.labels, 4, 0.01, np.random.default_rng(0), min_size=240, max_tries=3)
  with pytest.raises(ValueError, match=r"left clients \[1\] with no images"):
    partition_lib.stack_clients(ds, [np.arange(5), np.array([], np.int64)])


def test_iid_unchanged_and_counts():
  ds = labelled(num_classes=2, per_class=5)
  clients = partition_lib.partition(ds, 3, "iid", seed=0)
  np.testing.assert_array_equal(clients.counts, [4, 3, 3])
  assert clients.labels.dtype == np.int32 and clients.counts.dtype == np.int32
  parts = partition_lib.iid(10, 3, np.random.default_rng(0))
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(10))


def test_full_gives_every_client_every_image():
  """``full`` (the paper's code: every client reads the whole dataset)."""
  ds = labelled()
  clients = partition_lib.partition(ds, 3, "full", seed=1)
  np.testing.assert_array_equal(clients.counts, [len(ds.images)] * 3)
  for c in range(3):
    got = np.sort(clients.images[c].reshape(len(ds.images), -1), axis=0)
    np.testing.assert_array_equal(got, np.sort(ds.images.reshape(len(ds.images), -1), axis=0))


@pytest.mark.parametrize(
  "method,kwargs",
  [("iid", {}), ("dirichlet", {"alpha": 0.1}), ("quantity", {"alpha": 0.1}), ("by_group", {}), ("full", {})],
)
def test_labels_stay_aligned_with_their_images(method, kwargs):
  """Every slot of the stacked shards (padding too) holds an image and that image's own label.

  model.conditional draws a batch's labels by the index of its images, so a partition that moved them apart
  would train D on wrong pairs. The labels are shuffled against the index order so only a true alignment passes.
  """
  ds = labelled(num_classes=4, per_class=50, groups=np.arange(200) % 5)
  ds = ds._replace(labels=np.random.default_rng(7).permutation(ds.labels))
  clients = partition_lib.partition(ds, 5, method, seed=3, **kwargs)
  ids = clients.images[..., 0, 0, 0].astype(int) + 256 * clients.images[..., 0, 1, 0].astype(int)
  np.testing.assert_array_equal(clients.labels, ds.labels[ids])
  if method == "dirichlet":  # Skewed: the clients' label mixes differ.
    mixes = [np.bincount(clients.labels[c, :n], minlength=4) / n for c, n in enumerate(clients.counts)]
    assert np.ptp([m[0] for m in mixes]) > 0.2
