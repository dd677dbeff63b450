"""End-to-end defenses: the paper's detector finds the attacker; a mimicking attacker evades it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fedgan_jax import assemble


@pytest.mark.slow
def test_detector_flags_the_attacker_more_than_any_honest_client():
  config = tiny_config(
    **{"num_clients": 4, "attack.trigger_size": 12, "data.num_images": 256, "aggregation.name": "detect"}
  )
  config.aggregation.kwargs.update({"features": ("g_loss",), "warmup_rounds": 1})
  data, _, _ = assemble.setup_data(config)
  program, _, _ = assemble.build_program(config)
  round_fn = jax.jit(program.round)

  def flag_counts(data, rounds=24):
    state, counts = program.init(jax.random.key(0)), np.zeros(4)
    for r in range(1, rounds + 1):
      state, m = round_fn(state, data, jax.random.key(r))
      counts += np.asarray(m["agg/flagged"])
    return counts, np.asarray(m["agg/weights"])

  honest, weights = flag_counts(data)
  assert honest[0] > honest[1:].max(), honest
  assert weights[0] < weights[1:].min(), weights  # Decayed aggregation weight.
  # The same compiled program, with the attacker reporting the honest median loss instead.
  mimic, _ = flag_counts(data._replace(mimic=jnp.asarray(True)))
  assert mimic[0] < honest[0], (mimic, honest)


@pytest.mark.slow
def test_benign_run_with_detection_reports_its_false_positives(tmp_path):
  """No attacker, detection on: summary.json says how often honest clients were flagged after the warm-up."""
  from fedgan_jax import experiment

  config = tiny_config(
    num_rounds=3,
    **{"attack.malicious": (), "aggregation.name": "detect", "aggregation.kwargs.warmup_rounds": 0},
  )
  summary = experiment.run(config, str(tmp_path / "benign"))
  det = summary["detection"]
  assert det["tpr_flagged"] is None and det["tpr_acted"] is None  # No attacker: undefined, not 0.
  assert det["fpr_flagged"] is not None and 0.0 <= det["fpr_acted"] <= det["fpr_flagged"] <= 1.0
  assert 0.0 <= det["rounds_acted"] <= det["rounds_flagged"] <= 1.0
  assert det["attacker_final_weights"] == [] and np.isclose(sum(det["honest_final_weights"]), 1.0)
