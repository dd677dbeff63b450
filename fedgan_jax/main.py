"""Command line: ``python -m fedgan_jax.main --config configs/default.py --workdir runs/x``.

Override any field with ``--config.<field>=<value>``, e.g.
``--config.attack.malicious='(0,1)' --config.num_rounds=50``. Hyperparameters
of the aggregation rule are free-form:
``--config.aggregation.name=trimmed_mean --config.aggregation.kwargs.beta=0.25``.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from fedgan_jax import config_lib, distributed, experiment, run_console

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


def _fail(line: str) -> None:
  """Every failure a user can cause: one line on stderr, exit code 2, no traceback.

  Work abandoned by the failure (orbax's background writes after a full disk) may still report
  its own errors while the interpreter shuts down ("Future exception was never retrieved", one per
  array); the line already said what happened, so stderr is closed to them.
  """
  print(line, file=sys.stderr, flush=True)
  _silence_stderr()
  sys.exit(2)


def _silence_stderr() -> None:
  """Sends everything written to stderr from now on (Python or native code) to the null device."""
  logging.set_verbosity(logging.FATAL)
  std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL + 1)
  try:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stderr.fileno())
    os.close(devnull)
  except (OSError, ValueError):  # No real descriptor (stderr replaced, e.g. under a test harness).
    pass


def _config_arg(argv: list[str]) -> str | None:
  """The ``--config`` value as given (``path[:args]``), or None."""
  for i, arg in enumerate(argv):
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1]
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _missing_config_file(argv: list[str]) -> str | None:
  """The line for a ``--config`` file that is not there (ml_collections reports it in 40 lines), or None."""
  value = _config_arg(argv)
  if value is None or os.path.isfile(value.split(":", 1)[0]):
    return None
  return f"error: --config {value}: no such file {value.split(':', 1)[0]!r} (relative to {os.getcwd()})"


def _flag_error_line(e: BaseException, argv: list[str]) -> str:
  """One line for a flag error; a config file's traceback is cut down to its last line."""
  missing = _missing_config_file(argv)
  if missing:
    return missing
  text = str(e)
  if "must have a value other than None" in text:
    name = text.split("=", 1)[0].replace("flag ", "")
    return (
      f"error: {name} is required, e.g. python -m fedgan_jax.main --config configs/default.py --workdir runs/default"
    )
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  if isinstance(e, flags.Error):
    if len(lines) > 1:  # "flag --config=X: Error whilst parsing config file: <traceback> ValueError: ..."
      return f"error: {lines[0].split(': Error whilst', 1)[0].removeprefix('flag ')}: {lines[-1]}"
    return f"error: {text.removeprefix('flag ')}"
  # get_config raised something absl does not wrap (KeyError, SyntaxError, ...).
  return f"error: --config {_config_arg(argv)}: {type(e).__name__}: {' '.join(lines)[:300]}"


_verbosity_given = False


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with one line per error (exit 2) instead of a traceback or usage text."""
  global _verbosity_given
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    _fail(_flag_error_line(e, argv))
  # app.run turns an unset --verbosity into INFO right after this; remember whether the user set it.
  _verbosity_given = not flags.FLAGS["verbosity"].using_default_value
  if not isinstance(_CONFIG.value, ml_collections.ConfigDict):  # A file that failed to load, read lazily.
    _fail(_missing_config_file(argv) or f"error: --config {_config_arg(argv)}: could not be loaded")
  return rest


def main(argv):
  del argv
  run_console.quiet_library_logs(_verbosity_given)
  try:
    distributed.maybe_initialize_distributed()  # Before anything touches a device; no-op for one process.
    _enable_compilation_cache()
    config = _CONFIG.value
    if _agg_kwargs:
      with config.unlocked():
        config.aggregation.kwargs.update(_agg_kwargs)
    console = run_console.Console(
      config_file=config_flags.get_config_filename(flags.FLAGS["config"]), active=distributed.is_primary()
    )
    experiment.run(config, _WORKDIR.value, console)
  except experiment.RunInterruptedError as e:
    _fail(str(e))
  except KeyboardInterrupt:  # Before the run started, or after it ended.
    _fail("interrupted; rerun the same command to resume")
  except (ValueError, OSError, FloatingPointError) as e:
    logging.debug("the error in full:", exc_info=True)  # --verbosity=1 shows where it came from.
    _fail(f"error: {e}")
  except RuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    _fail(
      "error: out of device memory; lower num_clients, train.batch_size or train.client_chunk "
      f"(0 = auto), or use a larger device ({' '.join(str(e).split())[:160]})"
    )


def cli():
  global _agg_kwargs
  try:
    argv, _agg_kwargs = split_overrides(sys.argv)
    sys.argv[:] = argv  # config_flags reads overrides from sys.argv itself.
    check_override_names(argv[1:])
  except ValueError as e:
    _fail(f"error: {e}")
  app.run(main, argv=argv, flags_parser=parse_flags)


if __name__ == "__main__":
  cli()
