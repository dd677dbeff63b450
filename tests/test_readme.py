"""README stays true: its command lines and its custom-rule example."""

from __future__ import annotations

import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from conftest import ROOT
from fedgan_jax import aggregation

README = open(os.path.join(ROOT, "README.md")).read()


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
  block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
  assert block[0] == (
    "pip install -e . && python -m fedgan_jax.main --config configs/default.py --workdir runs/default"
  )
  assert block[1] == 'pip install -e ".[test]" && pytest -n 2 -m "not slow"'
  ci = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
  assert block[1] in ci and "pytest -n 2 -m slow" in ci  # The README's line, then the slow tier.


def test_readme_custom_rule_example_runs(tmp_path, monkeypatch):
  code = re.search(r"```python\n# my_rules.py.*?\n(.*?)```", README, re.S).group(1)
  (tmp_path / "my_rules.py").write_text(code)
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  sys.modules.pop("my_rules", None)
  agg = aggregation.get("my_rules:loss_weighted", temperature=0.5, num_clients=3)
  params = {"w": jnp.asarray([[1.0, 1.0], [1.2, 1.0], [50.0, -50.0]])}
  stats = {"num_examples": jnp.ones(3), "g_loss": jnp.asarray([1.0, 1.1, 9.0])}
  new, _, diag = jax.jit(agg.aggregate)(
    agg.init({"w": jnp.zeros(2)}), {"w": jnp.zeros(2)}, params, stats, jax.random.key(0)
  )
  assert bool(diag["flagged"][2]) and not bool(diag["flagged"][0])
  assert np.isclose(float(diag["weights"].sum()), 1.0)
  np.testing.assert_allclose(new["w"], [1.1, 1.0], atol=0.05)


def test_rules_table_lists_every_registered_rule():
  from fedgan_jax.aggregation import AGGREGATORS

  section = README.split("### Aggregation rules and defenses", 1)[1].split("\n### ", 1)[0]
  rows = [line for line in section.splitlines() if line.startswith("| `")]
  named = {n for row in rows for n in re.findall(r"`(\w+)`", row.split("|")[1])}
  assert named == set(AGGREGATORS)
