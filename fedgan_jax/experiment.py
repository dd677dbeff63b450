"""Host-side orchestration of one run: build, loop rounds, evaluate, write, checkpoint.

Resume-first (as in big_vision): if ``<workdir>/checkpoints`` holds a round,
the run continues from it, ``metrics.jsonl`` is cut back to that round, and
every later round's key is ``fold_in(round_key, r)`` — so an interrupted and
resumed run writes the same metrics as an uninterrupted one, and rerunning
with a larger ``num_rounds`` extends a finished run.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

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


def run(config, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the federated GAN of ``config`` and writes ``workdir``.

  Args:
    config: a config built on ``config_lib.base_config()``.
    workdir: output directory (created); see README for what lands there.

  Returns:
    The summary written to ``summary.json``.
  """
  config_lib.validate(config)
  if config.num_replicas > 1:  # K seeds as one vmapped program, each writing <workdir>/seed_<s>/.
    return {"replicas": parallel.run_replicas(config, workdir, config.num_replicas)}
  t_start = time.perf_counter()
  primary = parallel.is_primary()  # Multi-host: only process 0 writes outputs (all checkpoint).
  os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
  if primary:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(config))
  logging.info("devices: %s", jax.devices())

  data, heldout, info = setup_data(config)
  program, _, _ = round_lib.build_from_config(config)
  root = jax.random.key(config.seed)
  k_init, k_rounds, k_eval = jax.random.split(root, 3)
  state = program.init(k_init)

  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  metrics_file = writers.JsonlWriter(os.path.join(workdir, "metrics.jsonl"), active=primary)
  start = ckpt.latest_round() or 0
  if start:
    state = ckpt.restore(start, state)
    logging.info("resumed from round %d", start)
  metrics_file.truncate_after(start)
  if start >= config.num_rounds:
    logging.info("already at round %d >= num_rounds=%d", start, config.num_rounds)

  is_mal = np.asarray(data.is_malicious)
  evaluator = evaluation.Evaluator(config, program.sample, heldout, np.asarray(data.trigger),
                                   tuple(np.asarray(data.trigger_loc).tolist()), k_eval, workdir,
                                   poisoned=poisoned_examples(data, config), write=primary)
  tb = tensorboard.TensorBoardWriter(os.path.join(workdir, "tb"), active=primary)
  # Clients sharded over the devices when they divide evenly (local training under shard_map);
  # after the host-side copies above (is_mal, evaluator inputs), which need addressable arrays.
  mesh = parallel.auto_client_mesh(config.num_clients)
  state, data = parallel.shard_round_inputs(state, data, mesh)
  round_fn = parallel.jit_round(program, state, data, mesh)
  progress = writers.Progress(config.num_rounds, start)
  pending: list[tuple[int, dict, float]] = []
  t_compile = None

  def flush(eval_metrics: dict | None = None):
    host = jax.device_get([m for _, m, _ in pending])
    for (r, _, t), m in zip(pending, host):
      record = {"round": r, **m, **_detection(m, is_mal), "z/wall_sec": t}
      if eval_metrics and r == pending[-1][0]:
        record.update(eval_metrics)
      metrics_file.write(record)
      tb.scalars(r, record)
      # NaN guard: stop a diverged run instead of writing garbage for hours.
      if not record["train/global_finite"] or not np.isfinite(m["train/g_loss"]).any():
        pending.clear()
        raise FloatingPointError(
            f"round {r}: training diverged (global generator finite: {record['train/global_finite']}, "
            f"client G losses: {np.asarray(m['train/g_loss']).tolist()}); see {metrics_file.path}. "
            "Try a lower train.g_lr / train.d_lr, or a robust aggregation.name.")
    pending.clear()

  for r in range(start + 1, config.num_rounds + 1):
    state, m = round_fn(state, data, jax.random.fold_in(k_rounds, r))
    if t_compile is None:
      jax.block_until_ready(m)
      t_compile = time.perf_counter() - t_start
      logging.info("first round (including compilation) done after %.1f s", t_compile)
    pending.append((r, m, time.perf_counter() - t_start))
    is_eval = r % config.eval_every == 0 or r == config.num_rounds or r == 1
    is_ckpt = r % config.ckpt_every == 0 or r == config.num_rounds
    if is_eval:
      eval_metrics = evaluator(state.g_global, r, final=r == config.num_rounds)
      tb.image(r, "samples", evaluator.last_grid)
      flush(eval_metrics)
    elif is_ckpt or r % config.log_every == 0:
      flush()
    if r % config.log_every == 0 or r == config.num_rounds:
      line = progress.line(r)
      logging.info(line)
      if primary:
        print(line, flush=True)
    if is_ckpt:
      ckpt.save(r, state)
  flush()
  ckpt.close()
  tb.close()

  if not primary:
    return {}
  records = writers.read_jsonl(metrics_file.path)
  summary = _summary(config, records, info, is_mal, time.perf_counter() - t_start, t_compile, start)
  summary["trigger_calibration"] = evaluator.calibration
  evaluator.finish()
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2, sort_keys=True, default=str)
  try:  # Plots and report.html: a plotting problem must not fail a finished run.
    from fedgan_jax import report
    report.write_run_report(workdir)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("report for %s failed: %s", workdir, e)
  return summary


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
