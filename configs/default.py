"""The paper's attack on the embedded synthetic dermoscopy data, sized for a laptop CPU.

Jin & Li, "Backdoor Attack is a Devil in Federated GAN-based Medical Image
Synthesis" (SASHIMI 2022): 4 clients, client 0 malicious, a trigger pasted at
the bottom-right corner of every real image of the malicious client (16 px at
5 px margin on 256 px, scaled here to 32 px: 4 px at 1 px margin), only
generators averaged, Adam(2e-4, b1=0.5), batch 32, no defense.

    python -m fedgan_jax.main --config configs/default.py --workdir runs/default

Runtime: see README (2-core CPU, measured). DCGAN G/D at 32 px replace the
paper's StyleGAN2 G to keep it CPU-sized; ``--config.resolution=256`` and wider
models are for accelerators.
"""

from fedgan_jax import config_lib


def get_config():
  config = config_lib.base_config()
  return config
