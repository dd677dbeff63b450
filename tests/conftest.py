"""Shared fixtures: tiny configs and one compiled round program per session.

Compiling a round takes tens of seconds on a CPU (DESIGN §6), so tests share
programs through session fixtures and a persistent compilation cache (identical
programs compiled by different tests, e.g. the end-to-end runs, hit it).
"""

from __future__ import annotations

import os
import tempfile

import jax
import numpy as np
import pytest

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("FEDGAN_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "fedgan_jax_test_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  """configs/test.py with ``section.field=value`` overrides."""
  from fedgan_jax import config_lib
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg_test", os.path.join(ROOT, "configs", "test.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config()
  for dotted, value in overrides.items():
    node = config
    *parents, last = dotted.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  return config_lib.validate(config)


@pytest.fixture(scope="session")
def tiny_program():
  """(config, program, jitted round, RoundData) for 3 clients, client 0 malicious."""
  import jax.numpy as jnp
  from fedgan_jax.data import triggers
  from fedgan_jax.train import round as round_lib
  config = tiny_config(num_clients=3)
  program, _, _ = round_lib.build_from_config(config)
  C, n, R = 3, 16, config.resolution
  rng = np.random.default_rng(0)
  data = round_lib.RoundData(
      images=jnp.asarray(rng.integers(0, 256, (C, n, R, R, 3), dtype=np.uint8)),
      counts=jnp.asarray([16, 12, 16], jnp.int32),
      is_malicious=jnp.asarray([True, False, False]),
      poison_flags=jnp.asarray(np.arange(n)[None, :] < np.array([16, 0, 0])[:, None]),
      trigger=jnp.asarray(triggers.load_trigger(config)),
      trigger_loc=jnp.asarray(triggers.trigger_location(config), jnp.int32),
      mimic=jnp.asarray(False))
  traces = []

  def counted(state, data, key):
    traces.append(1)
    return program.round(state, data, key)

  round_jit = jax.jit(counted)
  return config, program, round_jit, data, traces
