"""Host-side orchestration of one run: build, loop rounds, evaluate, write, checkpoint.

Resume-first (as in big_vision): if ``<workdir>/checkpoints`` holds a round,
the run continues from it, ``metrics.jsonl`` is cut back to that round, and
every later round's key is ``fold_in(round_key, r)`` — so an interrupted and
resumed run writes the same metrics as an uninterrupted one, and rerunning
with a larger ``num_rounds`` extends a finished run.
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from fedgan_jax import config_lib
from fedgan_jax import evaluation
from fedgan_jax import parallel
from fedgan_jax.data import partition as partition_lib
from fedgan_jax.data import sources
from fedgan_jax.data import triggers
from fedgan_jax.io import checkpoint as ckpt_lib
from fedgan_jax.io import tensorboard
from fedgan_jax.io import writers
from fedgan_jax.train import round as round_lib


def setup_data(config) -> tuple[round_lib.RoundData, Any, dict]:
  """Loads, partitions and poisons the data; returns device-resident round inputs.

  Returns:
    (round data, clean held-out ``Dataset``, info dict for ``summary.json``).
  """
  train, heldout, info = sources.load_data(config)
  sources.check_enough(train, config)
  kwargs = {"alpha": config.data.alpha} if config.data.partition in ("dirichlet", "quantity") else {}
  clients = partition_lib.partition(train, config.num_clients, config.data.partition, config.seed, **kwargs)
  C = config.num_clients
  is_mal = np.zeros(C, bool)
  is_mal[list(config.attack.malicious)] = True
  flags = triggers.poison_flags(clients.counts, clients.images.shape[1], is_mal,
                                config.attack.poison_rate, config.seed + 1)
  trigger = triggers.load_trigger(config)
  data = round_lib.RoundData(
      images=jnp.asarray(clients.images), counts=jnp.asarray(clients.counts),
      is_malicious=jnp.asarray(is_mal), poison_flags=jnp.asarray(flags),
      trigger=jnp.asarray(trigger), trigger_loc=jnp.asarray(triggers.trigger_location(config), jnp.int32),
      mimic=jnp.asarray(config.attack.report_losses == "mimic"))
  info = {**info, "client_counts": clients.counts.tolist(),
          "poisoned_per_client": flags.sum(1).tolist()}
  return data, heldout, info


def poisoned_examples(data: round_lib.RoundData, config, max_images: int = 512) -> np.ndarray:
  """The malicious clients' poisoned training images (trigger pasted), as float [-1, 1]."""
  flags = np.asarray(data.poison_flags)
  c_idx, i_idx = np.nonzero(flags)
  if not len(c_idx):
    return np.zeros((0,), np.float32)
  c_idx, i_idx = c_idx[:max_images], i_idx[:max_images]
  imgs = np.asarray(data.images)[c_idx, i_idx].astype(np.float32) / 127.5 - 1.0
  if config.attack.trigger_location == "random":
    loc = triggers.random_locations(jax.random.key(config.seed), len(imgs), data.trigger.shape[0], config.resolution)
  else:
    loc = data.trigger_loc
  return np.asarray(triggers.paste(jnp.asarray(imgs), data.trigger, loc, jnp.ones(len(imgs), bool)))


def _detection(record: dict, is_mal: np.ndarray) -> dict:
  """``eval/detect_tpr`` / ``eval/detect_fpr`` of this round's flags vs the truth."""
  flagged = np.asarray(record["agg/flagged"], bool)
  tpr = float(flagged[is_mal].mean()) if is_mal.any() else float("nan")
  fpr = float(flagged[~is_mal].mean()) if (~is_mal).any() else float("nan")
  return {"eval/detect_tpr": tpr, "eval/detect_fpr": fpr}


class _Replica(NamedTuple):
  """Where one replica's outputs go, and what its host-side bookkeeping needs."""

  config: Any
  workdir: str
  metrics: writers.JsonlWriter
  evaluator: evaluation.Evaluator
  tb: tensorboard.TensorBoardWriter
  is_mal: np.ndarray
  info: dict


def replica_configs(config) -> list[Any]:
  """The run's config, or with ``num_replicas = K > 1`` one config per seed ``seed .. seed+K-1``."""
  if config.num_replicas == 1:
    return [config]
  out = []
  for s in parallel.replica_seeds(config.seed, config.num_replicas):
    c = copy.deepcopy(config)
    with c.unlocked():
      c.seed, c.num_replicas = s, 1
    out.append(c)
  return out


def run(config, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the federated GAN of ``config`` and writes ``workdir``.

  With ``num_replicas = K > 1``, seeds ``seed .. seed+K-1`` train as ONE
  vmapped program; replica ``k`` writes ``<workdir>/seed_<seed+k>/`` exactly as
  the single run with that seed would (same metrics up to float
  reassociation), and the stacked state is checkpointed in
  ``<workdir>/checkpoints``.

  Args:
    config: a config built on ``config_lib.base_config()``.
    workdir: output directory (created); see README for what lands there.

  Returns:
    The summary written to ``summary.json``; with replicas,
    ``{'replicas': [summary per replica]}``.
  """
  config_lib.validate(config)
  t_start = time.perf_counter()
  primary = parallel.is_primary()  # Multi-host: only process 0 writes outputs (all checkpoint).
  K = config.num_replicas
  replicated = K > 1
  members = [(c, os.path.join(workdir, f"seed_{c.seed}") if replicated else workdir)
             for c in replica_configs(config)]
  for c, d in members:
    os.makedirs(os.path.join(d, "samples"), exist_ok=True)
    if primary:
      with open(os.path.join(d, "config.json"), "w") as f:
        f.write(config_lib.to_json(c))
  logging.info("devices: %s", jax.devices())

  program, _, _ = round_lib.build_from_config(config)
  if replicated:
    datas, heldouts, infos = zip(*[setup_data(c) for c, _ in members])
    data = parallel.stack_replicas(datas)
    k_init, k_rounds, k_eval = parallel.replica_keys(config.seed, K)
    state = jax.jit(parallel.replicate(program).init)(k_init)
    view = parallel.unstack
    round_key = lambda r: parallel.round_keys(k_rounds, r)
  else:
    data, heldout, info = setup_data(config)
    heldouts, infos = [heldout], [info]
    k_init, k_rounds, k_eval = jax.random.split(jax.random.key(config.seed), 3)
    k_eval = k_eval[None]
    state = jax.jit(program.init)(k_init)  # One compiled program, not hundreds of op-by-op dispatches.
    view = lambda tree, k: tree
    round_key = lambda r: jax.random.fold_in(k_rounds, r)

  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  start = ckpt.latest_round() or 0
  if start:
    state = ckpt.restore(start, state)
    logging.info("resumed from round %d", start)
  if start >= config.num_rounds:
    logging.info("already at round %d >= num_rounds=%d", start, config.num_rounds)

  replicas = []
  for k, (c, d) in enumerate(members):
    dk = view(data, k)
    metrics_file = writers.JsonlWriter(os.path.join(d, "metrics.jsonl"), active=primary)
    metrics_file.truncate_after(start)
    evaluator = evaluation.Evaluator(c, program.sample, heldouts[k], np.asarray(dk.trigger),
                                     tuple(np.asarray(dk.trigger_loc).tolist()), k_eval[k], d,
                                     poisoned=poisoned_examples(dk, c), write=primary)
    replicas.append(_Replica(c, d, metrics_file, evaluator,
                             tensorboard.TensorBoardWriter(os.path.join(d, "tb"), active=primary),
                             np.asarray(dk.is_malicious), infos[k]))
  # Clients sharded over the devices when they divide evenly (local training under shard_map);
  # after the host-side copies above, which need addressable arrays.
  mesh = parallel.auto_client_mesh(config.num_clients)
  state, data = parallel.shard_round_inputs(state, data, mesh, replicas=replicated)
  round_fn = parallel.jit_round(program, state, data, mesh, replicas=replicated)
  progress = writers.Progress(config.num_rounds, start)
  pending: list[tuple[int, dict, float]] = []
  t_compile = None

  def flush(eval_metrics: list[dict] | None = None):
    host = jax.device_get([m for _, m, _ in pending])
    for (r, _, t), m_all in zip(pending, host):
      for k, rep in enumerate(replicas):
        m = view(m_all, k)
        record = {"round": r, **m, **_detection(m, rep.is_mal), "z/wall_sec": t}
        if eval_metrics and r == pending[-1][0]:
          record.update(eval_metrics[k])
        rep.metrics.write(record)
        rep.tb.scalars(r, record)
        # NaN guard: stop a diverged run instead of writing garbage for hours.
        if not record["train/global_finite"] or not np.isfinite(m["train/g_loss"]).any():
          pending.clear()
          raise FloatingPointError(
              f"round {r}{f' (seed {rep.config.seed})' if replicated else ''}: training diverged "
              f"(global generator finite: {record['train/global_finite']}, client G losses: "
              f"{np.asarray(m['train/g_loss']).tolist()}); see {rep.metrics.path}. "
              "Try a lower train.g_lr / train.d_lr, or a robust aggregation.name.")
    pending.clear()

  for r in range(start + 1, config.num_rounds + 1):
    state, m = round_fn(state, data, round_key(r))
    if t_compile is None:
      jax.block_until_ready(m)
      t_compile = time.perf_counter() - t_start
      logging.info("first round (including compilation) done after %.1f s", t_compile)
    pending.append((r, m, time.perf_counter() - t_start))
    is_eval = r % config.eval_every == 0 or r == config.num_rounds or r == 1
    is_ckpt = r % config.ckpt_every == 0 or r == config.num_rounds
    if is_eval:
      eval_metrics = []
      for k, rep in enumerate(replicas):
        eval_metrics.append(rep.evaluator(view(state.g_global, k), r, final=r == config.num_rounds))
        rep.tb.image(r, "samples", rep.evaluator.last_grid)
      flush(eval_metrics)
    elif is_ckpt or r % config.log_every == 0:
      flush()
    if r % config.log_every == 0 or r == config.num_rounds:
      line = progress.line(r) + (f"  ({K} replicas)" if replicated else "")
      logging.info(line)
      if primary:
        print(line, flush=True)
    if is_ckpt:
      ckpt.save(r, state)
  flush()
  ckpt.close()

  wall = time.perf_counter() - t_start
  summaries = []
  for k, rep in enumerate(replicas):
    rep.tb.close()
    if not primary:
      continue
    records = writers.read_jsonl(rep.metrics.path)
    summary = _summary(rep.config, records, rep.info, rep.is_mal, wall, t_compile, start)
    summary["trigger_calibration"] = rep.evaluator.calibration
    if replicated:
      summary["replica"] = {"index": k, "of": K, "group_workdir": workdir}
    rep.evaluator.finish()
    with open(os.path.join(rep.workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2, sort_keys=True, default=str)
    try:  # Plots and report.html: a plotting problem must not fail a finished run.
      from fedgan_jax import report
      report.write_run_report(rep.workdir)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("report for %s failed: %s", rep.workdir, e)
    summaries.append(summary)
  if not primary:
    return {}
  return {"replicas": summaries} if replicated else summaries[0]


def _summary(config, records, info, is_mal, wall, t_compile, start) -> dict[str, Any]:
  final = {}
  for rec in records:  # The last value of every metric (eval metrics only exist on eval rounds).
    final.update({k: v for k, v in rec.items() if not k.startswith("z/")})
  first_flag = {}
  for c in np.flatnonzero(is_mal):
    rounds = [rec["round"] for rec in records if rec["agg/flagged"][c]]
    first_flag[int(c)] = rounds[0] if rounds else None
  n = max(len(records), 1)
  return {
      "final": final,
      "rounds": records[-1]["round"] if records else 0,
      "resumed_from": start,
      "malicious": list(config.attack.malicious),
      "first_flag_round": first_flag,
      "detect_tpr_mean": _nanmean([r["eval/detect_tpr"] for r in records]),
      "detect_fpr_mean": _nanmean([r["eval/detect_fpr"] for r in records]),
      "data": info,
      "wall_sec": wall,
      "first_round_sec": t_compile,
      "num_records": n,
  }


def _nanmean(xs):
  xs = [x for x in xs if x is not None and not (isinstance(x, float) and np.isnan(x))]
  return float(np.mean(xs)) if xs else None
