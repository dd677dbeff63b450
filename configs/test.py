"""A tiny run that compiles and trains in seconds on a CPU (tests, smoke checks).

python -m fedgan_jax.main --config configs/test.py --workdir /tmp/fedgan_test
"""

from fedgan_jax import config_lib


def get_config():
  config = config_lib.base_config()
  config.num_rounds = 2
  config.num_clients = 2
  config.resolution = 32
  config.eval_every = 1
  config.ckpt_every = 1
  config.log_every = 1
  config.data.num_images = 64
  config.data.heldout = 64
  config.model.g_width = 8
  config.model.d_width = 8
  config.model.latent_dim = 16
  config.train.local_steps = 2
  config.train.batch_size = 8
  # A rolled scan of the local steps compiles ~2x faster than the unrolled one 'auto' picks on a CPU
  # (which runs ~8 % faster): this config is compile-bound.
  config.train.unroll = "false"
  config.eval.num_samples = 64
  config.eval.grid_size = 4
  config.eval.extractor = "none"  # Feature networks cost more than this whole run on a CPU.
  return config
