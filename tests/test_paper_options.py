"""Options that reproduce the paper's code where the project's defaults differ (each tested on its own)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from fedgan_jax import assemble
from fedgan_jax.data import triggers
from fedgan_jax.federated import client as client_lib
from fedgan_jax.federated import losses


def test_rmsprop_pytorch_semantics_match_torch_rule():
  """torch.optim.RMSprop defaults: v = 0.99 v + 0.01 g^2; p -= lr g / (sqrt(v) + 1e-8)."""
  tx = client_lib.optimizer(tiny_config(**{"train.optimizer": "rmsprop"}), 0.1)
  p, v = np.array([1.0, -2.0, 0.5]), np.zeros(3)
  params, state = jnp.asarray(p, jnp.float32), tx.init(jnp.zeros(3))
  for g in ([0.3, -1.0, 1e-6], [0.1, 0.2, -0.3], [2.0, 0.0, 0.4]):
    g = np.asarray(g)
    v = 0.99 * v + 0.01 * g**2
    p = p - 0.1 * g / (np.sqrt(v) + 1e-8)
    upd, state = tx.update(jnp.asarray(g, jnp.float32), state, params)
    params = optax.apply_updates(params, upd)
  np.testing.assert_allclose(params, p, rtol=1e-5)
  optax_style = client_lib.optimizer(tiny_config(**{"train.optimizer": "rmsprop", "train.rmsprop": "optax"}), 0.1)
  upd, _ = optax_style.update(jnp.asarray([0.3, -1.0, 1e-6]), optax_style.init(jnp.zeros(3)))
  assert not np.allclose(upd, -0.1 * np.array([0.3, -1.0, 1e-6]) / (np.sqrt(0.01 * np.array([0.09, 1, 1e-12])) + 1e-8))


@pytest.mark.parametrize("interpolation", ["uniform", "normal"])
def test_gradient_penalty_interpolation(interpolation):
  """With D(x) = |x|^2 / 2 the input gradient is x_hat itself, so the penalty reveals eps."""
  real, fake = jnp.ones((5, 2, 2, 1)), jnp.zeros((5, 2, 2, 1))
  key = jax.random.key(3)
  got = losses.gradient_penalty(lambda x: 0.5 * jnp.sum(x**2, axis=(1, 2, 3)), real, fake, key, interpolation)
  draw = jax.random.normal if interpolation == "normal" else jax.random.uniform
  eps = np.asarray(draw(key, (5, 1, 1, 1)))[:, 0, 0, 0]
  np.testing.assert_allclose(got, np.mean((2.0 * np.abs(eps) - 1.0) ** 2), rtol=1e-5)  # |x_hat| = 2 |eps|.
  if interpolation == "normal":
    assert (eps < 0).any() or (eps > 1).any()  # Beyond the real-fake segment, as the paper's code.
  with pytest.raises(ValueError, match="train.gp_interpolation='beta'"):
    losses.gradient_penalty(lambda x: x.sum((1, 2, 3)), real, fake, key, "beta")


def test_trigger_range_unit_is_the_washed_out_trigger():
  full = triggers.load_trigger(tiny_config())
  unit = triggers.load_trigger(tiny_config(**{"attack.trigger_range": "unit"}))
  np.testing.assert_allclose(unit, (full + 1.0) / 2.0)
  assert full.min() == -1.0 and unit.min() == 0.0


def test_one_local_epoch_runs_each_clients_own_number_of_steps(tiny_program):
  """train.local_steps=0: count // batch full batches per client (16 -> 4 steps, 12 -> 3 at batch 4);
  the program runs the largest client's 4 and the others' extra steps change nothing."""
  _, _, _, data, _ = tiny_program
  config = tiny_config(num_clients=3, **{"train.local_steps": 0, "train.batch_size": 4})
  steps = assemble.local_steps(config, data.counts)
  assert steps == 4
  program, _, _ = assemble.build_program(config, steps)
  state, metrics = jax.jit(program.round)(program.init(jax.random.key(0)), data, jax.random.key(1))
  adam_counts = np.asarray(state.clients.g_opt[0].count)  # optax.adam's ScaleByAdamState: steps taken.
  np.testing.assert_array_equal(adam_counts, [4, 3, 4])
  assert np.isfinite(np.asarray(metrics["train/g_loss"])).all()
  with pytest.raises(ValueError, match="local_steps=0 .* train.batch_size=13 .* smallest client has 12"):
    assemble.local_steps(tiny_config(**{"train.local_steps": 0, "train.batch_size": 13}), data.counts)


def test_uniform_weighting_gives_every_client_one_over_c(tiny_program):
  _, _, _, data, _ = tiny_program  # Clients hold 16, 12 and 16 images.
  program, _, _ = assemble.build_program(tiny_config(num_clients=3, **{"aggregation.weighting": "uniform"}))
  _, metrics = jax.jit(program.round)(program.init(jax.random.key(0)), data, jax.random.key(1))
  np.testing.assert_allclose(metrics["agg/weights"], [1 / 3, 1 / 3, 1 / 3], rtol=1e-6)
