"""Resume that checks before it trusts (docs/design.md §4).

A rerun on a workdir with checkpoints continues from the newest one that
restores, after two checks:

* **Does it fit?** The newest checkpoint's array shapes (read from its
  metadata, nothing restored) are compared with the state this config builds.
  If they differ, the run stops with one line naming the config fields that
  differ from the checkpoint's config (``checkpoints/config.json``) and both
  values: ``config.num_clients is 2 in the checkpoint, 3 now``. A change that
  keeps every shape (``num_rounds``, learning rates, a stateless aggregation
  rule for another) resumes.
* **Is it whole?** A step that does not restore (truncated files, an empty
  folder) is passed over for the next older one; once one restores, each
  damaged newer step is reported in one line and renamed ``<round>.damaged``
  (kept, out of orbax's sight, so the rounds after the restored one can be
  saved again). If none restores the run stops and says so.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fedgan_jax import config_lib
from fedgan_jax.io import checkpoint as ckpt_lib

# Fields whose value changes the round state's shapes or structure: the ones a mismatch names.
SHAPE_FIELDS = (
  "num_clients",
  "num_replicas",
  "resolution",
  "data.channels",
  "model.name",
  "model.latent_dim",
  "model.g_width",
  "model.d_width",
  "model.d_norm",
  "model.d_norm_first",
  "model.conditional",
  "model.sg2.w_dim",
  "model.sg2.mapping_layers",
  "model.sg2.channel_base",
  "model.sg2.channel_max",
  "train.optimizer",
  "train.rmsprop",
  "aggregation.name",
  "aggregation.kwargs",
  "aggregation.average_discriminator",
)
# Fields that never change what a checkpoint holds (left out when no shape field explains a mismatch).
_RUNTIME_FIELDS = ("num_rounds", "eval_every", "ckpt_every", "log_every", "eval.", "data.cache_dir", "privacy.")


class ConfigMismatchError(ValueError):
  """The config changes the shapes of what the workdir's checkpoints hold."""


class NoUsableCheckpointError(ValueError):
  """The workdir has checkpoints and none of them restores."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in (tree or {}).items():
    if isinstance(value, dict) and value:
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _in(field: str, fields) -> bool:
  return any(field == f or field.startswith(f"{f}.") or (f.endswith(".") and field.startswith(f)) for f in fields)


def changed_fields(saved: dict | None, config) -> list[tuple[str, Any, Any]]:
  """``[(field, checkpoint's value, this config's value)]`` that explain a shape mismatch.

  The shape fields that differ; failing those, every other field that differs
  except the run-time ones (``num_rounds``, ``eval.*``, ...).
  """
  if saved is None:
    return []
  old, new = _flatten(saved), _flatten(json.loads(config_lib.to_json(config)))
  diff = [
    (f, old.get(f, "(unset)"), new.get(f, "(unset)")) for f in sorted(set(old) | set(new)) if old.get(f) != new.get(f)
  ]
  shape = [d for d in diff if _in(d[0], SHAPE_FIELDS)]
  return shape or [d for d in diff if not _in(d[0], _RUNTIME_FIELDS)]


def _mismatch(ckpt: ckpt_lib.Checkpointer, round_: int, saved: dict | None, config, theirs, ours) -> str:
  fields = changed_fields(saved, config)
  if fields:
    what = "; ".join(f"config.{f} is {json.dumps(a)} in the checkpoint, {json.dumps(b)} now" for f, a, b in fields)
  else:  # No saved config (an older run): name the first array that differs instead.
    name = sorted(set(theirs) ^ set(ours) or {k for k in ours if theirs[k] != ours[k]})[0]
    what = f"state {name} is {theirs.get(name, ('absent',))[0]} there, {ours.get(name, ('absent',))[0]} now"
  return (
    f"this config does not fit the checkpoint of round {round_} in {ckpt.directory}: {what}; "
    "rerun with the checkpoint's values, or use a new --workdir"
  )


def restore(ckpt: ckpt_lib.Checkpointer, like: Any, config, warn: Callable[[str], None]) -> tuple[int, Any | None]:
  """The newest checkpoint that fits and restores, as ``(round, state)``; ``(0, None)`` without checkpoints.

  Args:
    ckpt: the run's checkpointer.
    like: the state this config builds (arrays or ShapeDtypeStructs with shardings).
    config: the run's config (named in a mismatch).
    warn: prints one line (a damaged step passed over).

  Raises:
    ConfigMismatchError: the newest readable checkpoint's shapes differ from ``like``'s.
    NoUsableCheckpointError: there are checkpoints and none restores.
  """
  ours = ckpt_lib.shape_table(like)
  saved = ckpt.read_config()
  damaged: list[tuple[int, str]] = []
  for r in ckpt.rounds():
    try:
      theirs = ckpt.shapes(r)
    except Exception as e:  # pylint: disable=broad-except
      damaged.append((r, ckpt_lib.short_reason(e)))
      continue
    if theirs != ours:
      raise ConfigMismatchError(_mismatch(ckpt, r, saved, config, theirs, ours))
    try:
      state = ckpt.restore(r, like)
    except Exception as e:  # pylint: disable=broad-except
      damaged.append((r, ckpt_lib.short_reason(e)))
      continue
    for bad, why in damaged:
      kept = ckpt.set_aside(bad)
      warn(f"checkpoint of round {bad} does not restore ({why}); resuming from round {r} (it is kept as {kept})")
    return r, state
  if damaged:
    rounds = "; ".join(f"round {r}: {why}" for r, why in damaged)
    raise NoUsableCheckpointError(
      f"no checkpoint in {ckpt.directory} restores ({rounds}); move that folder away to start over"
    )
  return 0, None
