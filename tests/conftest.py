"""Shared fixtures: tiny configs and one compiled round program per session.

Compiling a round takes tens of seconds on a CPU (docs/design.md §6), so tests share
programs through session fixtures and a persistent compilation cache (identical
programs compiled by different tests, e.g. the end-to-end runs, hit it).
"""

from __future__ import annotations

import os
import tempfile

import jax
import numpy as np
import pytest

jax.config.update(
  "jax_compilation_cache_dir",
  os.environ.get("FEDGAN_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "fedgan_jax_test_cache")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  """configs/test.py with ``section.field=value`` overrides."""
  import importlib.util

  from fedgan_jax import config_lib

  spec = importlib.util.spec_from_file_location("cfg_test", os.path.join(ROOT, "configs", "test.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config()
  for dotted, value in overrides.items():
    config_lib.set_field(config, dotted, value)
  return config_lib.validate(config)


def assert_config_error(overrides: dict, match: str) -> None:
  """``config_lib.validate`` of the base config with ``overrides`` raises a ValueError matching ``match``."""
  from fedgan_jax import config_lib

  c = config_lib.base_config()
  for dotted, v in overrides.items():
    config_lib.set_field(c, dotted, v)
  with pytest.raises(ValueError, match=match):
    config_lib.validate(c)


def tiny_evaluator(config, sample_fn, heldout, tmp_path, **kwargs):
  """An ``evaluation.Evaluator`` of ``config``'s own trigger that writes nothing (``kwargs``: members, ...)."""
  from fedgan_jax import evaluation
  from fedgan_jax.data import triggers

  trigger, loc = triggers.load_trigger(config), triggers.trigger_location(config)
  return evaluation.Evaluator(
    config, sample_fn, heldout, trigger, loc, jax.random.PRNGKey(0), str(tmp_path), write=False, **kwargs
  )


def write_sweep_file(path, num_rounds: int, sweep) -> str:
  """A sweep file at ``path``: configs/test.py with ``num_rounds``, its points ``launch.sweep.product(sweep)``."""
  import textwrap

  path.write_text(
    textwrap.dedent(f"""
      import importlib.util
      from launch.sweep import product
      spec = importlib.util.spec_from_file_location("t", {os.path.join(ROOT, "configs", "test.py")!r})
      mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)

      def get_config():
        c = mod.get_config()
        c.num_rounds = {num_rounds}
        return c

      def get_sweep():
        return product({sweep!r})
  """)
  )
  return str(path)


@pytest.fixture(scope="session")
def tiny_program():
  """(config, program, jitted round, RoundData) for 3 clients, client 0 malicious."""
  from fedgan_jax import assemble

  config = tiny_config(num_clients=3)
  program, _, _ = assemble.build_program(config)
  C, n, R = 3, 16, config.resolution
  rng = np.random.default_rng(0)
  # Client 0 malicious (the config's default), all of its images poisoned; client 1 has 12 real images.
  data = assemble.round_data(config, rng.integers(0, 256, (C, n, R, R, 3), dtype=np.uint8), [16, 12, 16])
  assert np.asarray(data.poison_flags).sum(1).tolist() == [16, 0, 0]
  traces = []

  def counted(state, data, key):
    traces.append(1)
    return program.round(state, data, key)

  round_jit = jax.jit(counted)
  return config, program, round_jit, data, traces
