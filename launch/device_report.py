"""The report of a device check: one markdown table per group of steps, then the issue's targets.

``launch.device_check`` runs the steps; this renders what they measured
(``device_check.md``) from the records it wrote (``device_check.jsonl``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, NamedTuple


class Sizes(NamedTuple):
  """The check's sizes: the main comparison's C, the large-image step's R and C, the scaling Cs."""

  c_main: int
  r_big: int
  c_big: int
  c_scale: tuple[int, ...]


FULL = Sizes(64, 256, 16, (4, 16, 64, 256))
TINY = Sizes(2, 32, 2, (2, 4))


def _fmt(x: Any, nd: int = 3) -> str:
  if x is None:
    return "-"
  if isinstance(x, float):
    return f"{x:.{nd}g}" if abs(x) < 1000 else f"{x:.0f}"
  return str(x)


def _pct(x: float | None) -> str:
  return "-" if x is None else f"{100 * x:.1f} %"


def _ops(r: dict[str, Any]) -> str:
  h = r.get("hlo_ops") or {}
  return "/".join(
    str(h.get(k, "-")) for k in ("convolution", "grouped_convolution", "lhs_dilated_convolution", "dot_general")
  )


def report(records: Sequence[dict[str, Any]], info: dict[str, Any], budget: float, tiny: bool) -> str:
  """The markdown report of a check: one table per group, then the targets."""
  by_name = {r["step"]: r for r in records}
  lines = [
    f"# Device check ({'tiny, ' if tiny else ''}{time.strftime('%Y-%m-%d')})",
    "",
    f"Device: {info.get('device_kind')} x{info.get('count')} ({info.get('platform')}), "
    f"jax {info.get('jax')}; budget {budget:.0f} s, used {sum(r['seconds'] for r in records):.0f} s.",
    "`python -m launch.device_check` wrote this; each row's command is in device_check.jsonl.",
    "",
  ]
  groups: dict[str, list[dict[str, Any]]] = {}
  for r in records:
    groups.setdefault(r["group"], []).append(r)
  peer_spr = {}
  for r in records:
    if r["step"].endswith("_peer_f32") and r["status"] == "ok":
      peer_spr[r["group"]] = r["result"]["sec_per_round"]
  for group, recs in groups.items():
    lines += [f"## {group}", ""]
    if recs[0]["step"] == "packed_sweep":
      lines += [
        "| step | status | points x rounds | packed points/h | one by one points/h | packed / one by one | "
        "packed training TFLOP/s | of peak | load (1 min) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
      ]
      for r in recs:
        x = r["result"] or {}
        pk, one = x.get("packed") or {}, x.get("single") or {}
        load = [v for arm in (pk, one) for pair in arm.get("load", []) for v in pair]
        lines.append(
          f"| {r['step']} | {r['status']} | {_fmt(x.get('points'))} x {_fmt(x.get('rounds'))} | "
          f"{_fmt(pk.get('points_per_hour'))} | {_fmt(one.get('points_per_hour'))} | {_fmt(x.get('packed_speedup'))} | "
          f"{_fmt(pk.get('achieved_tflops'))} | {_pct(pk.get('fraction_of_peak'))} | "
          f"{_fmt(max(load)) if load else '-'} |"
        )
    elif recs[0]["group"] == "the main job":
      lines += [
        "| step | status | wall s (process) | first round s (incl. compile) | rounds | "
        "setup s | training s | evaluation s | checkpoints s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
      ]
      for r in recs:
        x = r["result"] or {}
        t = x.get("time_sec") or {}
        lines.append(
          f"| {r['step']} | {r['status']} | {_fmt(x.get('wall_sec_process'))} | "
          f"{_fmt(x.get('first_round_sec'))} | {_fmt(x.get('rounds'))} | "
          + " | ".join(_fmt(t.get(k)) for k in ("setup", "training", "evaluation", "checkpoints"))
          + " |"
        )
    else:
      lines += [
        "| step | status | lowering | precision | vmap s/round | loop s/round | vmap / loop | "
        "peer / vmap | TFLOP/s | of peak | compile s | convs / grouped / lhs-dilated / dots |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
      ]
      for r in recs:
        x = r["result"] or {}
        if r["step"].endswith("_peer_f32"):
          lines.append(
            f"| {r['step']} | {r['status']} | PyTorch | f32 | - | {_fmt(x.get('sec_per_round'))} "
            f"(sequential) | - | 1 | - | - | - | - |"
          )
          continue
        loop = x.get("loop") or {}
        peer = peer_spr.get(group)
        vs_peer = peer / x["sec_per_round"] if peer and x.get("sec_per_round") else None
        compile_s = _fmt(x.get("compile_sec")) + (f" / {_fmt(loop.get('compile_sec'))}" if loop else "")
        lines.append(
          f"| {r['step']} | {r['status']} | {x.get('conv_impl_resolved', '-')} | {x.get('precision', '-')} | "
          f"{_fmt(x.get('sec_per_round'), 4)} | {_fmt(loop.get('sec_per_round'), 4)} | "
          f"{_fmt(x.get('vmap_speedup'))} | {_fmt(vs_peer)} | {_fmt(x.get('achieved_tflops'))} | "
          f"{_pct(x.get('fraction_of_peak'))} | {compile_s} | {_ops(x) if x else '-'} |"
        )
    lines.append("")
  lines += ["## Targets", ""] + _targets(by_name, TINY if tiny else FULL)
  bad = [r for r in records if r["status"] in ("error", "timeout")]
  if bad:
    lines += ["", "## Failures", ""]
    for r in bad:
      lines += [f"* `{r['step']}` ({r['status']}): `{r['command']}`", "", "```", r["detail"], "```", ""]
  return "\n".join(lines) + "\n"


def _targets(by_name: dict[str, dict[str, Any]], sizes: Sizes) -> list[str]:
  """The issue's targets, each with its measured value and met / NOT met / not measured."""

  def res(name):
    r = by_name.get(name)
    return r["result"] if r and r["status"] == "ok" else None

  c = sizes.c_main
  out = []

  def line(text, value, ok):
    verdict = "not measured" if value is None else ("met" if ok else "NOT met")
    out.append(f"* {text}: {value if value is not None else '-'} ({verdict})")

  for precision in ("f32", "bf16"):
    runs = [r for r in (res(f"c{c}_{i}_{precision}") for i in ("gemm", "xla", "fast_cpu")) if r]
    best = min(runs, key=lambda x: x["sec_per_round"], default=None)
    sp = best["vmap_speedup"] if best else None
    line(
      f"C = {c}, {precision}: the fastest vmapped round >= 3x our loop in the same precision",
      None if sp is None else f"{sp:.2f}x ({best['conv_impl_resolved']})",
      sp is not None and sp >= 3,
    )
    if precision == "f32":
      peer = res(f"c{c}_peer_f32")
      ratio = peer["sec_per_round"] / best["sec_per_round"] if best and peer else None
      line(
        f"C = {c}, f32: the vmapped round >= 20x the PyTorch peer",
        None if ratio is None else f"{ratio:.1f}x",
        ratio is not None and ratio >= 20,
      )
    else:
      f = best.get("fraction_of_peak") if best else None
      line(
        f"C = {c}, bf16: >= 25 % of the dense bf16 peak", None if f is None else _pct(f), f is not None and f >= 0.25
      )
  big, peer = res(f"r{sizes.r_big}_auto_bf16"), res(f"r{sizes.r_big}_peer_f32")
  tag = f"{sizes.r_big} px, C = {sizes.c_big}"
  line(
    f"{tag}, bf16: compiles in < 60 s",
    None if big is None else f"{big['compile_sec']:.0f} s",
    big is not None and big["compile_sec"] < 60,
  )
  f = big.get("fraction_of_peak") if big else None
  line(f"{tag}, bf16: >= 30 % of the dense bf16 peak", None if f is None else _pct(f), f is not None and f >= 0.3)
  ratio = peer["sec_per_round"] / big["sec_per_round"] if big and peer else None
  line(
    f"{tag}: >= 4x the PyTorch peer (f32)", None if ratio is None else f"{ratio:.1f}x", ratio is not None and ratio >= 4
  )
  pts = [(n, r["client_steps_per_sec"]) for n, r in ((n, res(f"scale_c{n}")) for n in sizes.c_scale) if r]
  grows = len(pts) > 1 and all(b[1] > a[1] for a, b in zip(pts, pts[1:]))
  line("throughput (client steps/s) grows with C", ", ".join(f"C={n}: {v:.0f}" for n, v in pts) or None, grows)
  main = res("main_default")
  line(
    "the default main job <= 30 s wall",
    None if main is None else f"{main['wall_sec_process']:.0f} s",
    main is not None and main["wall_sec_process"] <= 30,
  )
  return out
