"""Command line: ``python -m fedgan_jax.main --config configs/default.py --workdir runs/x``.

Override any field with ``--config.<field>=<value>``, e.g.
``--config.attack.malicious='(0,1)' --config.num_rounds=50``. Hyperparameters
of the aggregation rule are free-form:
``--config.aggregation.name=trimmed_mean --config.aggregation.kwargs.beta=0.25``.
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from fedgan_jax import config_lib, distributed, experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumes if it holds checkpoints).")
flags.mark_flags_as_required(["config", "workdir"])

_KWARGS_PREFIX = "--config.aggregation.kwargs."
_agg_kwargs: dict = {}


def split_overrides(argv: list[str]) -> tuple[list[str], dict]:
  """Removes ``--config.aggregation.kwargs.K=V`` from argv; returns them parsed.

  ml_collections' flags cannot add keys to a locked config, and a rule's
  hyperparameters are free-form, so they are taken out before absl sees argv.
  """
  rest, kwargs = [], {}
  for arg in argv:
    if arg.startswith(_KWARGS_PREFIX):
      key, sep, value = arg[len(_KWARGS_PREFIX) :].partition("=")
      if not sep or not key.isidentifier():
        raise ValueError(f"{arg!r}: expected {_KWARGS_PREFIX}<name>=<value>.")
      kwargs[key] = config_lib.parse_value(value)
    else:
      rest.append(arg)
  return rest, kwargs


def check_override_names(argv: list[str]) -> None:
  """Fails clearly on ``--config.<unknown>=...`` (ml_collections raises a bare AttributeError)."""
  for arg in argv:
    if arg.startswith("--config.") and "=" in arg:
      config_lib.check_field(arg[len("--config.") :].split("=", 1)[0])


def _enable_compilation_cache() -> None:
  """Persistent XLA compilation cache, so a rerun (resume, sweep point, seed) skips compiling.

  ``$JAX_COMPILATION_CACHE_DIR`` if set (JAX reads it itself), else ``~/.cache/fedgan_jax/xla``.
  """
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "fedgan_jax", "xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv):
  del argv
  distributed.maybe_initialize_distributed()  # Before anything touches a device; no-op for one process.
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
