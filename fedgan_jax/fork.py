"""Forks: a run that starts from another run's checkpoint (``--config.init_from=<workdir>[@round]``).

The canonical backdoor setup trains a clean federation first and starts
every attack from it. A fork takes from the base run's checkpoint the round
counter, the global generator and discriminator and every client's state
(discriminator, optimizer states), and nothing of its defense: the
aggregator's state (detection decay, FoolsGold history, ...) starts fresh
under the fork's own ``aggregation.*``, and the fork's own attack, data,
trigger and training settings apply from the next round. Round numbers go
on from the base's: a fork of ``base@50`` with ``num_rounds=200`` trains
rounds 51..200 (round keys, attack windows and ``metrics.jsonl`` use the
same numbers as an uninterrupted run), so forking a run with its own config
is the same as resuming it.

The base's checkpoint must fit the fork: everything carried over has to have
the same shapes. Config drift that changes them (``model.*`` widths,
``num_clients``, the optimizer, ``num_replicas``, ...) is one error naming
the fields and both values. Only the fork's own ``checkpoints`` make a rerun
resume: once the fork has saved a round it resumes from there like any run.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax

from fedgan_jax import resume
from fedgan_jax.io import checkpoint as ckpt_lib

# The parts of RoundState a fork takes from its base (the aggregator states g_agg/d_agg are the fork's own).
CARRIED = ("round", "g_global", "d_global", "clients")
_SPEC = re.compile(r"^(?P<path>.+?)(?:@(?P<round>\d+))?$")


class ForkError(ValueError):
  """``init_from`` names no usable checkpoint, or one that does not fit this config."""


def parse(spec: str) -> tuple[str, int | None]:
  """``'<workdir>[@round]'`` as ``(workdir, round or None)`` (None: the base's newest checkpoint)."""
  m = _SPEC.match(spec or "")
  if not m or spec.startswith("@"):
    raise ForkError(f"config.init_from={spec!r} is invalid: accepted '<workdir>' or '<workdir>@<round>'.")
  return m.group("path"), int(m.group("round")) if m.group("round") is not None else None


def _carried(table: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in table.items() if k.split(".", 1)[0] in CARRIED}


def restore(spec: str, like: Any, fresh: Any, config) -> tuple[int, Any]:
  """The fork's starting ``(round, state)``: the base's carried parts in ``fresh``'s structure.

  Args:
    spec: ``config.init_from``.
    like: the fork's state as ShapeDtypeStructs (with shardings): the restore target of the carried parts.
    fresh: the fork's freshly initialised state (its aggregator states are kept).
    config: the fork's config (named in a mismatch).

  Raises:
    ForkError: no such run, no checkpoint (at that round), or shapes that differ.
  """
  path, round_ = parse(spec)
  ckpt_dir = os.path.join(path, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise ForkError(f"config.init_from={spec!r}: {ckpt_dir} does not exist (train the base run first).")
  ckpt = ckpt_lib.Checkpointer(ckpt_dir, primary=False)
  rounds = ckpt.rounds()
  if not rounds:
    raise ForkError(f"config.init_from={spec!r}: {ckpt_dir} holds no checkpoint.")
  r = rounds[0] if round_ is None else round_
  if r not in rounds:
    raise ForkError(f"config.init_from={spec!r}: no checkpoint of round {r}; saved rounds: {sorted(rounds)}.")
  if r >= config.num_rounds:
    raise ForkError(
      f"config.init_from={spec!r}: the base is at round {r}, config.num_rounds={config.num_rounds} leaves nothing "
      "to train (a fork goes on from the base's round number)."
    )
  theirs, ours = ckpt.shapes(r), ckpt_lib.shape_table(like)
  bad = sorted(k for k, v in _carried(ours).items() if theirs.get(k) != v)
  if bad:
    fields = [f for f in resume.changed_fields(ckpt.read_config(), config) if not f[0].startswith("aggregation.")]
    what = "; ".join(f"config.{f} is {a!r} in the base, {b!r} now" for f, a, b in fields) or (
      f"state {bad[0]} is {theirs.get(bad[0], ('absent',))[0]} there, {ours[bad[0]][0]} now"
    )
    raise ForkError(f"config.init_from={spec!r}: the base's checkpoint of round {r} does not fit this config: {what}.")
  # The whole saved tree is the restore target (orbax restores what was saved): the carried parts in the
  # fork's structure and shardings, the base's aggregator states as saved (read, then dropped).
  meta = ckpt._mgr.item_metadata(r)  # pylint: disable=protected-access
  target = {name: getattr(like, name) for name in CARRIED}
  for name in ("g_agg", "d_agg"):
    target[name] = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), meta[name])
  restored = ckpt._mgr.restore(  # pylint: disable=protected-access
    r, args=ckpt_lib.ocp.args.StandardRestore(_as_saved(target, fresh))
  )
  parts = {name: _part(restored, name) for name in CARRIED}
  ckpt.close()
  return r, fresh._replace(**{name: _restructure(parts[name], getattr(fresh, name)) for name in CARRIED})


def _as_saved(target: dict[str, Any], fresh: Any) -> Any:
  """The restore target in the saved container: the RoundState fields as a dict, as orbax keeps NamedTuples."""
  return {name: target[name] for name in fresh._fields}


def _part(restored: Any, name: str) -> Any:
  return restored[name] if isinstance(restored, dict) else getattr(restored, name)


def _restructure(value: Any, like: Any) -> Any:
  """``value``'s leaves in ``like``'s tree structure (orbax may return dicts where the state has NamedTuples)."""
  return jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(value))
