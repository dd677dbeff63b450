"""The machine a measurement ran on, and its dense peak throughput (for ``fraction_of_peak``)."""

from __future__ import annotations

import os
import platform
from typing import Any

import jax


def device_info() -> dict[str, Any]:
  """The accelerator (or CPU model) the benchmark ran on."""
  d = jax.devices()
  info: dict[str, Any] = {
    "platform": d[0].platform,
    "kind": d[0].device_kind,
    "count": len(d),
    "processes": jax.process_count(),
  }
  if d[0].platform == "cpu":
    model = platform.processor() or ""
    try:
      with open("/proc/cpuinfo") as f:
        for line in f:
          if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    except OSError:
      pass
    info["cpu_model"] = model
    info["cpu_cores"] = os.cpu_count()
  return info


# Dense (no sparsity) peak TFLOP/s per device from the vendors' data sheets: (device_kind substring,
# {precision: (TFLOP/s, basis)}). f32 on NVIDIA GPUs is TF32 tensor-core math: XLA's default precision
# for f32 convolutions and matmuls there (``jax_default_matmul_precision`` unset).
_PEAKS: tuple[tuple[str, dict[str, tuple[float, str]]], ...] = (
  ("H100 PCIe", {"bf16": (756.0, "H100 PCIe dense BF16"), "f32": (378.0, "H100 PCIe dense TF32")}),
  ("H100", {"bf16": (989.4, "H100 SXM dense BF16"), "f32": (494.7, "H100 SXM dense TF32")}),
  ("H200", {"bf16": (989.4, "H200 dense BF16"), "f32": (494.7, "H200 dense TF32")}),
  ("A100", {"bf16": (312.0, "A100 dense BF16"), "f32": (156.0, "A100 dense TF32")}),
  ("TPU v4", {"bf16": (275.0, "TPU v4 BF16"), "f32": (275.0, "TPU v4 BF16 (f32 matmuls run as bf16 passes)")}),
  ("TPU v5 lite", {"bf16": (197.0, "TPU v5e BF16"), "f32": (197.0, "TPU v5e BF16 (f32 as bf16 passes)")}),
  ("TPU v5", {"bf16": (459.0, "TPU v5p BF16"), "f32": (459.0, "TPU v5p BF16 (f32 as bf16 passes)")}),
  ("TPU v6", {"bf16": (918.0, "TPU v6e BF16"), "f32": (918.0, "TPU v6e BF16 (f32 as bf16 passes)")}),
)


def peak_tflops(device_kind: str, precision: str) -> tuple[float | None, str | None]:
  """Dense peak TFLOP/s of ONE device of ``device_kind`` at ``precision`` (``None`` if unknown, e.g. CPUs).

  Returns:
    ``(tflops, basis)``: the number and which data-sheet figure it is.
  """
  for key, table in _PEAKS:
    if key.lower() in device_kind.lower():
      return table.get(precision, (None, None))
  return None, None


def peak_fields(precision: str, achieved: float | None) -> dict[str, Any]:
  """``peak_tflops`` (all devices), its ``peak_basis`` and ``fraction_of_peak`` (``None`` when unknown)."""
  devices = jax.devices()
  one, basis = peak_tflops(devices[0].device_kind, precision)
  peak = one * len(devices) if one else None
  return {
    "peak_tflops": peak,
    "peak_basis": basis,
    "fraction_of_peak": round(achieved / peak, 4) if peak and achieved else None,
  }
