"""``python -m fedgan_jax.report --workdir DIR``: the report of a run or of a sweep directory."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fedgan_jax import report


def main(argv: Sequence[str] | None = None) -> int:
  """Writes the report of ``--workdir`` and prints the paths written.

  Args:
    argv: Command-line arguments (default ``sys.argv[1:]``).

  Returns:
    The exit status: 0, or 2 when the directory is neither a run nor a sweep.
  """
  parser = argparse.ArgumentParser(prog="python -m fedgan_jax.report", description=report.__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a run directory or a sweep directory")
  args = parser.parse_args(argv)
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")  # Before anything draws: no display needed.
  try:
    paths = report.write_report(args.workdir)
  except report.NotARunError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for p in paths:
    print(p)
  return 0


if __name__ == "__main__":
  sys.exit(main())
