"""One federated round as pure functions over a leading client axis.

* ``state``: the pytrees a round reads and writes (``RoundData``,
  ``ClientState``, ``RoundState``, ``LocalOut``, ``Uploads``, ``Program``).
* ``client``: local training of ONE client (L steps of a D step then G steps),
  lifted over clients with ``jax.vmap`` by ``program``.
* ``attack``: what the simulated malicious clients do: paste the trigger on
  their real images, and (``mimic``) lie about their losses before anything
  reaches the server.
* ``server``: server statistics of the uploads and the aggregation.
* ``program``: ``build`` puts the three together into one jittable round.
* ``sharding``: the client axis over a device mesh (local training under
  ``shard_map``).
* ``replicas``: K seeds of one run as one program (a leading replica axis).
* ``losses``: adversarial losses and the local regularizers.
* ``dp_sgd``: DP-SGD on the discriminator (per-example clipping and noise, ``train.dp_sgd``).
"""
