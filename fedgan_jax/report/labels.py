"""Human names for metric keys and compact value formatting, shared by every page and figure.

Metric names are honest: only ``eval/fid@inception_v3`` is called "FID" (and
``kid@inception_v3`` "KID"); Fréchet/kernel distances in other feature spaces
are "FD (<extractor> features)" / "KD (<extractor> features)".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

# Fixed names, looked up by the key without its "eval/" prefix first, then by the full key.
_FIXED = {
  "swd": "SWD ×1e3 (Laplacian-pyramid patches)",
  "implant_amplitude": "implant (trigger amplitude, generated − clean)",
  "implant_above_p99": "fraction of samples above the clean 99th percentile",
  "diversity": "diversity (1 = as diverse as real images)",
  "mia_auc": "membership inference AUC (GAN-Leaks; 0.5 = no leak)",
  "tstr_acc": "TSTR accuracy (train synthetic, test real)",
  "tstr_bacc": "TSTR balanced accuracy",
  "tstr_auc": "TSTR ROC AUC",
  "trtr_acc": "TRTR accuracy (train real, test real)",
  "trtr_bacc": "TRTR balanced accuracy",
  "trtr_auc": "TRTR ROC AUC",
  "trigger_transfer": "trigger transfer (TSTR predictions changed by the trigger)",
  "trigger_transfer_real": "trigger transfer floor (TRTR classifier)",
  "trigger_target_rate": "trigger attack success rate (TSTR, BadNets)",
  "trigger_target_rate_real": "trigger attack success rate floor (TRTR classifier)",
  "detect_tpr": "detection TPR",
  "detect_fpr": "detection FPR",
  "detect_tpr_mean": "detection TPR (mean over rounds)",
  "detect_fpr_mean": "detection FPR (mean over rounds)",
  "first_flag_round": "first flag round (earliest attacker)",
  "nonfinite_samples": "non-finite samples",
  # train/g_loss is what each client's optimizer saw; train/reported_* is what the server was told
  # (a `mimic` attacker reports the honest median instead of its own loss).
  "train/g_loss": "true G loss (mean over local steps)",
  "train/d_loss": "true D loss (mean over local steps)",
  "train/g_loss_last": "true G loss (last local step)",
  "train/d_loss_last": "true D loss (last local step)",
  "train/reported_g_loss": "G loss reported to the server",
  "train/reported_d_loss": "D loss reported to the server",
  "train/update_norm": "G update norm ‖Δθ‖",
  "agg/weights": "aggregation weight",
}


def metric_label(key: str) -> str:
  """A human, honest name for a metric key.

  Args:
    key: A ``metrics.jsonl``/``summary.json`` key, e.g. ``eval/fid@effnet_lite0``.

  Returns:
    E.g. ``"FID"`` for ``eval/fid@inception_v3``, ``"FD (effnet_lite0 features)"``
    for ``eval/fid@effnet_lite0``, ``"SWD ×1e3 (Laplacian-pyramid patches)"``;
    the key itself when it has no name.
  """
  name = key[len("eval/") :] if key.startswith("eval/") else key
  base, _, ext = name.partition("@")
  if base == "fid":
    return "FID" if ext == "inception_v3" else f"FD ({ext} features)"
  if base == "kid":
    return "KID" if ext == "inception_v3" else f"KD ({ext} features)"
  if base in ("precision", "recall") and ext:
    return f"{base} ({ext} features)"
  return _FIXED.get(name, _FIXED.get(key, key))


def format_value(v: Any) -> str:
  """Compact formatting for table cells.

  Args:
    v: A number, bool, None, string, or a list/tuple of those.

  Returns:
    ``"n/a"`` for None and non-finite floats, 4 significant digits (scientific
    notation outside [1e-3, 1e4)), lists as ``"[a, b]"``.
  """
  if v is None:
    return "n/a"
  if isinstance(v, (bool, int)):
    return str(v)
  if isinstance(v, float):
    if not math.isfinite(v):
      return "n/a"
    if v == 0:
      return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
      return f"{v:.3e}"
    return f"{v:.4g}"
  if isinstance(v, (list, tuple)):
    return "[" + ", ".join(format_value(x) for x in v) + "]"
  return str(v)


def clients_phrase(clients: Sequence[int], none: str = "none") -> str:
  """Client indices as words, so that a list of indices never reads as a count.

  Args:
    clients: Client indices, e.g. ``[0, 2]``.
    none: What an empty list reads as.

  Returns:
    ``"client 0"``, ``"clients 0, 2"``, or ``none``.
  """
  if not clients:
    return none
  return ("client " if len(clients) == 1 else "clients ") + ", ".join(str(c) for c in clients)
