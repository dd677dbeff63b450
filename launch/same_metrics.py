"""Does a change keep a fixed-seed run's metrics? Runs the same command at a git revision and here.

    python -m launch.same_metrics --rev HEAD~3 [--config configs/test.py] [--config.x=y ...]

Checks out ``--rev`` into a temporary git worktree, runs
``python -m fedgan_jax.main --config ... --workdir ...`` there and in this
working tree with the same arguments (each in a fresh workdir, so neither
resumes), and compares the two ``metrics.jsonl`` files line by line after
dropping the ``z/`` keys (wall-clock times, which differ between any two
runs). Prints ``identical`` and exits 0, or names the first round and key that
differ and exits 1. For refactors: "behaviour must not change" made checkable.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence


def _lines(path: str) -> list[str]:
  with open(path) as f:
    out = []
    for line in f:
      if line.strip():
        rec = {k: v for k, v in json.loads(line).items() if not k.startswith("z/")}
        out.append(json.dumps(rec, sort_keys=True))
  return out


def _run(tree: str, args: Sequence[str], workdir: str) -> None:
  env = dict(os.environ, PYTHONPATH=tree + os.pathsep + os.environ.get("PYTHONPATH", ""))
  cmd = [sys.executable, "-m", "fedgan_jax.main", *args, "--workdir", workdir]
  proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
  if proc.returncode != 0:
    raise SystemExit(f"error: the run in {tree} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")


def first_difference(a: list[str], b: list[str]) -> str | None:
  """Where two metrics files (as ``_lines``) first differ, or None if they are identical."""
  for x, y in zip(a, b):
    if x != y:
      rx, ry = json.loads(x), json.loads(y)
      keys = sorted(k for k in set(rx) | set(ry) if rx.get(k) != ry.get(k))
      return f"round {rx.get('round')}: {keys[:5]} differ, e.g. {keys[0]}: {rx.get(keys[0])!r} vs {ry.get(keys[0])!r}"
  if len(a) != len(b):
    return f"{len(a)} records at the revision, {len(b)} here"
  return None


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m launch.same_metrics", description=__doc__.split("\n")[0])
  p.add_argument("--rev", required=True, help="git revision to compare against (e.g. HEAD~1, a commit)")
  p.add_argument("--config", default="configs/test.py", help="config file (and :arg)")
  args, overrides = p.parse_known_args(argv)
  git = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
  root = git.stdout.strip()
  run_args = ["--config", args.config, *overrides]
  with tempfile.TemporaryDirectory() as tmp:
    tree = os.path.join(tmp, "tree")
    subprocess.run(["git", "-C", root, "worktree", "add", "--detach", tree, args.rev], capture_output=True, check=True)
    try:
      _run(tree, run_args, os.path.join(tmp, "before"))
      _run(root, run_args, os.path.join(tmp, "after"))
    finally:
      subprocess.run(["git", "-C", root, "worktree", "remove", "--force", tree], capture_output=True)
    before = _lines(os.path.join(tmp, "before", "metrics.jsonl"))
    after = _lines(os.path.join(tmp, "after", "metrics.jsonl"))
  diff = first_difference(before, after)
  print(f"{len(after)} records: " + ("identical (z/ keys aside)" if diff is None else f"DIFFERENT: {diff}"))
  return 0 if diff is None else 1


if __name__ == "__main__":
  sys.exit(main())
