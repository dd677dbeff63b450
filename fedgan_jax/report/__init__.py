"""Plots and an HTML page for one run, or a comparison table for a sweep.

    python -m fedgan_jax.report --workdir runs/default   # one run  -> runs/default/report/
    python -m fedgan_jax.report --workdir runs/sweep     # a sweep  -> runs/sweep/report/

A *run directory* holds ``metrics.jsonl`` (and normally ``config.json``,
``summary.json``, ``samples/``). A *sweep directory* holds run directories
(each with ``summary.json`` and ``config.json``) as children or grandchildren.

Library use (the experiment loop calls the first at the end of every run)::

    from fedgan_jax import report
    paths = report.write_run_report(workdir)       # PNG plots, samples strip/GIF, report.html
    paths = report.write_sweep_report(sweep_dir)   # comparison.csv/.html, final_metrics.png

Metric names are honest: only ``eval/fid@inception_v3`` is called "FID"
(and ``kid@inception_v3`` "KID"); Fréchet/kernel distances in other feature
spaces are labelled "FD (<extractor> features)" / "KD (<extractor> features)".

Figures are drawn with matplotlib's object-oriented API on the Agg canvas
(``matplotlib.figure.Figure``), so calling these functions inside another
program (or a notebook) never touches the global pyplot backend; the command
line additionally selects ``matplotlib.use("Agg")``.

Modules, each importing only those above it:

* ``labels``: metric names, value formatting.
* ``runs``: loading a run directory (``Run``), finding a sweep's runs.
* ``draw``: matplotlib helpers; ``plots``: the run figures; ``samples``: the samples strip and GIF.
* ``markup``: the pages' stylesheet and table cells; ``run_report``: ``report.html`` and ``write_run_report``.
* ``table``: the sweep table (also ``launch.sweep``'s ``results.csv``); ``comparison``: ``write_sweep_report``.
"""

from __future__ import annotations

import os

from fedgan_jax.io.rundir import is_run_dir
from fedgan_jax.report.comparison import write_sweep_report
from fedgan_jax.report.labels import format_value, metric_label
from fedgan_jax.report.run_report import write_run_report
from fedgan_jax.report.runs import REPORT_DIR, NotARunError, Run, find_runs

__all__ = [
  "REPORT_DIR",
  "NotARunError",
  "Run",
  "find_runs",
  "format_value",
  "is_run_dir",
  "metric_label",
  "write_report",
  "write_run_report",
  "write_sweep_report",
]


def write_report(path: str) -> list[str]:
  """A run report if ``path`` is a run directory, else a sweep report.

  Args:
    path: A run or sweep directory.

  Returns:
    Paths of the files written.

  Raises:
    NotARunError: ``path`` is neither.
  """
  if not os.path.isdir(path):
    raise NotARunError(f"{path!r} does not exist or is not a directory.")
  if is_run_dir(path):
    return write_run_report(path)
  if find_runs(path):
    return write_sweep_report(path)
  raise NotARunError(
    f"{path!r} is neither a run directory (no metrics.jsonl) nor a sweep directory "
    "(no subdirectory with summary.json and config.json)."
  )
