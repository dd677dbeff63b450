"""The paper's runs at full fidelity: ``configs/paper_full.py:<clean|attack|detect|gp|both>``.

Jin & Li, "Backdoor Attack is a Devil in Federated GAN-based Medical Image
Synthesis" (SASHIMI 2022), as their public code runs it: the StyleGAN2
generator of Projected GAN (z 64, w 128, 8 mapping layers with learning-rate
multiplier 0.01, channel_base 32768, channel_max 512, skip output, conv clamp
256; bf16 in the 4 highest resolutions with ``--config.train.precision=bf16``,
the code's fp16) against the DCGAN discriminator of width 64 (six 4×4 stride-2
convs 3→64→…→2048 at 256 px, BatchNorm, or InstanceNorm for WGAN-GP), 256 px,
4 clients (client 0 malicious except ``clean``), batch 32, 200 rounds of one
local epoch each (every client reads the whole training set, as the code's
DataLoaders do), only generators averaged with uniform weights 1/C; Adam(2e-4)
with PyTorch's default betas (0.9, 0.999) for BCE, RMSprop(2e-4) with
PyTorch's semantics for WGAN-GP (lambda 10, the code's N(0, 1) interpolation);
the trigger 16×16 at rows/cols 235-250 (5 px margin), in the code's washed-out
[0, 1] range pasted into [-1, 1] images; detection = an Isolation Forest on
|G loss of the last local batch|, from round index 11, persistent decay 0.9
when fewer than C // 2 clients are flagged.

The discriminator, loss and trigger as the code has them, where the project's
defaults differ:

* ``model.d_init='torch'``: the code never re-initializes its D, so it starts
  from PyTorch's default init, kernels U(±1/sqrt(fan_in)) (std 0.083 in the
  first conv, 0.0032 in the last at width 64) and norm scales 1, not DCGAN's
  N(0, 0.02) everywhere.
* ``train.bce='torch'`` (BCE settings): the code's ``nn.Sigmoid()`` +
  ``nn.BCELoss()`` in float32, value and gradient: the losses stop at 100 and
  the gradients vanish where the sigmoid rounds to 0 or 1, which changes the
  training once D is confident and the |G loss| the detection reads.
* ``model.d_norm_first=True`` (gp, both; from ``presets.GRADIENT_PENALTY``):
  the code's WGAN-GP critic has InstanceNorm after every conv, the first too
  (its BCE D has none after the first).
* ``attack.trigger='bands'``: the project's smooth colour-band trigger, a
  low-frequency image of saturated colour blocks like the code's trigger.png
  (far easier for a generator to reproduce than the project's default
  high-frequency pattern), resized with antialiased bilinear as the code's
  ``transforms.Resize``. With the original file, pass its path:
  ``--config.attack.trigger=/path/trigger.png``.

    python -m fedgan_jax.main --config configs/paper_full.py:both --workdir runs/paper_full_both \\
        --config.data.source=folder --config.data.path=/data/ISIC

The embedded synthetic data (the default source here, 2000 images at 256 px)
runs without a download; the paper used ISIC images (``data.source=folder``).

Expected cost on one H100, an **estimate from the FLOP count, not a
measurement** (no GPU was lent while this was written; ``launch.device_check``
measures rounds of this kind): ``fedgan_jax.flops`` counts 3.2 PFLOP per round
for ``attack`` (62 local steps × 4 clients × 12.8 TFLOP; G 24.7 M parameters,
90 GFLOP per image forward; D 44.7 M) and 3.4 PFLOP for ``both``: at 30 % of
the dense bf16 peak (989 TFLOP/s) about 11 s per round, 35 min for 200 rounds;
in f32 (TF32, 495 TFLOP/s) about 21 s per round. Memory: 3.2 GB of round state
(4 clients' D and optimizer states, the global models) and 1.6 GB of images
on the device, plus activations, estimated at ~20 GB per client at batch 32
in f32 (half in bf16): ``train.client_chunk=2`` trains two clients at a time
so an 80 GB H100 holds them; raise it on larger devices.
"""

from fedgan_jax import config_lib, presets

SETTINGS = ("clean", "attack", "detect", "gp", "both")


def get_config(setting: str = "attack"):
  if setting not in SETTINGS:
    raise ValueError(f"configs/paper_full.py:{setting}: unknown setting; accepted: {SETTINGS}.")
  c = config_lib.base_config()
  c.num_rounds = 200
  c.num_clients = 4
  c.resolution = 256
  c.eval_every = 5  # The code saves a sample grid every 5 epochs.
  c.ckpt_every = 10
  c.data.num_images = 2000
  c.data.partition = "full"  # Every client's DataLoader reads the whole dataset.
  c.attack.malicious = () if setting == "clean" else (0,)
  c.attack.trigger_size = 16
  c.attack.trigger_margin = 5
  c.attack.trigger_range = "unit"  # ToTensor()'s [0, 1] trigger pasted into [-1, 1] images.
  c.attack.trigger = "bands"  # Smooth colour bands, like the code's trigger.png (a path to that file works too).
  c.model.name = "stylegan2"
  c.model.latent_dim = 64
  c.model.d_width = 64
  c.model.d_init = "torch"  # The code leaves PyTorch's default init in its D.
  c.model.sg2.w_dim = 128
  c.model.sg2.mapping_layers = 8
  c.model.sg2.mapping_lr_mult = 0.01
  c.model.sg2.channel_base = 32768
  c.model.sg2.channel_max = 512
  c.model.sg2.conv_clamp = 256.0
  c.model.sg2.num_bf16_res = 4
  c.model.sg2.noise_mode = "random"  # Fresh noise inputs per call, as in training in the code.
  c.train.local_steps = 0  # One local epoch: each client's image count // batch, drop_last.
  c.train.client_chunk = 2  # Two clients vmapped at a time (activation memory; see the docstring).
  c.train.batch_size = 32
  c.train.optimizer = "adam"
  c.train.g_lr = c.train.d_lr = 2e-4
  c.train.b1, c.train.b2 = 0.9, 0.999  # torch.optim.Adam's defaults.
  c.train.bce = "torch"  # nn.Sigmoid() + nn.BCELoss() in float32 (read only while train.loss is 'bce').
  c.aggregation.weighting = "uniform"
  c.aggregation.average_discriminator = False
  if setting in ("detect", "both"):
    presets.apply(c, presets.DETECTION)
  if setting in ("gp", "both"):
    presets.apply(c, presets.GRADIENT_PENALTY)
  return c
