"""Every shipped config loads, validates and builds its aggregation rule (no compilation)."""

from __future__ import annotations

import glob
import importlib.util
import inspect
import os

import pytest

from conftest import ROOT
from fedgan_jax import aggregation, config_lib


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _all_configs():
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    mod = _load(path)
    if not hasattr(mod, "get_config"):
      continue
    params = inspect.signature(mod.get_config).parameters
    choices = getattr(mod, "SETTINGS", None) or sorted(getattr(mod, "RULES", {})) or [None]
    for arg in choices if params else [None]:
      yield pytest.param(path, arg, id=f"{os.path.basename(path)}:{arg}" if arg else os.path.basename(path))


@pytest.mark.parametrize("path,arg", list(_all_configs()))
def test_config_is_valid_and_builds(path, arg):
  mod = _load(path)
  config = mod.get_config(arg) if arg else mod.get_config()
  config_lib.validate(config)
  aggregation.get(config.aggregation.name, num_clients=config.num_clients, **config.aggregation.kwargs.to_dict())


def test_paper_settings():
  mod = _load(os.path.join(ROOT, "configs", "paper.py"))
  both = mod.get_config("both")
  assert both.aggregation.name == "detect" and both.train.regularizers.gradient_penalty == 10.0
  assert both.model.d_norm == "instance" and both.train.optimizer == "rmsprop"
  base = config_lib.base_config()
  base.aggregation.weighting = "uniform"  # The paper's code's 1/C: the only change of the attack setting.
  assert mod.get_config("attack").to_dict() == base.to_dict()
  with pytest.raises(ValueError, match="accepted"):
    mod.get_config("nope")
