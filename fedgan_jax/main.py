"""Command line: ``python -m fedgan_jax.main --config configs/default.py --workdir runs/x``.

Override any field with ``--config.<field>=<value>``, e.g.
``--config.attack.malicious='(0,1)' --config.num_rounds=50``. Hyperparameters
of the aggregation rule are free-form:
``--config.aggregation.name=trimmed_mean --config.aggregation.kwargs.beta=0.25``.
"""

from __future__ import annotations

import ast
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumes if it holds checkpoints).")
flags.mark_flags_as_required(["config", "workdir"])

_KWARGS_PREFIX = "--config.aggregation.kwargs."
_agg_kwargs: dict = {}


def split_overrides(argv: list[str]) -> tuple[list[str], dict]:
  """Removes ``--config.aggregation.kwargs.K=V`` from argv; returns them parsed."""
  rest, kwargs = [], {}
  for arg in argv:
    if arg.startswith(_KWARGS_PREFIX):
      key, sep, value = arg[len(_KWARGS_PREFIX):].partition("=")
      if not sep or not key.isidentifier():
        raise ValueError(f"{arg!r}: expected {_KWARGS_PREFIX}<name>=<value>.")
      try:
        kwargs[key] = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        kwargs[key] = value
    else:
      rest.append(arg)
  return rest, kwargs


def check_override_names(argv: list[str]) -> None:
  """Fails clearly on ``--config.<unknown>=...`` (ml_collections raises a bare AttributeError)."""
  from fedgan_jax import config_lib
  base = config_lib.base_config()
  for arg in argv:
    if not arg.startswith("--config.") or "=" not in arg:
      continue
    path = arg[len("--config."):].split("=", 1)[0]
    node, seen = base, []
    for part in path.split("."):
      if not hasattr(node, "keys") or part not in node:
        where = "config" + "".join("." + s for s in seen)
        known = sorted(node.keys()) if hasattr(node, "keys") else []
        raise ValueError(f"--config.{path}: {where} has no field {part!r}; known fields: {known}.")
      seen.append(part)
      node = node[part]


def _enable_compilation_cache() -> None:
  """Persistent XLA compilation cache, so a rerun (resume, sweep point, seed) skips compiling.

  ``$JAX_COMPILATION_CACHE_DIR`` if set (JAX reads it itself), else ``~/.cache/fedgan_jax/xla``.
  """
  import jax
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "fedgan_jax", "xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv):
  del argv
  from fedgan_jax import experiment
  from fedgan_jax import parallel
  parallel.maybe_initialize_distributed()  # Before anything touches a device; no-op for one process.
  _enable_compilation_cache()
  logging.set_verbosity(logging.INFO)
  config = _CONFIG.value
  if _agg_kwargs:
    with config.unlocked():
      config.aggregation.kwargs.update(_agg_kwargs)
  try:
    experiment.run(config, _WORKDIR.value)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def cli():
  global _agg_kwargs
  try:
    argv, _agg_kwargs = split_overrides(sys.argv)
    sys.argv[:] = argv  # config_flags reads overrides from sys.argv itself.
    check_override_names(argv[1:])
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  app.run(main, argv=argv)


if __name__ == "__main__":
  cli()
