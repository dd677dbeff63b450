"""Sweep points that share one program shape, trained as ONE program over a leading point axis.

The attack grids of Jin & Li (SASHIMI 2022, FedDetect 2023) and of the
backdoor literature vary who is malicious, the trigger, the poison rate, the
attack on the uploads, its window and the seed far more often than the model.
All of those are array inputs of the round (``RoundData``), not Python values
the program is traced with, so such points need one compiled program; and on
an accelerator one point's round is far too small to fill the device
(docs/design.md §6). ``num_replicas`` already vmaps K seeds of one config over
a leading axis (``federated/replicas.py``); a pack does the same for any points
whose configs differ only in such inputs (``PACKABLE_FIELDS``), or in the
learning rates and regularizer weights that the packed program takes per
point as traced scalars (``TRACED_FIELDS``, ``RoundData.hyper``; a weight
only where every point has its term on), or in the server's rule: points of
different ``aggregation.name`` / ``aggregation.kwargs`` (FLTrust aside) share a
program whose server runs each point's own rule (``aggregation.choice.one_of``
of the distinct rules, the point's index and its rule's float hyperparameters
traced in ``RoundData.hyper``; every point computes the k rules and keeps its
own, so a pack of k rules costs k aggregations a round):

* ``signature(config)`` is the config with those fields left out (and, under
  ``attack.trigger_location='random'``, the resolved trigger side put in):
  points with equal signatures pack. Fixed-location triggers of different
  sides pack: each point's sits in a window of the pack's largest side whose
  other pixels paste the image's own (``triggers.pad_window``), so its
  poisoned images are bit-identical to its own run's;
  ``why_apart`` names the fields that keep two points in separate programs;
  ``traced_fields`` those a program's points differ in (each point's own input).
* ``plan(configs)`` groups the points; ``run_packed(configs, workdirs)``
  trains one group. Point ``k`` writes ``workdirs[k]`` exactly as
  ``experiment.run(configs[k], workdirs[k])`` would (``config.json``,
  ``metrics.jsonl`` equal up to float reassociation, samples, ``summary.json``
  with a ``pack`` block, the report) including its own ``checkpoints/``
  (unstacked), so each point resumes packed or on its own.
* A group whose points would not train exactly as their own runs (different
  local-step counts from their data, client shards of different lengths
  under one-epoch training, checkpoints at different rounds) raises
  ``NotPackableError`` before anything is written; ``launch.sweep`` then runs
  its points one by one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedgan_jax import assemble, config_lib, distributed, experiment, fork, resume, run_console
from fedgan_jax.aggregation import choice
from fedgan_jax.federated import replicas as replicas_lib
from fedgan_jax.io import lock as lock_lib

# Fields that only change array inputs of the round (RoundData, keys) or per-point outputs: points that differ in
# nothing else share one program. attack.trigger_size: a fixed-location trigger is padded to the pack's largest
# side (replicas.stack_replicas); random locations are drawn with the side, which then enters the signature.
PACKABLE_FIELDS = (
  "seed",
  "init_from",
  "attack.malicious",
  "attack.trigger",
  "attack.trigger_size",
  "attack.trigger_margin",
  "attack.trigger_range",
  "attack.poison_rate",
  "attack.report_losses",
  "attack.dba",
  "attack.upload",
  "attack.upload_strength",
  "attack.start_round",
  "attack.end_round",
  "attack.every",
  "attack.latent_weight",
  "data.partition",
  "data.alpha",
  "wandb.group",
)

# Fields the packed program takes per point as traced f32 scalars (RoundData.hyper, by client.TRACED_HYPER's
# names) when the points of a pack differ in them. A regularizer weight packs only with others of its kind that
# are on: 0 (the term is not traced at all) vs nonzero stays in the signature, and under train.dp_sgd (whose
# per-example loss takes the penalties' weights as constants) the weights stay in it whole.
TRACED_FIELDS = {
  "train.g_lr": "g_lr",
  "train.d_lr": "d_lr",
  "train.regularizers.gradient_penalty": "gradient_penalty",
  "train.regularizers.r1": "r1",
  "train.regularizers.proximal": "proximal",
}
_DP_CONSTANT = ("train.regularizers.gradient_penalty", "train.regularizers.r1")


class NotPackableError(ValueError):
  """The points cannot train as one program exactly as their own runs would (nothing was written)."""


def _flat(config) -> dict[str, Any]:
  out = {}

  def walk(d, prefix):
    for k, v in d.items():
      if isinstance(v, dict) and v and not prefix + k == "aggregation.kwargs":
        walk(v, f"{prefix}{k}.")
      else:
        out[f"{prefix}{k}"] = v

  walk(json.loads(config_lib.to_json(config)), "")
  return out


def _traceable(config) -> list[str]:
  """The ``TRACED_FIELDS`` that may differ between the points of one program of ``config``'s."""
  dp = bool(config.train.dp_sgd.enabled)
  return [f for f in TRACED_FIELDS if not (dp and f in _DP_CONSTANT)]


def _program_fields(config) -> dict[str, Any]:
  """The fields that shape the program: every field but ``PACKABLE_FIELDS``, and a random location's trigger side.

  Random locations are drawn in ``[0, resolution - side]``: a trigger padded to a larger side would land
  elsewhere, so there the resolved side stays in the signature.

  A traced field (``TRACED_FIELDS``) is there only as what the program depends on: nothing for a learning
  rate, ``'nonzero'`` or ``0.0`` for a regularizer weight.
  """
  flat = {k: v for k, v in _flat(config).items() if k not in PACKABLE_FIELDS}
  for f in _traceable(config):
    if f.startswith("train.regularizers."):
      flat[f] = "nonzero" if flat[f] else 0.0
    else:
      del flat[f]
  if config.attack.trigger_location == "random":
    flat["(trigger side in px, random location)"] = config_lib.trigger_geometry(config)[0]
  if choice.choosable(config.aggregation.name):  # Each point's own rule in the program (aggregation.choice).
    flat["aggregation.name"] = flat["aggregation.kwargs"] = "(each point's own)"
  return flat


def traced_fields(configs: Sequence[Any]) -> list[str]:
  """The fields in which the points of one program differ, each a per-point input of it (sorted).

  The ``PACKABLE_FIELDS`` (round data, keys) and the ``TRACED_FIELDS`` (``RoundData.hyper``) that are not
  equal in all of ``configs``.
  """
  flats = [_flat(c) for c in configs]
  names = set(PACKABLE_FIELDS) | set(TRACED_FIELDS) | {"aggregation.name"}
  kwargs = [fl["aggregation.kwargs"] for fl in flats]
  names |= {
    f"aggregation.kwargs.{k}" for k in set().union(*kwargs) if len({json.dumps(kw.get(k)) for kw in kwargs}) > 1
  }
  return sorted(
    f for f in names if f.startswith("aggregation.kwargs.") or any(fl.get(f) != flats[0].get(f) for fl in flats[1:])
  )


def point_rules(configs: Sequence[Any]) -> choice.PointRules:
  """The server rules of packed points (``aggregation.choice.point_rules`` of their name and kwargs)."""
  return choice.point_rules([(c.aggregation.name, c.aggregation.kwargs.to_dict()) for c in configs])


def hyper_inputs(configs: Sequence[Any]) -> dict[str, jax.Array] | None:
  """``RoundData.hyper`` of packed points: each ``TRACED_FIELDS`` value they differ in, f32 ``[K]``; None if none.

  A field equal in every point stays a constant of the program (as in each point's own run). Points of several
  server rules, or of one rule with different float hyperparameters, add the rule's index and those values
  (``aggregation.choice.PointRules.hyper``).
  """
  flats = [_flat(c) for c in configs]
  out = {
    TRACED_FIELDS[f]: jnp.asarray([float(fl[f]) for fl in flats], jnp.float32)
    for f in _traceable(configs[0])
    if len({fl[f] for fl in flats}) > 1
  }
  rules = point_rules(configs)
  if rules.active:
    out.update(rules.hyper())
  return out or None


def signature(config) -> str:
  """The program a point trains in: points with equal signatures pack (a JSON text)."""
  return json.dumps(_program_fields(config), sort_keys=True, default=str)


def why_apart(a, b, limit: int = 3) -> list[str]:
  """The fields (``'name: a vs b'``) that keep configs ``a`` and ``b`` in different programs, at most ``limit``."""
  fa, fb = _program_fields(a), _program_fields(b)
  ra, rb = _flat(a), _flat(b)  # A regularizer weight is named by its value (0.0 vs 10.0), not 'nonzero'.
  keys = [k for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
  named = {k: (json.dumps(ra.get(k, fa.get(k))), json.dumps(rb.get(k, fb.get(k)))) for k in keys}
  # A field whose values are equal is no reason (fltrust's kwargs {} vs another rule's {}).
  diff = [f"{k}: {x} vs {y}" for k, (x, y) in named.items() if x != y]
  return diff[:limit] + ([f"and {len(diff) - limit} more"] if len(diff) > limit else [])


def saved_round(workdir: str) -> int:
  """The newest checkpointed round in ``<workdir>/checkpoints`` (0 if none), read from the folder names."""
  d = os.path.join(workdir, "checkpoints")
  rounds = [int(n) for n in (os.listdir(d) if os.path.isdir(d) else []) if n.isdigit()]
  return max(rounds, default=0)


class PackPlan(NamedTuple):
  """Points grouped into programs.

  Attributes:
    groups: point indices per program (every point in exactly one; singletons run alone).
    reasons: for a point alone, why (``'its program differs from <name>'s in ...'``).
    traced: per group, the fields its points differ in (``traced_fields``): each point's own input.
    rules: per group, its distinct server rules (``aggregation.choice``): every point computes them all.
  """

  groups: list[list[int]]
  reasons: dict[int, str]
  traced: tuple = ()
  rules: tuple = ()


def plan(configs: Sequence[Any], names: Sequence[str], workdirs: Sequence[str] | None = None, max_size: int = 0):
  """Groups points by ``signature`` (and, with ``workdirs``, by the round their checkpoints are at).

  Args:
    configs: each point's validated config.
    names: each point's name (in the reasons).
    workdirs: each point's run directory: points resume together only from the same round.
    max_size: at most this many points per program (0: no limit), e.g. to fit an accelerator's memory.

  Returns:
    A ``PackPlan`` (groups in the order of their first point).
  """
  at = [saved_round(d) for d in workdirs] if workdirs else [0] * len(configs)
  sigs = [signature(c) for c in configs]
  keyed: dict[tuple, list[int]] = {}
  for i in range(len(configs)):
    keyed.setdefault((sigs[i], at[i]), []).append(i)
  groups = []
  for idx in keyed.values():
    size = max_size if max_size > 0 else len(idx)
    groups += [idx[j : j + size] for j in range(0, len(idx), size)]
  groups.sort(key=lambda g: g[0])
  reasons = {}
  for (i,) in (g for g in groups if len(g) == 1):
    same = [j for j in range(len(configs)) if j != i and sigs[j] == sigs[i]]
    if any(at[j] == at[i] for j in same):
      reasons[i] = f"the programs hold at most --pack-size={max_size} points"
    elif same:
      reasons[i] = f"its checkpoints are at round {at[i]}, {names[same[0]]}'s at {at[same[0]]}"
    elif len(configs) == 1:
      reasons[i] = "the only point to run"
    else:
      j = min((j for j in range(len(configs)) if j != i), key=lambda j: (len(why_apart(configs[i], configs[j], 99)), j))
      reasons[i] = f"its program differs from {names[j]}'s in " + "; ".join(why_apart(configs[i], configs[j]))
  members = [[configs[i] for i in g] for g in groups]
  rules = tuple(len(point_rules(m).specs) if len(m) > 1 else 1 for m in members)
  return PackPlan(groups, reasons, tuple(traced_fields(m) for m in members), rules)


def plan_lines(p: PackPlan, names: Sequence[str]) -> list[str]:
  """The plan as printed by ``launch.sweep --pack``: one line per program, the reason for each point alone."""
  packed = [g for g in p.groups if len(g) > 1]
  lines = [f"pack plan: {sum(map(len, p.groups))} points in {len(p.groups)} programs ({len(packed)} packed)"]
  for n, g in enumerate(p.groups):
    if len(g) > 1:
      per = f" (per point: {', '.join(p.traced[n])})" if p.traced and p.traced[n] else ""
      if p.rules and p.rules[n] > 1:  # The cost a user should see: every point runs every rule of its program.
        per += f"; {p.rules[n]} server rules, each point computes all of them"
      lines.append(f"  program {n + 1}: {len(g)} points packed: {', '.join(names[i] for i in g)}{per}")
    else:
      lines.append(f"  program {n + 1}: {names[g[0]]} alone ({p.reasons.get(g[0], '')})")
  return lines


def _check_members(configs: Sequence[Any], datas: Sequence[Any]) -> None:
  """Raises ``NotPackableError`` where a point's own run would differ in shape from the packed program."""
  steps = [assemble.local_steps(c, d.counts) for c, d in zip(configs, datas)]
  if len(set(steps)) > 1:
    raise NotPackableError(f"the points' data give different local steps per round {steps} (one local epoch)")
  lengths = [d.images.shape[1] for d in datas]
  if configs[0].train.local_steps == 0 and len(set(lengths)) > 1:
    # One local epoch shuffles a client's whole (padded) shard: padding would change the order.
    raise NotPackableError(f"one local epoch over client shards of different lengths {lengths}")


def _member_like(like: Any) -> Any:
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype, sharding=s.sharding), like)


def _stack(states: Sequence[Any]) -> Any:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def _own(state: Any, rule: int | None) -> Any:
  """A point's state as its own run has it: of a pack of several rules, only its rule's aggregator states."""
  return state if rule is None else state._replace(g_agg=state.g_agg[rule], d_agg=state.d_agg[rule])


def _in_pack(own: Any, like: Any, rule: int | None) -> Any:
  """The inverse of ``_own``: the point's aggregator states in its rule's slots of the pack's (``like``).

  The other rules' slots are zeros: the point's round computes them and never keeps their result.
  """
  if rule is None:
    return own
  zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)
  slots = lambda mine, every: tuple(mine if j == rule else zeros(x) for j, x in enumerate(every))
  return own._replace(g_agg=slots(own.g_agg, like.g_agg), d_agg=slots(own.d_agg, like.d_agg))


class PackCheckpointer:
  """Each point's own ``<workdir>/checkpoints`` (its part of the stacked state), as ``experiment.RunCheckpointer``.

  Args:
    configs: the points' configs.
    workdirs: their run directories.
    primary: whether this process writes.
    rules: per point, its rule's slot in the pack's aggregator states when the points have several rules
      (``aggregation.choice.one_of``: each point saves and restores only its own); None: one rule.
  """

  def __init__(
    self, configs: Sequence[Any], workdirs: Sequence[str], primary: bool = True, rules: Sequence[int] | None = None
  ):
    self.configs = list(configs)
    self.ckpts = [experiment.RunCheckpointer(os.path.join(d, "checkpoints"), primary=primary) for d in workdirs]
    self.rules = list(rules) if rules is not None else [None] * len(self.configs)

  def _together(self, starts: list[int], what: str) -> None:
    if len(set(starts)) > 1:
      raise NotPackableError(f"the points {what} different rounds {starts}")

  def resume(self, like: Any, config, warn) -> tuple[int, Any | None]:
    """Every point's ``resume.restore``; they must all start fresh or all resume from the same round."""
    del config
    one = _member_like(like)
    found = [resume.restore(ck, _own(one, rule), c, warn) for ck, c, rule in zip(self.ckpts, self.configs, self.rules)]
    self._together([r for r, _ in found], "resume from")
    if found[0][1] is None:
      return 0, None
    return found[0][0], _stack([_in_pack(s, one, rule) for (_, s), rule in zip(found, self.rules)])

  def fork(self, like: Any, fresh: Any, config) -> tuple[int, Any]:
    """Every point's ``fork.restore`` (its own ``init_from``); the bases must be at the same round."""
    del config
    one = _member_like(like)
    found = [
      fork.restore(c.init_from, one, replicas_lib.unstack(fresh, k), c)
      if c.init_from
      else (0, replicas_lib.unstack(fresh, k))
      for k, c in enumerate(self.configs)
    ]
    self._together([r for r, _ in found], "fork at")
    return found[0][0], _stack([s for _, s in found])

  def write_config(self, config_json: str) -> None:
    del config_json  # Each point records its own config.
    for ck, c in zip(self.ckpts, self.configs):
      ck.write_config(config_lib.to_json(c))

  def save(self, round_: int, state: Any) -> None:
    for k, ck in enumerate(self.ckpts):
      ck.save(round_, _own(replicas_lib.unstack(state, k), self.rules[k]))

  def latest_round(self) -> int | None:
    rounds = [ck.latest_round() for ck in self.ckpts]
    return None if None in rounds else min(rounds)

  def close(self) -> None:
    errors = []
    for ck in self.ckpts:
      try:
        ck.close()
      except OSError as e:
        errors.append(e)
    if errors:
      raise errors[0]


def _own_metric_keys(configs: Sequence[Any], rules: choice.PointRules, b: Any) -> tuple[frozenset, ...]:
  """Per point, the metric keys of its own run (its rule's diagnostics, not the other rules' of the pack).

  Read from the round of one point of each rule as its own run would trace it (``jax.eval_shape``: traced, not
  compiled or run).

  Raises:
    NotPackableError: two rules write one metric with different shapes or dtypes (``aggregation.choice.one_of``
      could not hold both); nothing is written yet.
  """
  metrics, seen = {}, {}
  for k, (c, i) in enumerate(zip(configs, rules.index)):
    if i not in metrics:
      data = assemble.own_trigger(b.view(b.data, k), c)._replace(hyper=None)  # As its own run has it.
      program, _, _ = assemble.build_program(c, assemble.local_steps(c, data.counts), b.num_classes)
      state = jax.eval_shape(program.init, jax.random.key(0))
      metrics[i] = jax.eval_shape(program.round, state, data, jax.random.key(0))[1]
      for key, v in metrics[i].items():
        first = seen.setdefault(key, (c.aggregation.name, v))
        if (first[1].shape, first[1].dtype) != (v.shape, v.dtype):
          raise NotPackableError(
            f"the rules {first[0]!r} and {c.aggregation.name!r} write {key} as {first[1].dtype}{list(first[1].shape)} "
            f"and {v.dtype}{list(v.shape)}"
          )
  return tuple(frozenset(metrics[i]) for i in rules.index)


def run_packed(configs: Sequence[Any], workdirs: Sequence[str], console: run_console.Console | None = None):
  """Trains (or resumes) points of one signature as one program; point k writes ``workdirs[k]``.

  Args:
    configs: the points' configs (``num_replicas = 1`` each; equal ``signature``).
    workdirs: their run directories (distinct).
    console: where the run's lines go (default: stdout/stderr of the primary process).

  Returns:
    Each point's summary (as ``experiment.run`` returns it).

  Raises:
    NotPackableError: the points differ in a field that shapes the program, or would not train exactly as their
      own runs (nothing written; run them one by one).
    ValueError, OSError, RunInterruptedError, FloatingPointError: as ``experiment.run``.
  """
  if not configs or len(configs) != len(workdirs):
    raise ValueError(f"run_packed: {len(configs)} configs for {len(workdirs)} workdirs (one each, at least one).")
  configs = [config_lib.validate(copy.deepcopy(c)) for c in configs]
  if len({os.path.abspath(d) for d in workdirs}) != len(workdirs):
    raise ValueError(f"run_packed: the workdirs must be distinct, got {list(workdirs)}.")
  for k, c in enumerate(configs):
    if c.num_replicas != 1:
      raise NotPackableError(f"point {workdirs[k]}: num_replicas={c.num_replicas} (a pack already stacks seeds).")
    if signature(c) != signature(configs[0]):
      raise NotPackableError(f"points {workdirs[0]} and {workdirs[k]} differ in " + "; ".join(why_apart(configs[0], c)))
  if len(configs) == 1:
    return [experiment.run(configs[0], workdirs[0], console)]
  primary = distributed.is_primary()
  console = console or run_console.Console(active=primary)
  members = list(zip(configs, workdirs))
  labels = [os.path.basename(os.path.normpath(d)) for d in workdirs]
  where = os.path.commonpath([os.path.abspath(d) for d in workdirs])
  per = traced_fields(configs)
  console.line(
    f"pack: {len(members)} points as one program in {where}: {', '.join(labels)}"
    + (f" (per point: {', '.join(per)})" if per else "")
  )
  hyper = hyper_inputs(configs)  # Learning rates, regularizer weights, server rules the points differ in.
  rules = point_rules(configs)
  several = len(rules.specs) > 1

  def build():
    b = experiment.build_members(members, True, "pack", labels, _check_members, rules if rules.active else None)
    b = b._replace(data=b.data._replace(hyper=hyper)) if hyper else b
    return b._replace(metric_keys=_own_metric_keys(configs, rules, b)) if several else b

  with contextlib.ExitStack() as stack:
    for d in workdirs:
      stack.enter_context(lock_lib.WorkdirLock(d, active=primary))
    out = experiment.run_members(
      configs[0],
      where,
      console,
      primary,
      build=build,
      checkpointer=lambda b: PackCheckpointer(configs, workdirs, primary, rules.index if several else None),
    )
  return out.get("points", []) if primary else []
