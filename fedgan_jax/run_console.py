"""What a person sees while a run goes: a header, one line per ``log_every`` rounds, the results.

The console is for people; the logs are for debugging. Progress goes to
stdout (once: not also to the log), warnings about the run (a damaged
checkpoint passed over, a torn ``metrics.jsonl`` line dropped) to stderr as
one line each. Library logs (orbax, absl, JAX) stay at WARNING unless
``--verbosity`` asks for more, and orbax's own error reports are held back
there: every orbax failure that matters reaches the run as an exception and
ends in one line that names the path (``io/checkpoint.py``).
"""

from __future__ import annotations

import logging as py_logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import logging

from fedgan_jax import privacy
from fedgan_jax.io import writers
from fedgan_jax.metrics import diversity
from fedgan_jax.report.labels import format_value

# The key results of summary.json, in the order they are printed ("@" keys match any extractor).
_KEY_METRICS = (
  "eval/swd",
  "eval/fid@",
  "eval/kid@",
  "eval/precision@",
  "eval/recall@",
  "eval/implant_amplitude",
  "eval/implant_above_p99",
  "eval/diversity",
  "eval/latent_trigger_dist",
  "eval/latent_clean_dist",
  "eval/mia_auc",
  "eval/tstr_acc",
  "eval/trtr_acc",
  "eval/trigger_transfer",
)
_MAX_DEVICES_SHOWN = 4


class _HoldBackOrbax(py_logging.Filter):
  """Drops orbax's records below CRITICAL (its failures are re-raised and reported by the run)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.CRITICAL or "orbax" not in record.pathname


def _drop_closed_loop_noise(unraisable) -> None:
  """After a failed save, tensorstore's late callbacks hit orbax's closed event loop, once per array.

  The failure itself is reported (one line); these echoes of it are not news.
  """
  if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
    return
  sys.__unraisablehook__(unraisable)


def quiet_library_logs(verbosity_given: bool) -> None:
  """Library logs at WARNING and orbax held back, unless ``--verbosity`` was given on the command line.

  Args:
    verbosity_given: whether the user passed ``--verbosity``/``-v`` (then it is honored as is).
  """
  if verbosity_given:
    return
  logging.set_verbosity(logging.WARNING)
  logging.get_absl_logger().addFilter(_HoldBackOrbax())
  # Only orbax runs asyncio here: after a failed save, each abandoned write logs "Future exception
  # was never retrieved" (an ERROR per array) whenever it is collected, even before the run's line.
  py_logging.getLogger("asyncio").setLevel(py_logging.CRITICAL)
  sys.unraisablehook = _drop_closed_loop_noise


def devices_text(devices: Sequence[Any]) -> str:
  """``devices: [CpuDevice(id=0), CpuDevice(id=1)]``, shortened past a few devices."""
  shown = ", ".join(repr(d) for d in devices[:_MAX_DEVICES_SHOWN])
  more = f", ... {len(devices)} in all" if len(devices) > _MAX_DEVICES_SHOWN else ""
  return f"devices: [{shown}{more}]"


def key_metrics(summary: dict[str, Any]) -> str:
  """``swd 51.2  implant_amplitude 0.004  ...  first_flag_round 12``: the results a person looks at first."""
  final = summary.get("final", {})
  parts = []
  for want in _KEY_METRICS:
    for key in sorted(final):
      if (key.startswith(want) if want.endswith("@") else key == want) and not isinstance(final[key], list):
        parts.append(f"{key[len('eval/') :]} {format_value(final[key])}")
  if summary.get("malicious"):
    parts.append(f"detect_tpr_mean {format_value(summary.get('detect_tpr_mean'))}")
    parts.append(f"detect_fpr_mean {format_value(summary.get('detect_fpr_mean'))}")
    first = summary.get("first_flag_round")  # {attacker: first round flagged, or None}
    if isinstance(first, dict):
      rounds = [f"client {c}: {'never' if r is None else r}" for c, r in first.items()]
      parts.append(f"first_flag_round ({', '.join(rounds)})")
  return "  ".join(parts)


class Console:
  """The run's lines for a person (silent when not ``active``: non-primary processes, library use).

  Args:
    config_file: the ``--config`` argument, for the header (None in library use).
    active: print at all.
    out, err: streams (default: ``sys.stdout`` / ``sys.stderr`` at print time).
  """

  def __init__(self, config_file: str | None = None, active: bool = True, out=None, err=None):
    self.config_file = config_file
    self.active = active
    self._out, self._err = out, err

  def _print(self, line: str, err: bool = False) -> None:
    if self.active:
      stream = (self._err or sys.stderr) if err else (self._out or sys.stdout)
      print(line, file=stream, flush=True)

  def header(self, config, workdir: str, devices: Sequence[Any], start: int, forked: bool = False) -> None:
    """Two lines: what runs where, and on what."""
    total = config.num_rounds
    if forked:
      status = f"new run forked from {config.init_from} at round {start} of {total}"
    elif not start:
      status = "new run"
    elif start >= total:
      status = f"already at round {start} of {total}: summary and report only"
    else:
      status = f"resuming from round {start} of {total}"
    source = f"{self.config_file} -> " if self.config_file else ""
    self._print(f"run: {source}{workdir} ({status})")
    mal = list(config.attack.malicious)
    parts = [
      devices_text(devices),
      f"clients: {config.num_clients} (malicious: {mal if mal else 'none'})"
      + (f", {config.clients_per_round} a round" if 0 < (config.clients_per_round or 0) < config.num_clients else ""),
      f"aggregation: {config.aggregation.name}",
      f"rounds: {total}",
    ]
    if config.num_replicas > 1:
      parts.append(f"replicas: {config.num_replicas} (seeds {config.seed}..{config.seed + config.num_replicas - 1})")
    self._print("  ".join(parts))

  def line(self, text: str) -> None:
    """One progress line (stdout)."""
    self._print(text)

  def warn(self, text: str) -> None:
    """One warning line (stderr)."""
    self._print(f"warning: {text}", err=True)

  def evaluating(self, round_: int, what: str) -> None:
    """Said before an evaluation long enough to look like a hang."""
    self._print(f"round {round_}: evaluating ({what})...")

  def done(self, results: Sequence[tuple[str, dict, str, bool]], wall: float) -> None:
    """The results and where they are: key metrics, summary.json, report.html.

    Args:
      results: ``(label, summary, workdir, report written)`` per replica (label '' for a single run).
      wall: the run's seconds.
    """
    if not results:
      return
    summary = results[0][1]
    first = summary.get("first_round_sec")
    first_text = f" (first round {first:.1f} s, includes compiling)" if first else ""
    self._print(f"done: round {summary.get('rounds', 0)} in {writers.format_duration(wall)}{first_text}")
    parts = summary.get("time_sec") or {}
    if parts:  # Where the time went: on an accelerator, training should dominate.
      names = ("setup", "first_round", "training", "evaluation", "checkpoints")
      self._print("time: " + ", ".join(f"{n.replace('_', ' ')} {_seconds(parts[n])}" for n in names if n in parts))
    for label, summary, workdir, report_ok in results:
      prefix = f"{label}: " if label else ""
      self._print(f"{prefix}final: {key_metrics(summary) or 'no metrics'}")
      for line in privacy.summary_lines(summary.get("privacy") or {}):  # dp_mean, train.dp_sgd: the guarantees.
        self._print(f"{prefix}privacy: {line}")
      collapsed = diversity.collapse_warning(summary.get("final", {}))
      if collapsed:  # A result, beside the metrics it qualifies (stderr is for problems of the run itself).
        self._print(f"{prefix}note: {collapsed}")
      self._print(f"{prefix}summary: {os.path.join(workdir, 'summary.json')}")
      if report_ok:
        self._print(f"{prefix}report: {os.path.join(workdir, 'report', 'report.html')}")


def _seconds(v: float) -> str:
  """``0.7 s`` below 10 s (a short part of a short run still shows), else like the progress line."""
  return f"{v:.1f} s" if v < 10 else writers.format_duration(v)
