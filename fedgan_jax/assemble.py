"""A run's parts, built from its config: the round program, the round data, replica configs.

The run (``experiment.run``), the benchmark and the tests assemble a round the
same way, here: models and aggregation rule by name, the federated program,
and the device-resident ``RoundData`` (client shards, who is malicious, the
poisoned images, the trigger).
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedgan_jax import aggregation, config_lib, models
from fedgan_jax.aggregation.fltrust import root_size_of
from fedgan_jax.data import partition as partition_lib
from fedgan_jax.data import sources, triggers
from fedgan_jax.data.types import Dataset
from fedgan_jax.federated import latent_trigger, sampling, upload_attacks
from fedgan_jax.federated import program as program_lib
from fedgan_jax.federated import replicas as replicas_lib
from fedgan_jax.federated.state import Program, RoundData


def local_steps(config, counts) -> int:
  """The steps of every client's local scan: ``train.local_steps``, or one epoch of the largest client.

  Args:
    config: a validated config.
    counts: ``[C]`` (or ``[K, C]`` for replicas) real images per client.

  Raises:
    ValueError: one local epoch (``train.local_steps = 0``) or DP-SGD
      (``train.dp_sgd.enabled``: batches of distinct images) and a client with
      fewer images than ``train.batch_size``.
  """
  counts = np.asarray(counts)
  B = config.train.batch_size
  if config.train.dp_sgd.enabled and counts.min() < B:
    raise ValueError(
      f"config.train.dp_sgd.enabled=True draws batches of train.batch_size={B} distinct images per client; the "
      f"smallest client has {int(counts.min())}. Use a smaller batch_size or fewer clients."
    )
  if config.train.local_steps:
    return config.train.local_steps
  if counts.min() < B:
    raise ValueError(
      f"config.train.local_steps=0 (one local epoch of full batches) needs at least train.batch_size={B} "
      f"images per client; the smallest client has {int(counts.min())}. Use a smaller batch_size, fewer "
      "clients or a positive local_steps."
    )
  return int(counts.max()) // B


def build_program(config, steps: int | None = None, num_classes: int = 0, rules=None) -> tuple[Program, Any, Any]:
  """``(program, generator, discriminator)`` for a validated config.

  One aggregator serves generators and (when averaged) discriminators: its
  functions are pure, and each model keeps its own aggregator state.

  Args:
    config: a validated config.
    steps: the local steps the program runs (``local_steps``); needed with
      ``train.local_steps = 0`` (one local epoch), else ``train.local_steps``.
    num_classes: the data's classes (``Dataset.num_classes``, ``setup_data``'s
      ``info['num_classes']``); required (>= 2) with ``model.conditional``, ignored otherwise.
    rules: packed sweep points' rules (``aggregation.choice.PointRules``) when they differ in the rule or its
      hyperparameters: the program takes each point's from ``RoundData.hyper``; None: ``config.aggregation``'s.

  Raises:
    ValueError: ``model.conditional`` without ``num_classes >= 2``.
  """
  g, d = models.build(config, num_classes)
  specs = rules.specs if rules is not None else ((config.aggregation.name, config.aggregation.kwargs.to_dict()),)
  m = sampling.clients_per_round(config)
  for name, kwargs in specs if m is not None else ():
    try:  # The rule aggregates m uploads a round: its requirements (Krum's C > 2f + 2 ...) are on m.
      aggregation.get(name, num_clients=m, **kwargs)
    except ValueError as e:
      raise ValueError(
        f"config.clients_per_round={m}: aggregation.name={name!r} aggregates the {m} "
        f"sampled clients of each round, and with {m} clients: {e}"
      ) from e
  C = config.num_clients  # A rule's per-client state has a row for every client (aggregation.base: client_axes).
  if rules is not None and rules.active:
    program = program_lib.build(
      config, g, d, rules.base(C), local_steps=steps, rule_for=lambda hyper: rules.build(hyper, C)
    )
    return program, g, d
  agg = aggregation.get(specs[0][0], num_clients=C, **specs[0][1])
  return program_lib.build(config, g, d, agg, local_steps=steps), g, d


def malicious_mask(config) -> np.ndarray:
  """``bool[C]``: the clients of ``attack.malicious``."""
  is_mal = np.zeros(config.num_clients, bool)
  is_mal[list(config.attack.malicious)] = True
  return is_mal


def root_size(config) -> int:
  """The server's root-set size: ``aggregation.kwargs.root_size`` with ``aggregation.name='fltrust'``, else 0."""
  return root_size_of(config.aggregation.name, config.aggregation.kwargs)


def check_conditional(config, train, info: dict) -> int:
  """The classes of a class-conditional run (``model.conditional``), checked against the data; 0 when off.

  Args:
    config: a validated config.
    train: the training ``Dataset``.
    info: the source's facts (``label_source``).

  Returns:
    ``train.num_classes`` with ``model.conditional``, else 0.

  Raises:
    ValueError: ``model.conditional`` with fewer than 2 classes (an unlabelled source) or labels out of range.
  """
  if not config.model.conditional:
    return 0
  k, source = int(train.num_classes), config.data.source
  if k < 2:
    raise ValueError(
      f"config.model.conditional=True is invalid with data.source={source!r}: its training data has {k} class "
      f"(labels: {info.get('label_source', 'none')}), and a class-conditional GAN needs labelled data with at "
      "least 2 classes (folder: data.labels_csv or a <split>/<class>/ layout; npz: *_labels arrays; tfds: "
      "data.label_key); or set model.conditional=False."
    )
  labels = np.asarray(train.labels)
  if labels.size and (labels.min() < 0 or labels.max() >= k):
    raise ValueError(
      f"config.model.conditional=True: data.source={source!r} gave labels in [{labels.min()}, {labels.max()}], "
      f"outside the {k} classes [0, {k - 1}] it declares."
    )
  return k


def round_data(config, images, counts, poison_flags=None, root=None, labels=None, root_labels=None) -> RoundData:
  """The device-resident round inputs for client shards under ``config``'s attack.

  Args:
    config: a validated config (``attack.*``, ``num_clients``, ``seed``).
    images: uint8 ``[C, n_max, R, R, ch]`` client shards.
    counts: ``[C]`` real images per client.
    poison_flags: ``bool[C, n_max]``; default: ``attack.poison_rate`` of each
      malicious client's real images, drawn from ``seed + 1``.
    root: uint8 ``[root_size(config), R, R, ch]``, the server's clean root set
      (``aggregation.name='fltrust'``; ``setup_data`` takes it from the held-out split).
    labels: int ``[C, n_max]`` class ids of the shards (``ClientData.labels``);
      kept only with ``model.conditional`` (required then), else ``RoundData.labels`` is None.
    root_labels: int ``[root_size(config)]`` class ids of ``root``; kept (and
      required) only with ``model.conditional`` and fltrust.

  Returns:
    A ``RoundData`` of device arrays.

  Raises:
    ValueError: ``root`` missing or of the wrong size under fltrust; labels
      missing or of the wrong shape with ``model.conditional``.
  """
  n_root = root_size(config)
  if n_root and (root is None or np.shape(root)[0] != n_root):
    raise ValueError(
      f"config.aggregation.kwargs.root_size={n_root}: the server's root set has "
      f"{0 if root is None else np.shape(root)[0]} images, {n_root} needed."
    )
  conditional = bool(config.model.conditional)
  if conditional and (labels is None or np.shape(labels) != np.shape(images)[:2]):
    raise ValueError(
      f"config.model.conditional=True: the client shards' labels must be [C, n_max] = {np.shape(images)[:2]} "
      f"class ids, got {None if labels is None else np.shape(labels)}."
    )
  if conditional and n_root and (root_labels is None or np.shape(root_labels) != (n_root,)):
    raise ValueError(
      f"config.model.conditional=True with aggregation.name='fltrust': the server's root set needs {n_root} "
      f"labels, got {None if root_labels is None else np.shape(root_labels)}."
    )
  is_mal = malicious_mask(config)
  counts = np.asarray(counts)
  if poison_flags is None:
    poison_flags = triggers.poison_flags(
      counts, np.shape(images)[1], is_mal, config.attack.poison_rate, config.seed + 1
    )
  trigger = triggers.load_trigger(config)
  if config.attack.dba:
    part = triggers.dba_parts(trigger.shape[0], list(config.attack.malicious), config.num_clients)
  else:
    part = np.ones((config.num_clients, *trigger.shape[:2]), bool)
  return RoundData(
    images=jnp.asarray(images),
    counts=jnp.asarray(counts, jnp.int32),
    is_malicious=jnp.asarray(is_mal),
    poison_flags=jnp.asarray(poison_flags),
    trigger=jnp.asarray(trigger),
    trigger_loc=jnp.asarray(triggers.trigger_location(config), jnp.int32),
    mimic=jnp.asarray(config.attack.report_losses == "mimic"),
    upload=upload_attacks.from_config(config),
    trigger_part=jnp.asarray(part),
    root=jnp.asarray(root, jnp.uint8) if n_root else None,
    latent=latent_trigger.from_config(config),
    labels=jnp.asarray(labels, jnp.int32) if conditional else None,
    root_labels=jnp.asarray(root_labels, jnp.int32) if conditional and n_root else None,
  )


class RunData(NamedTuple):
  """Everything ``setup_run_data`` loads for one run.

  Attributes:
    data: the device-resident ``RoundData``.
    heldout: the clean held-out ``Dataset`` (uint8).
    info: facts for ``summary.json``.
    members: a fixed random subset of the clients' clean (never poisoned)
      training images with their labels (uint8 ``Dataset``): the members of
      the membership inference and the real training set of TRTR
      (``evaluation``); at most ``member_count(config)`` images.
    target_class: the most common label of the poisoned training images (the
      class a conditional generator's backdoor is read toward), -1 when none
      is poisoned.
  """

  data: RoundData
  heldout: Any
  info: dict
  members: Any
  target_class: int


def member_count(config) -> int:
  """How many clean training images the evaluation keeps: for ``eval.mia_samples`` and, conditional, TRTR."""
  n = config.eval.mia_samples
  if config.model.conditional and config.eval.utility_every >= 0:
    n = max(n, config.eval.utility_samples)
  return int(n)


def clean_members(images, labels, counts, poison_flags, n: int, seed: int) -> Dataset:
  """``n`` (or fewer) clean training images drawn without replacement from the client shards, with labels.

  Args:
    images: uint8 ``[C, n_max, R, R, ch]`` client shards.
    labels: int ``[C, n_max]``.
    counts: ``[C]`` real images per client (the rest is padding).
    poison_flags: bool ``[C, n_max]`` images that carry the trigger (left out).
    n: images wanted.
    seed: the run's seed (the draw is fixed for the run).

  Returns:
    A ``Dataset`` of at most ``n`` images in a random order.
  """
  counts, flags = np.asarray(counts), np.asarray(poison_flags)
  real = np.arange(flags.shape[1])[None, :] < counts[:, None]
  c_idx, i_idx = np.nonzero(real & ~flags)
  # Its own stream of the seed: it does not correlate with the partition's or the poison flags' draws.
  order = np.random.default_rng((seed, 0x3E3B)).permutation(len(c_idx))
  images = np.asarray(images)
  # The same image can sit at several clients (data.partition='full'): each is kept once.
  seen, pick = set(), []
  for j in order:
    if len(pick) == n:
      break
    digest = hash(images[c_idx[j], i_idx[j]].tobytes())
    if digest not in seen:
      seen.add(digest)
      pick.append(j)
  c_idx, i_idx = c_idx[pick], i_idx[pick]
  return Dataset(images=images[c_idx, i_idx], labels=np.asarray(labels)[c_idx, i_idx].astype(np.int32))


def setup_data(config) -> tuple[RoundData, Any, dict]:
  """``setup_run_data``'s round data, clean held-out ``Dataset`` and info dict."""
  r = setup_run_data(config)
  return r.data, r.heldout, r.info


def setup_run_data(config) -> RunData:
  """Loads, partitions and poisons the data; returns device-resident round inputs and the evaluation's references.

  With ``aggregation.name='fltrust'`` the server's root set is the first
  ``aggregation.kwargs.root_size`` images of the clean held-out split: images
  no client holds (so none is poisoned), which the evaluation also uses as
  real references (the server's model itself is never aggregated). With
  ``model.conditional`` the round data carries the shards' labels (and the
  root set's), and ``info['num_classes']`` is what ``build_program`` needs.

  Returns:
    A ``RunData``.

  Raises:
    ValueError: fewer held-out images than ``aggregation.kwargs.root_size``;
      ``model.conditional`` with unlabelled data (``check_conditional``).
  """
  train, heldout, info = sources.load_data(config)
  sources.check_enough(train, config)
  check_conditional(config, train, info)
  n_root = root_size(config)
  if n_root > len(heldout.images):
    raise ValueError(
      f"config.aggregation.kwargs.root_size={n_root} is invalid: fltrust's root set is drawn from the clean "
      f"held-out split, which has {len(heldout.images)} images; accepted: 1..{len(heldout.images)} "
      "(or a larger data.heldout)."
    )
  kwargs = {"alpha": config.data.alpha} if config.data.partition in ("dirichlet", "quantity") else {}
  clients = partition_lib.partition(train, config.num_clients, config.data.partition, config.seed, **kwargs)
  data = round_data(
    config,
    clients.images,
    clients.counts,
    root=heldout.images[:n_root] if n_root else None,
    labels=clients.labels,
    root_labels=heldout.labels[:n_root] if n_root else None,
  )
  info = {
    **info,
    "client_counts": clients.counts.tolist(),
    "poisoned_per_client": np.asarray(data.poison_flags).sum(1).tolist(),
    **({"fltrust_root_images": n_root} if n_root else {}),
  }
  flags = np.asarray(data.poison_flags)
  members = clean_members(
    clients.images, clients.labels, clients.counts, flags, member_count(config), config.seed
  )._replace(num_classes=train.num_classes, class_names=train.class_names)
  poisoned_labels = np.asarray(clients.labels)[flags]
  target = int(np.bincount(poisoned_labels).argmax()) if len(poisoned_labels) else -1
  return RunData(data, heldout, info, members, target)


def replica_configs(config) -> list[Any]:
  """The run's config, or with ``num_replicas = K > 1`` one config per seed ``seed .. seed+K-1``."""
  if config.num_replicas == 1:
    return [config]
  out = []
  for s in replicas_lib.replica_seeds(config.seed, config.num_replicas):
    c = copy.deepcopy(config)
    with c.unlocked():
      c.seed, c.num_replicas = s, 1
    out.append(c)
  return out


def own_trigger(data: RoundData, config) -> RoundData:
  """``data`` (one member's) with the trigger, its location and the clients' parts as ``config``'s own run has them.

  A packed point whose trigger is smaller than the pack's largest carries it in a larger window
  (``replicas.stack_replicas``); what reads the trigger on the host (the evaluator, ``poisoned_examples``) gets
  the point's own. Unchanged (the same object) when the side is already the config's.
  """
  size = config_lib.trigger_geometry(config)[0]
  if data.trigger.shape[0] == size:
    return data
  trigger, part, loc = triggers.crop_window(
    data.trigger, data.trigger_part, data.trigger_loc, triggers.trigger_location(config), size
  )
  return data._replace(trigger=jnp.asarray(trigger), trigger_part=jnp.asarray(part), trigger_loc=jnp.asarray(loc))


def poisoned_examples(data: RoundData, config, max_images: int = 512) -> np.ndarray:
  """The malicious clients' poisoned training images (trigger pasted), as float [-1, 1]."""
  flags = np.asarray(data.poison_flags)
  c_idx, i_idx = np.nonzero(flags)
  if not len(c_idx):
    return np.zeros((0,), np.float32)
  c_idx, i_idx = c_idx[:max_images], i_idx[:max_images]
  imgs = np.asarray(data.images)[c_idx, i_idx].astype(np.float32) / 127.5 - 1.0
  if config.attack.trigger_location == "random":
    loc = triggers.random_locations(jax.random.key(config.seed), len(imgs), data.trigger.shape[0], config.resolution)
  else:
    loc = data.trigger_loc
  return np.asarray(triggers.paste(jnp.asarray(imgs), data.trigger, loc, jnp.ones(len(imgs), bool)))
