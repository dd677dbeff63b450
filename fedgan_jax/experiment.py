"""Host-side orchestration of one run: build, loop rounds, evaluate, write, checkpoint.

Resume-first (as in big_vision): if ``<workdir>/checkpoints`` holds a round,
the run continues from the newest one that fits the config and restores
(``resume.py``), ``metrics.jsonl`` and TensorBoard are cut back to that
round, and every later round's key is ``fold_in(round_key, r)``, so an
interrupted and resumed run writes the same metrics as an uninterrupted one,
and rerunning with a larger ``num_rounds`` extends a finished run.

The run holds ``<workdir>/.lock`` for its whole life (a second run on the
same workdir stops at once), and writes ``config.json`` only once the config
is valid, the data loaded and the checkpoint found to fit: a failed rerun
leaves the workdir as it was.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging

from fedgan_jax import assemble, config_lib, distributed, evaluation, fork, privacy, report, resume, run_console
from fedgan_jax.federated import replicas as replicas_lib
from fedgan_jax.federated import sampling, sharding, upload_attacks
from fedgan_jax.io import checkpoint as ckpt_lib
from fedgan_jax.io import lock as lock_lib
from fedgan_jax.io import rundir, tensorboard, wandb_writer, writers
from fedgan_jax.metrics import detection


class RunInterruptedError(Exception):
  """Ctrl-C: the message says at which round, and how to go on."""


def _detection(record: dict, is_mal: np.ndarray) -> dict:
  """``eval/detect_tpr`` / ``eval/detect_fpr`` of this round's flags vs the truth (over its sampled clients)."""
  tpr, fpr = detection.detection_rates(record["agg/flagged"], is_mal, record.get(sampling.SAMPLED))
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
  wb: wandb_writer.WandbWriter


class _Built(NamedTuple):
  """The run's parts before any output is written."""

  members: list  # (config, workdir) per member: replica, or packed sweep point (fedgan_jax/pack.py).
  data: Any
  heldouts: list
  infos: list
  references: list  # (clean training members, target class) per replica, for the Evaluator.
  program: Any
  init: Any  # Jitted key -> RoundState (stacked with replicas).
  k_init: Any
  k_eval: Any
  round_key: Any
  view: Any  # (tree, k) -> replica k's part.
  num_classes: int  # The data's classes with model.conditional; 0 otherwise.
  stacked: bool = False  # The members train as one program over a leading member axis.
  labels: tuple = ("",)  # Each member's name on the console ('' for a single run).
  kind: str = "replica"  # What a member is: 'replica' (num_replicas) or 'pack' (packed sweep points).
  metric_keys: tuple = ()  # Per member, the metric keys its own run writes (packed rules: the union's subset).


class RunCheckpointer(ckpt_lib.Checkpointer):
  """The run's ``<workdir>/checkpoints`` (with replicas, the stacked state) and how the run starts from them.

  ``fedgan_jax.pack.PackCheckpointer`` has the same methods for packed sweep points (one directory each).
  """

  def resume(self, like: Any, config, warn) -> tuple[int, Any | None]:
    """``resume.restore`` of the newest checkpoint that fits: ``(round, state)``, ``(0, None)`` if none."""
    return resume.restore(self, like, config, warn)

  def fork(self, like: Any, fresh: Any, config) -> tuple[int, Any]:
    """The start of a fork (``config.init_from``): ``fork.restore`` into ``fresh``."""
    return fork.restore(config.init_from, like, fresh, config)


def run(config, workdir: str, console: run_console.Console | None = None) -> dict[str, Any]:
  """Trains (or resumes) the federated GAN of ``config`` and writes ``workdir``.

  With ``num_replicas = K > 1``, seeds ``seed .. seed+K-1`` train as ONE
  vmapped program; replica ``k`` writes ``<workdir>/seed_<seed+k>/`` exactly as
  the single run with that seed would (same metrics up to float
  reassociation), and the stacked state is checkpointed in
  ``<workdir>/checkpoints``.

  Args:
    config: a config built on ``config_lib.base_config()``.
    workdir: output directory (created); see README for what lands there.
    console: where the header, progress and results are printed (default:
      stdout/stderr of the primary process).

  Returns:
    The summary written to ``summary.json``; with replicas,
    ``{'replicas': [summary per replica]}``.

  Raises:
    ValueError: a bad config value, bad data, or a config that does not fit
      the workdir's checkpoints (one line each).
    OSError: the workdir is in use by another run (``lock.WorkdirBusyError``),
      or cannot be written (a checkpoint on a full disk included).
    RunInterruptedError: Ctrl-C; the checkpoints on disk are whole.
  """
  config_lib.validate(config)
  primary = distributed.is_primary()  # Multi-host: only process 0 writes outputs (all checkpoint).
  console = console or run_console.Console(active=primary)
  with lock_lib.WorkdirLock(workdir, active=primary):
    return run_members(config, workdir, console, primary)


def _build(config, workdir: str) -> _Built:
  K = config.num_replicas
  members = [
    (c, os.path.join(workdir, f"seed_{c.seed}") if K > 1 else workdir) for c in assemble.replica_configs(config)
  ]
  return build_members(members, stacked=K > 1)


def build_members(
  members: list, stacked: bool, kind: str = "replica", labels=None, check_steps=None, rules=None
) -> _Built:
  """The parts of a run whose members (``(config, workdir)`` each) train as one program.

  Args:
    members: ``(config, workdir)`` per member; the first config builds the program.
    stacked: a leading member axis (replicas, packed points); False: one single run.
    kind: ``'replica'`` or ``'pack'`` (the summary's block and the console's note).
    labels: each member's name on the console (default: ``seed <s>`` when stacked).
    check_steps: called with each member's ``(config, RoundData)`` before the program is built
      (``pack`` refuses members whose own runs would differ in shape).
    rules: the members' server rules when they differ (``aggregation.choice.PointRules``, packed points).
  """
  runs = [assemble.setup_run_data(c) for c, _ in (members if stacked else members[:1])]
  heldouts, infos = [r.heldout for r in runs], [r.info for r in runs]
  references = [(r.members, r.target_class) for r in runs]
  datas = [r.data for r in runs]
  if stacked and check_steps is not None:
    check_steps([c for c, _ in members], datas)
  data = replicas_lib.stack_replicas(datas) if stacked else datas[0]
  config = members[0][0]
  # model.conditional: the models' classes are the data's (every member reads the same source).
  num_classes = int(infos[0]["num_classes"]) if config.model.conditional else 0
  program, _, _ = assemble.build_program(config, assemble.local_steps(config, data.counts), num_classes, rules)
  if stacked:
    k_init, k_rounds, k_eval = replicas_lib.member_keys([c.seed for c, _ in members])
    init = jax.jit(replicas_lib.replicate(program).init)
    view = replicas_lib.unstack
    round_key = lambda r: replicas_lib.round_keys(k_rounds, r)
  else:
    k_init, k_rounds, k_eval = replicas_lib.run_keys(config.seed)
    k_eval = k_eval[None]
    init = jax.jit(program.init)  # One compiled program, not hundreds of op-by-op dispatches.
    view = lambda tree, k: tree
    round_key = lambda r: jax.random.fold_in(k_rounds, r)
  labels = labels or ([f"seed {c.seed}" for c, _ in members] if stacked else [""])
  b = _Built(members, data, heldouts, infos, references, program, init, k_init, k_eval, round_key, view, num_classes)
  return b._replace(stacked=stacked, labels=tuple(labels), kind=kind)


def _abstract_state(init, k_init) -> Any:
  """The shapes, dtypes and placement of ``init(k_init)`` without computing it (the restore target)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # Where jit(init) would put it.
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), jax.eval_shape(init, k_init))


def _open_outputs(b: _Built, start: int, primary: bool, console, forked: bool = False) -> list[ReplicaOutputs]:
  """Writes each member's ``config.json`` and cuts its metrics and TensorBoard back to ``start``.

  A fork (``forked``) starts at the base's round with no rounds of its own before it.
  """
  outputs = []
  for k, (c, d) in enumerate(b.members):
    dk = assemble.own_trigger(b.view(b.data, k), c)  # A packed point's own trigger, not the pack's window.
    if primary:
      os.makedirs(os.path.join(d, "samples"), exist_ok=True)
      with open(os.path.join(d, "config.json"), "w") as f:
        f.write(config_lib.to_json(c))
    metrics_file = writers.JsonlWriter(os.path.join(d, "metrics.jsonl"), active=primary)
    cut = metrics_file.truncate_after(start)
    if cut["torn"]:
      console.warn(f"{metrics_file.path}: dropped {cut['torn']} torn line(s) left by an interrupted run")
    if start and cut["kept"] != start and not forked:
      console.warn(f"{metrics_file.path} holds {cut['kept']} of the {start} rounds before the checkpoint")
    evaluator = evaluation.Evaluator(
      c,
      b.program.sample,
      b.heldouts[k],
      np.asarray(dk.trigger),
      tuple(np.asarray(dk.trigger_loc).tolist()),
      b.k_eval[k],
      d,
      poisoned=assemble.poisoned_examples(dk, c),
      write=primary,
      num_classes=b.num_classes,
      members=b.references[k][0],
      target_class=b.references[k][1],
    )
    tb = tensorboard.TensorBoardWriter(os.path.join(d, "tb"), active=primary, keep_until=start)
    wb = wandb_writer.WandbWriter(c, d, active=primary)
    outputs.append(ReplicaOutputs(c, d, metrics_file, evaluator, tb, np.asarray(dk.is_malicious), b.infos[k], wb))
  return outputs


def _long_evaluation(config, evaluator: evaluation.Evaluator, r: int) -> str | None:
  """What makes round ``r``'s evaluation long (feature-space metrics, the utility classifiers), or None."""
  final = r == config.num_rounds
  parts = []
  if evaluator.extractor is not None and evaluator.features_due(r, final):
    parts.append(f"FD/KID/precision/recall in {config.eval.extractor} features of {config.eval.num_samples} samples")
  if evaluator.utility_due(r, final):
    parts.append(f"TSTR/TRTR classifiers ({config.eval.utility_steps} steps each)")
  return "; ".join(parts) or None


def run_members(
  config, workdir: str, console: run_console.Console, primary: bool, build=None, checkpointer=None
) -> dict[str, Any]:
  """The body of ``run`` (the caller holds the workdir locks): build, resume or fork, train, finish.

  Args:
    config: the run's config (with members: the first member's; it sets rounds, evaluation and checkpoints).
    workdir: the run's directory (with packed members, their common parent: the profile goes there).
    console: the run's lines.
    primary: whether this process writes outputs.
    build: ``() -> _Built`` (default: ``_build(config, workdir)``; ``fedgan_jax.pack`` builds packed points).
    checkpointer: ``_Built -> RunCheckpointer``-like (default: ``<workdir>/checkpoints``).

  Returns:
    As ``run``; packed points: ``{'points': [summary per point]}``.
  """
  t_start = time.perf_counter()
  logging.info("devices: %s", jax.devices())
  if not primary:  # Each process says where it runs; only the primary writes (and prints the rest).
    print(f"process {jax.process_index()} of {jax.process_count()}: {run_console.devices_text(jax.devices())}")
  b = build() if build else _build(config, workdir)
  ckpt = checkpointer(b) if checkpointer else RunCheckpointer(os.path.join(workdir, "checkpoints"), primary=primary)
  progress = None
  start = 0
  try:
    like = _abstract_state(b.init, b.k_init)
    start, state = ckpt.resume(like, config, console.warn)
    forked = False
    if state is None:
      state = b.init(b.k_init)
      if config.init_from:  # A new run that starts from another run's checkpoint (fork.py).
        start, state = ckpt.fork(like, state, config)
        forked = True
    # The run goes ahead from here: only now is anything of this config written.
    ckpt.write_config(config_lib.to_json(config))
    outputs = _open_outputs(b, start, primary, console, forked)
    console.header(config, workdir, jax.devices(), start, forked)
    progress = writers.Progress(config.num_rounds, start)
    _train(config, workdir, b, state, outputs, ckpt, console, progress, t_start)
    return _finish(config, workdir, b, outputs, progress, start, t_start, console, primary)
  except KeyboardInterrupt:
    try:
      ckpt.close()  # Pending saves finish: every checkpoint on disk is whole.
    except OSError:
      pass
    last = ckpt.latest_round()
    at = f"at round {progress.current}" if progress and progress.current > start else "before the first round"
    raise RunInterruptedError(
      f"interrupted {at}; rerun the same command to resume" + (f" (from round {last})" if last else "")
    ) from None
  except BaseException:
    try:
      ckpt.close()
    except Exception:  # pylint: disable=broad-except
      pass  # The error in flight is the one to report.
    raise


def _train(
  config, workdir: str, b: _Built, state, outputs: list[ReplicaOutputs], ckpt, console, progress, t_start
) -> None:
  """The round loop, from ``progress.start + 1`` to ``num_rounds`` (profile_rounds traced in <workdir>/profile)."""
  replicated = b.stacked
  note = f"  ({len(b.members)} {'replicas' if b.kind == 'replica' else 'points packed'})" if replicated else ""
  # Clients sharded over the devices when they divide evenly (local training under shard_map);
  # after the host-side copies above, which need addressable arrays.
  mesh = sharding.auto_client_mesh(config.num_clients, sampling.clients_per_round(config))
  state, data = sharding.shard_round_inputs(state, b.data, mesh, replicas=replicated)
  round_fn = sharding.jit_round(b.program, state, data, mesh, replicas=replicated)
  pending: list[tuple[int, dict, float]] = []
  window = config_lib.profile_window(config)
  trace_from, trace_to = (window[0], window[0] + window[1] - 1) if window else (0, -1)
  profiling = False
  if window and progress.start >= trace_from:
    console.warn(f"profile_rounds={config.profile_rounds!r}: the run resumes after round {trace_from}; no trace")

  def flush(eval_metrics: list[dict] | None = None):
    host = jax.device_get([m for _, m, _ in pending])
    for (r, _, t), m_all in zip(pending, host):
      for k, rep in enumerate(outputs):
        m = b.view(m_all, k)
        if b.metric_keys:  # Packed points of several rules: the union's keys this point's own run has.
          m = {key: v for key, v in m.items() if key in b.metric_keys[k]}
        record = {"round": r, **m, **_detection(m, rep.is_mal), "z/wall_sec": t}
        if eval_metrics and r == pending[-1][0]:
          record.update(eval_metrics[k])
        rep.metrics.write(record)
        rep.tb.scalars(r, record)
        rep.wb.scalars(r, record)
        # NaN guard: stop a diverged run instead of writing garbage for hours.
        if not record["train/global_finite"] or not np.isfinite(m["train/g_loss"]).any():
          pending.clear()
          raise FloatingPointError(
            f"round {r}{f' ({b.labels[k]})' if replicated else ''}: training diverged "
            f"(global generator finite: {record['train/global_finite']}, client G losses: "
            f"{np.asarray(m['train/g_loss']).tolist()}); see {rep.metrics.path}. "
            "Try a lower train.g_lr / train.d_lr, or a robust aggregation.name."
          )
    pending.clear()

  try:
    for r in range(progress.start + 1, config.num_rounds + 1):
      progress.current = r
      if r == trace_from and r > progress.start:
        jax.block_until_ready(state)
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
        profiling = True
      state, m = round_fn(state, data, b.round_key(r))
      if profiling and r == trace_to:
        jax.block_until_ready((state, m))
        jax.profiler.stop_trace()
        profiling = False
        console.line(f"profile: rounds {trace_from}..{trace_to} traced in {os.path.join(workdir, 'profile')}")
      if progress.first is None:
        jax.block_until_ready(m)
        logging.info("first round (including compilation) done after %.1f s", progress.first_round_done())
      pending.append((r, m, time.perf_counter() - t_start))
      is_eval = r % config.eval_every == 0 or r == config.num_rounds or r == 1
      is_ckpt = r % config.ckpt_every == 0 or r == config.num_rounds
      if is_eval:
        jax.block_until_ready(state)  # The rounds dispatched so far count as training, not evaluation.
        eval_metrics = []
        with progress.timed("evaluation"):
          for k, rep in enumerate(outputs):
            long = _long_evaluation(rep.config, rep.evaluator, r)
            if long and k == 0:
              console.evaluating(r, long)
            eval_metrics.append(rep.evaluator(b.view(state.g_global, k), r, final=r == config.num_rounds))
            rep.tb.image(r, "samples", rep.evaluator.last_grid)
            rep.wb.image(r, "samples", rep.evaluator.last_grid)
        flush(eval_metrics)
      elif is_ckpt or r % config.log_every == 0:
        flush()
      if r % config.log_every == 0 or r == config.num_rounds:
        console.line(progress.line(r) + note)
      if is_ckpt:
        jax.block_until_ready(state)
        with progress.timed("checkpoints"):
          ckpt.save(r, state)
    flush()
    with progress.timed("checkpoints"):
      ckpt.close()  # The last asynchronous save reaches the disk.
  finally:
    if profiling:
      jax.profiler.stop_trace()
    for rep in outputs:
      rep.tb.close()
      rep.wb.close()


def _finish(config, workdir, b, outputs, progress, start, t_start, console, primary) -> dict:
  """summary.json and the report of every member; the results on the console."""
  replicated = b.stacked
  wall = time.perf_counter() - t_start
  seconds = progress.seconds(setup=progress.t0 - t_start)
  summaries, ok = [], []
  for k, rep in enumerate(outputs):
    if not primary:
      continue
    records = rundir.read_records(rep.metrics.path)
    summary = _summary(rep.config, records, rep.info, rep.is_mal, wall, progress.first, start)
    summary["time_sec"] = seconds
    summary["trigger_calibration"] = rep.evaluator.calibration
    if rep.evaluator.references:
      summary["eval_references"] = rep.evaluator.references
    if replicated and b.kind == "replica":
      summary["replica"] = {"index": k, "of": config.num_replicas, "group_workdir": workdir}
    elif replicated:  # A packed sweep point: its own run's summary, and which program it trained in.
      summary["pack"] = {"index": k, "of": len(b.members), "points": [d for _, d in b.members]}
    rep.evaluator.finish()
    with open(os.path.join(rep.workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2, sort_keys=True, default=str)
    try:  # Plots and report.html: a plotting problem must not fail a finished run.
      report.write_run_report(rep.workdir)
      ok.append(True)
    except Exception as e:  # pylint: disable=broad-except
      console.warn(f"the report of {rep.workdir} failed: {e}")
      ok.append(False)
    summaries.append(summary)
  if not primary:
    return {}
  console.done(list(zip(b.labels, summaries, [d for _, d in b.members], ok)), wall)
  if replicated:
    return {"replicas" if b.kind == "replica" else "points": summaries}
  return summaries[0]


def _attack_summary(config, records) -> dict[str, Any]:
  """The attack on the uploads, its window, and the backdoor's durability after a window that ends."""
  a = config.attack
  n_rounds = records[-1]["round"] if records else 0
  rounds = upload_attacks.window_rounds(a.start_round, a.end_round, a.every, n_rounds)
  ua = upload_attacks.from_config(config)
  out = {
    "upload": a.upload,
    "upload_strength": float(ua.strength) if a.upload != "none" else None,
    "start_round": a.start_round,
    "end_round": a.end_round,
    "every": a.every,
    "rounds_attacked": int(len(rounds)) if a.malicious else 0,
  }
  if a.malicious and 0 < a.end_round < n_rounds:
    out["durability_rounds"] = upload_attacks.durability(records, a.end_round)
  return out


def _summary(config, records, info, is_mal, wall, t_compile, start) -> dict[str, Any]:
  final = {}
  for rec in records:  # The last value of every metric (eval metrics only exist on eval rounds).
    final.update({k: v for k, v in rec.items() if not k.startswith("z/")})
  first_flag = detection.first_flagged_round(
    [rec["agg/flagged"] for rec in records], is_mal, [rec["round"] for rec in records]
  )
  n = max(len(records), 1)
  out = {
    "final": final,
    "rounds": records[-1]["round"] if records else 0,
    "resumed_from": start,
    "forked_from": config.init_from or None,
    "malicious": list(config.attack.malicious),
    "first_flag_round": first_flag,
    "detect_tpr_mean": detection.mean_rate(r["eval/detect_tpr"] for r in records),
    "detect_fpr_mean": detection.mean_rate(r["eval/detect_fpr"] for r in records),
    # Over the rounds whose flags can change weights: a benign run's false positives are read here.
    "detection": detection.after_warmup(records, is_mal, int(config.aggregation.kwargs.get("warmup_rounds", 0))),
    "attack": _attack_summary(config, records),
    "data": info,
    "wall_sec": wall,
    "first_round_sec": t_compile,
    "num_records": n,
  }
  # aggregation.name='dp_mean' (client level) and train.dp_sgd (per image of a client) only.
  block = privacy.privacy_summary(config, records, info.get("client_counts", ()))
  if block is not None:
    out["privacy"] = block
  return out
