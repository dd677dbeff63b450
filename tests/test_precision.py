"""train.precision='bf16' (bf16 compute, f32 params) stays close to f32 after one round.

The measured numbers (tiny and default configs) are in docs/benchmarks.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fedgan_jax import assemble


def _norm(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree))))


def _diff(a, b):
  return jax.tree.map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a, b)


def _one_round(precision: str, data, impl: str = "auto"):
  config = tiny_config(**{"train.precision": precision, "model.conv_impl": impl})
  program, _, _ = assemble.build_program(config)
  state = program.init(jax.random.key(0))
  new_state, metrics = jax.jit(program.round)(state, data, jax.random.key(1))
  return state, new_state, metrics


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["auto", "gemm"])
def test_bf16_round_stays_close_to_f32(impl):
  """bf16 operands (f32 parameters and accumulation) against f32, in the CPU default lowering
  and in the accelerators' ``gemm`` lowering (bf16 matmuls, bf16 col2im sums)."""
  data, _, _ = assemble.setup_data(tiny_config())
  init32, s32, m32 = _one_round("f32", data, impl)
  init16, s16, m16 = _one_round("bf16", data, impl)
  # Parameters stay f32 (only compute is bf16) and start identical.
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.g_global["params"]))
  assert _norm(_diff(init16.g_global["params"], init32.g_global["params"])) == 0.0
  g0, g32, g16 = init32.g_global["params"], s32.g_global["params"], s16.g_global["params"]
  gap = _norm(_diff(g16, g32))
  # Relative to the parameters: tiny. Relative to this round's update: small (Adam's
  # first steps are ~lr * sign(grad), so a few near-zero gradients flip sign in bf16).
  assert gap / _norm(g32) < 5e-3, gap / _norm(g32)
  assert gap / _norm(_diff(g32, g0)) < 0.6, gap / _norm(_diff(g32, g0))
  for k in ("train/g_loss", "train/d_loss"):
    a, b = np.asarray(m32[k]), np.asarray(m16[k])
    assert np.all(np.isfinite(b))
    np.testing.assert_allclose(b, a, rtol=0.02, err_msg=k)
