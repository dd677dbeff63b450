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
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging

from fedgan_jax import assemble, config_lib, distributed, evaluation, report
from fedgan_jax.federated import replicas as replicas_lib
from fedgan_jax.federated import sharding
from fedgan_jax.io import checkpoint as ckpt_lib
from fedgan_jax.io import rundir, tensorboard, writers
from fedgan_jax.metrics import detection


def _detection(record: dict, is_mal: np.ndarray) -> dict:
  """``eval/detect_tpr`` / ``eval/detect_fpr`` of this round's flags vs the truth."""
  tpr, fpr = detection.detection_rates(record["agg/flagged"], is_mal)
  return {"eval/detect_tpr": tpr, "eval/detect_fpr": fpr}


class ReplicaOutputs(NamedTuple):
  """Where one replica's (or the single run's) outputs go, and what its bookkeeping needs."""

  config: Any
  workdir: str
  metrics: writers.JsonlWriter
  evaluator: evaluation.Evaluator
  tb: tensorboard.TensorBoardWriter
  is_mal: np.ndarray
  info: dict


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
  primary = distributed.is_primary()  # Multi-host: only process 0 writes outputs (all checkpoint).
  K = config.num_replicas
  replicated = K > 1
  members = [
    (c, os.path.join(workdir, f"seed_{c.seed}") if replicated else workdir) for c in assemble.replica_configs(config)
  ]
  for c, d in members:
    os.makedirs(os.path.join(d, "samples"), exist_ok=True)
    if primary:
      with open(os.path.join(d, "config.json"), "w") as f:
        f.write(config_lib.to_json(c))
  logging.info("devices: %s", jax.devices())

  if replicated:
    datas, heldouts, infos = zip(*[assemble.setup_data(c) for c, _ in members])
    data = replicas_lib.stack_replicas(datas)
  else:
    data, heldout, info = assemble.setup_data(config)
    heldouts, infos = [heldout], [info]
  program, _, _ = assemble.build_program(config, assemble.local_steps(config, data.counts))
  if replicated:
    k_init, k_rounds, k_eval = replicas_lib.replica_keys(config.seed, K)
    state = jax.jit(replicas_lib.replicate(program).init)(k_init)
    view = replicas_lib.unstack
    round_key = lambda r: replicas_lib.round_keys(k_rounds, r)
  else:
    k_init, k_rounds, k_eval = replicas_lib.run_keys(config.seed)
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
    evaluator = evaluation.Evaluator(
      c,
      program.sample,
      heldouts[k],
      np.asarray(dk.trigger),
      tuple(np.asarray(dk.trigger_loc).tolist()),
      k_eval[k],
      d,
      poisoned=assemble.poisoned_examples(dk, c),
      write=primary,
    )
    replicas.append(
      ReplicaOutputs(
        c,
        d,
        metrics_file,
        evaluator,
        tensorboard.TensorBoardWriter(os.path.join(d, "tb"), active=primary),
        np.asarray(dk.is_malicious),
        infos[k],
      )
    )
  # Clients sharded over the devices when they divide evenly (local training under shard_map);
  # after the host-side copies above, which need addressable arrays.
  mesh = sharding.auto_client_mesh(config.num_clients)
  state, data = sharding.shard_round_inputs(state, data, mesh, replicas=replicated)
  round_fn = sharding.jit_round(program, state, data, mesh, replicas=replicated)
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
            "Try a lower train.g_lr / train.d_lr, or a robust aggregation.name."
          )
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
    records = rundir.read_records(rep.metrics.path)
    summary = _summary(rep.config, records, rep.info, rep.is_mal, wall, t_compile, start)
    summary["trigger_calibration"] = rep.evaluator.calibration
    if replicated:
      summary["replica"] = {"index": k, "of": K, "group_workdir": workdir}
    rep.evaluator.finish()
    with open(os.path.join(rep.workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2, sort_keys=True, default=str)
    try:  # Plots and report.html: a plotting problem must not fail a finished run.
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
  first_flag = detection.first_flagged_round(
    [rec["agg/flagged"] for rec in records], is_mal, [rec["round"] for rec in records]
  )
  n = max(len(records), 1)
  return {
    "final": final,
    "rounds": records[-1]["round"] if records else 0,
    "resumed_from": start,
    "malicious": list(config.attack.malicious),
    "first_flag_round": first_flag,
    "detect_tpr_mean": detection.mean_rate(r["eval/detect_tpr"] for r in records),
    "detect_fpr_mean": detection.mean_rate(r["eval/detect_fpr"] for r in records),
    "data": info,
    "wall_sec": wall,
    "first_round_sec": t_compile,
    "num_records": n,
  }
