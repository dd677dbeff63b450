"""The default run without an attacker: the clean reference for every metric.

python -m fedgan_jax.main --config configs/clean.py --workdir runs/clean
"""

from fedgan_jax import config_lib


def get_config():
  config = config_lib.base_config()
  config.attack.malicious = ()
  return config
