"""The distributed backdoor's setting: 100 clients, 10 drawn per round, 4 attackers each pasting a quarter.

Xie et al., "DBA: Distributed Backdoor Attacks against Federated Learning",
ICLR 2020: 100 clients of which 10 take part in a round, 4 attackers, the
global trigger split into 4 local parts (here its rows, one band per attacker:
``attack.dba``), the implant scored with the whole trigger. An attacker is in a
round only when it is drawn (10 of 100, from the round's key:
``federated/sampling.py``), so the 4 attackers together upload in about a third
of the rounds, and rarely two at once. Here on the synthetic dermoscopy data in
the federated GAN of Jin & Li (SASHIMI 2022), CPU-sized: 32 px, DCGAN G/D of
width 16, 40 images a client (iid), 2 local steps of batch 16, FedAvg.

    python -m fedgan_jax.main --config configs/dba.py --workdir runs/dba

Runtime, measured with ``--config.num_rounds=5`` on a 2-core CPU shared with other jobs (6 min in all):
setup 28 s (the data), first round 48 s (compilation), then 0.8 s a round; the final evaluation (FD, KID,
precision and recall in EfficientNet features of 512 samples) 4.3 min, ``--config.eval.extractor=none``
skips it. The 100 rounds add about 80 s of training and the evaluations of rounds 25, 50 and 75.
A defense: ``--config.aggregation.name=foolsgold`` (its per-client history follows each client across the
rounds it is drawn for), ``detect`` or ``alpha_detect``.
"""

from fedgan_jax import config_lib


def get_config():
  config = config_lib.base_config()
  config.num_clients = 100
  config.clients_per_round = 10  # DBA's 10 of 100 a round.
  config.num_rounds = 100
  config.eval_every = 25
  config.ckpt_every = 50
  config.attack.malicious = (0, 1, 2, 3)  # DBA's 4 attackers, one trigger part each.
  config.attack.dba = True
  config.attack.trigger_size = 8  # 8x8 px at 32 px: 2 rows a part.
  config.data.num_images = 4000  # 40 a client.
  config.model.g_width = 16
  config.model.d_width = 16
  config.train.local_steps = 2
  config.train.batch_size = 16
  return config
