"""Config validation: every bad value gets a message naming field, value and what is accepted."""

from __future__ import annotations

import pytest

from fedgan_jax import config_lib


def _bad(match, **overrides):
  c = config_lib.base_config()
  for dotted, v in overrides.items():
    node = c
    *parents, last = dotted.split(".")
    for p in parents:
      node = node[p]
    node[last] = v
  with pytest.raises(ValueError, match=match):
    config_lib.validate(c)


def test_default_is_valid():
  config_lib.validate(config_lib.base_config())


@pytest.mark.parametrize(
  "overrides,match",
  [
    ({"num_clients": 0}, r"config.num_clients=0 .*positive integer"),
    ({"train.batch_size": -2}, r"train.batch_size=-2"),
    ({"resolution": 48}, r"resolution=48 .*\[32, 64, 128, 256\]"),
    ({"data.source": "web"}, r"data.source='web' .*folder"),
    ({"attack.malicious": (4,)}, r"attack.malicious=\(4,\).*num_clients=4"),
    ({"attack.malicious": (0, 1, 2, 3)}, r"fewer attackers than clients"),
    ({"attack.malicious": (1, 1)}, r"distinct"),
    ({"attack.trigger_size": 40}, r"attack.trigger_size=40 .*does not fit"),
    ({"attack.trigger_size": 1}, r"at least 2 px"),
    ({"attack.poison_rate": 1.5}, r"poison_rate=1.5"),
    ({"model.d_norm": "layer"}, r"model.d_norm='layer'"),
    ({"train.loss": "mse"}, r"train.loss='mse'"),
    ({"train.regularizers.gradient_penalty": 10.0}, r"model.d_norm='batch'.*gradient penalty"),
    ({"train.g_lr": 0.0}, r"train.g_lr=0.0"),
    ({"train.client_chunk": -1}, r"train.client_chunk=-1 .*integer >= 0"),
    ({"eval.mia_samples": -1}, r"eval.mia_samples=-1 .*>= 0"),
    ({"eval.utility_every": -2}, r"eval.utility_every=-2 .*-1 \(off\)"),
    ({"eval.utility_samples": 1}, r"eval.utility_samples=1 .*>= 2"),
    ({"eval.utility_steps": 0}, r"eval.utility_steps=0 .*>= 1"),
    ({"eval.utility_resolution": 12}, r"eval.utility_resolution=12 .*power of two"),
  ],
)
def test_bad_values(overrides, match):
  _bad(match, **overrides)


def test_unknown_field_is_named():
  c = config_lib.base_config()
  with c.unlocked() if hasattr(c, "unlocked") else c:
    c.train.lerning_rate = 1.0
  with pytest.raises(ValueError, match=r"config.train.lerning_rate is not a known field"):
    config_lib.validate(c)


def test_unknown_aggregator_lists_valid_names():
  from fedgan_jax import aggregation

  with pytest.raises(ValueError, match=r"aggregation.name='nope'.*mean"):
    aggregation.get("nope")


def test_parse_override():
  c = config_lib.base_config()
  config_lib.parse_override(c, "attack.malicious", "(0, 2)")
  config_lib.parse_override(c, "aggregation.kwargs.beta", "0.2")
  config_lib.parse_override(c, "data.source", "folder")
  assert c.attack.malicious == (0, 2) and c.aggregation.kwargs.beta == 0.2 and c.data.source == "folder"
  with pytest.raises(ValueError, match="config.train.lr is not a known field"):
    config_lib.parse_override(c, "train.lr", "1")
  with pytest.raises(ValueError, match="config.nope.x: config.nope is not a known section"):
    config_lib.parse_override(c, "nope.x", "1")
  with pytest.raises(ValueError, match=r"config.num_clients='abc': wrong type"):
    config_lib.parse_override(c, "num_clients", "abc")
