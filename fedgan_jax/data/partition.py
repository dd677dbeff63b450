"""Partitioning a dataset into clients, stacked with padding (docs/design.md §2).

Partitions (``config.data.partition``, registry ``PARTITIONS``):

* ``iid`` -- a random permutation split into near-equal parts.
* ``dirichlet`` -- label skew, the standard per-class Dirichlet split (Hsu et
  al. 2019; NIID-Bench, Li et al. 2022): for each class, client shares are
  drawn from ``Dir(alpha * 1_C)`` and the class's images are cut by them;
  as in NIID-Bench, a client already holding ``>= N / C`` images gets no share
  of later classes (keeps sizes from exploding). The draw is repeated until
  every client has ``>= min_size`` images (error after ``max_tries``). Small
  ``alpha`` (0.1) = strong skew; large (100) = close to iid.
* ``quantity`` -- quantity skew: client sizes ``∝ Dir(alpha * 1_C)``, labels
  iid. Each client first gets ``min_size`` images and the rest are split by
  the Dirichlet proportions (largest-remainder rounding), so ``>= min_size`` is
  guaranteed without retries.
* ``by_group`` -- one client per group value (``Dataset.groups``, e.g. the
  HAM10000 ``dataset`` column = acquisition site); the number of groups must
  equal ``num_clients``. Client ``i`` holds the ``i``-th group id in sorted
  order.
* ``full`` -- every client holds the whole training set, as in the paper's
  code (each client's DataLoader reads the same dataset); clients differ only
  in the order they draw it.

Every other rule assigns every image to exactly one client (checked).
Aggregation weights follow the real example counts (``ClientData.counts``).
``min_size`` defaults to 1; training draws batches from ``[0, counts[c])`` so a
client smaller than the batch is sampled with repetition.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedgan_jax.data.types import ClientData, Dataset

Assignment = list[np.ndarray]


def stack_clients(ds: Dataset, assignment: list[np.ndarray]) -> ClientData:
  """Stacks per-client index lists into padded ``[C, n_max, ...]`` arrays.

  Args:
    ds: the dataset.
    assignment: one int array of dataset indices per client (non-empty).

  Returns:
    ``ClientData``; padding repeats the client's first image (never sampled).
  """
  counts = np.array([len(a) for a in assignment], np.int32)
  if np.any(counts == 0):
    empty = [i for i, c in enumerate(counts) if c == 0]
    raise ValueError(
      f"data.partition left clients {empty} with no images; use more data, fewer clients, or a less skewed partition."
    )
  n_max = int(counts.max())
  padded = np.stack([np.concatenate([a, np.full(n_max - len(a), a[0])]) for a in assignment])
  return ClientData(images=ds.images[padded], labels=ds.labels[padded].astype(np.int32), counts=counts)


def iid(num_images: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
  """IID partition: a random permutation split into near-equal contiguous parts."""
  perm = rng.permutation(num_images)
  return [np.sort(p) for p in np.array_split(perm, num_clients)]


def dirichlet(
  labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator, min_size: int = 1, max_tries: int = 1000
) -> Assignment:
  """Label-skew partition: per-class client shares drawn from ``Dir(alpha)``.

  Args:
    labels: int ``[N]`` class ids.
    num_clients: C.
    alpha: Dirichlet concentration (> 0); smaller = more skew.
    rng: host RNG.
    min_size: every client gets at least this many images.
    max_tries: redraws allowed before giving up.

  Returns:
    One sorted index array per client.
  """
  labels = np.asarray(labels)
  n = len(labels)
  if n < num_clients * min_size:
    raise ValueError(f"{n} images cannot give num_clients={num_clients} clients min_size={min_size} images each.")
  classes = np.unique(labels)
  by_class = [np.flatnonzero(labels == k) for k in classes]
  for _ in range(max_tries):
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    sizes = np.zeros(num_clients, np.int64)
    for idx in by_class:
      idx = rng.permutation(idx)
      p = rng.dirichlet(np.full(num_clients, alpha))
      p = p * (sizes < n / num_clients)  # NIID-Bench: full clients get no more.
      p = p / p.sum() if p.sum() > 0 else np.full(num_clients, 1.0 / num_clients)
      cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
      for c, chunk in enumerate(np.split(idx, cuts)):
        parts[c].append(chunk)
        sizes[c] += len(chunk)
    if sizes.min() >= min_size:
      return [np.sort(np.concatenate(p)) for p in parts]
  raise ValueError(
    f"data.partition='dirichlet' with data.alpha={alpha} could not give each "
    f"of num_clients={num_clients} clients >= {min_size} images in "
    f"{max_tries} draws ({n} images, {len(classes)} classes); raise "
    "data.alpha, use fewer clients, or more data."
  )


def quantity(
  num_images: int, num_clients: int, alpha: float, rng: np.random.Generator, min_size: int = 1
) -> Assignment:
  """Quantity-skew partition: sizes ``∝ Dir(alpha)``, each ``>= min_size``.

  Args:
    num_images: N.
    num_clients: C.
    alpha: Dirichlet concentration (> 0); smaller = more unequal sizes.
    rng: host RNG.
    min_size: guaranteed minimum client size.

  Returns:
    One sorted index array per client (labels iid within the sizes).
  """
  spare = num_images - num_clients * min_size
  if spare < 0:
    raise ValueError(
      f"{num_images} images cannot give num_clients={num_clients} clients min_size={min_size} images each."
    )
  p = rng.dirichlet(np.full(num_clients, alpha))
  exact = p * spare
  extra = np.floor(exact).astype(np.int64)
  # Largest-remainder rounding so the sizes sum to N exactly.
  order = np.argsort(-(exact - extra), kind="stable")
  extra[order[: spare - int(extra.sum())]] += 1
  sizes = min_size + extra
  perm = rng.permutation(num_images)
  return [np.sort(a) for a in np.split(perm, np.cumsum(sizes)[:-1])]


def by_group(groups: np.ndarray, num_clients: int) -> Assignment:
  """One client per group value (client i = i-th sorted group id).

  Args:
    groups: int ``[N]`` group ids.
    num_clients: C, must equal the number of distinct groups.

  Returns:
    One sorted index array per client.
  """
  values = np.unique(groups)
  if len(values) != num_clients:
    raise ValueError(
      f"data.partition='by_group' needs one client per group, but "
      f"data.group_column has {len(values)} groups (ids {values.tolist()}) "
      f"and num_clients={num_clients}."
    )
  return [np.flatnonzero(groups == g) for g in values]


def _check_assignment(assignment: Assignment, num_images: int, num_clients: int, method: str) -> None:
  """Every image exactly once (every image at every client for ``full``), exactly ``num_clients`` parts."""
  if len(assignment) != num_clients:
    raise ValueError(f"data.partition={method!r} gave {len(assignment)} clients, expected num_clients={num_clients}.")
  if method == "full":
    if any(np.any(np.sort(a) != np.arange(num_images)) for a in assignment):
      raise ValueError(f"data.partition='full' must give every client all {num_images} images.")
    return
  flat = np.sort(np.concatenate(assignment)) if assignment else np.zeros(0, np.int64)
  if flat.shape != (num_images,) or np.any(flat != np.arange(num_images)):
    raise ValueError(f"data.partition={method!r} did not assign every one of the {num_images} images exactly once.")


def partition(ds: Dataset, num_clients: int, method: str = "iid", seed: int = 0, **kwargs) -> ClientData:
  """Splits ``ds`` into ``num_clients`` clients.

  Args:
    ds: the training dataset.
    num_clients: C.
    method: partition name (see ``PARTITIONS``).
    seed: host RNG seed for the assignment.
    **kwargs: method hyperparameters: ``alpha`` (``dirichlet``, ``quantity``)
      and ``min_size`` (default 1); rules ignore the ones they do not use, so
      callers may always pass ``alpha=config.data.alpha``.

  Returns:
    The stacked ``ClientData``.
  """
  if method not in PARTITIONS:
    raise ValueError(f"data.partition={method!r} is not known; accepted: {sorted(PARTITIONS)}.")
  n = len(ds.images)
  if n < num_clients:
    raise ValueError(f"{n} images cannot be split into num_clients={num_clients} clients.")
  rng = np.random.default_rng(seed)
  assignment = PARTITIONS[method](ds, num_clients, rng, **kwargs)
  _check_assignment(assignment, n, num_clients, method)
  return stack_clients(ds, assignment)


def partition_indices(ds: Dataset, num_clients: int, method: str = "iid", seed: int = 0, **kwargs) -> Assignment:
  """Like ``partition`` but returns the per-client index arrays (unstacked)."""
  if method not in PARTITIONS:
    raise ValueError(f"data.partition={method!r} is not known; accepted: {sorted(PARTITIONS)}.")
  assignment = PARTITIONS[method](ds, num_clients, np.random.default_rng(seed), **kwargs)
  _check_assignment(assignment, len(ds.images), num_clients, method)
  return assignment


def _alpha(alpha: float | None, method: str) -> float:
  if alpha is None or not float(alpha) > 0:
    raise ValueError(f"data.partition={method!r} needs data.alpha > 0, got {alpha!r}.")
  return float(alpha)


def _iid(ds: Dataset, num_clients: int, rng: np.random.Generator, **unused) -> list[np.ndarray]:
  del unused
  return iid(len(ds.images), num_clients, rng)


def _dirichlet(
  ds: Dataset, num_clients: int, rng: np.random.Generator, alpha: float | None = None, min_size: int = 1, **unused
) -> Assignment:
  del unused
  if len(np.unique(ds.labels)) < 2:
    raise ValueError(
      "data.partition='dirichlet' skews labels, but this dataset has "
      "a single class; use data.partition='quantity' (size skew) "
      "or give labels (data.labels_csv)."
    )
  return dirichlet(ds.labels, num_clients, _alpha(alpha, "dirichlet"), rng, min_size)


def _quantity(
  ds: Dataset, num_clients: int, rng: np.random.Generator, alpha: float | None = None, min_size: int = 1, **unused
) -> Assignment:
  del unused
  return quantity(len(ds.images), num_clients, _alpha(alpha, "quantity"), rng, min_size)


def _by_group(ds: Dataset, num_clients: int, rng: np.random.Generator, **unused) -> Assignment:
  del rng, unused
  if ds.groups is None:
    raise ValueError(
      "data.partition='by_group' needs groups: set data.group_column "
      "to a column of data.labels_csv (e.g. HAM10000 'dataset')."
    )
  return by_group(ds.groups, num_clients)


def _full(ds: Dataset, num_clients: int, rng: np.random.Generator, **unused) -> Assignment:
  del unused
  return [rng.permutation(len(ds.images)) for _ in range(num_clients)]


PARTITIONS: dict[str, Callable[..., Assignment]] = {
  "full": _full,
  "iid": _iid,
  "dirichlet": _dirichlet,
  "quantity": _quantity,
  "by_group": _by_group,
}
