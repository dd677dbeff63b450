"""The (epsilon, delta) of a run with client-level DP (``dp_mean``) or DP-SGD (``train.dp_sgd``), by ``dp_accounting``.

``aggregation.dp_mean`` releases, every round, the mean of the clients'
updates clipped to L2 norm S plus Gaussian noise of standard deviation z S / C
(DP-FedAvg: McMahan et al., "Learning Differentially Private Recurrent Language
Models", ICLR 2018). Adding or removing one client's data moves the mean by at
most S / C, so each round is the Gaussian mechanism with noise multiplier z
(Dwork & Roth, "The Algorithmic Foundations of Differential Privacy", 2014,
App. A), and a run is its composition over the rounds. The privacy loss is
never computed by hand here: Google's ``dp_accounting`` composes the rounds,
with Rényi DP (Mironov, "Rényi Differential Privacy", CSF 2017; Mironov, Talwar
& Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism", 2019),
an upper bound, or with privacy loss distributions (Koskela et al., AISTATS
2020; Doroshenko et al., "Connect the Dots", PETS 2022), numerically tight.

The unit of privacy is one client (all of its data), the neighbouring relation
add/remove one client, and the guarantee is central: it covers what the server
sends out (the global generators, and so every sample and metric computed from
them), not what the server sees or logs. Only the generators are uploaded in
the paper's setting (Jin & Li, SASHIMI 2022; ``aggregation.average_discriminator
= False``); when the discriminators are averaged too, the same rule noises them
and the accounting counts two Gaussian releases per round (an equivalent single
Gaussian with noise multiplier z / sqrt(2)).

``config.privacy.delta`` (default 1e-5) and ``config.privacy.accountant``
(``'rdp'``, default, or ``'pld'``) set the reported guarantee. By default every
client takes part in every round (sampling probability 1). With
``config.clients_per_round = m`` of C clients, each round's clients are a
uniformly drawn set of exactly m (``federated/sampling.py``), ``dp_mean``
averages over those m slots with noise z S / m, and the rounds are accounted
as the Poisson-sampled Gaussian with q = m / C (``PoissonSampledDpEvent``):
the accounting McMahan et al. (ICLR 2018) give DP-FedAvg, whose clients join
independently with probability q and whose mean has the fixed denominator qC.
Drawing exactly m clients instead is the usual implementation and the usual
approximation (TensorFlow Federated, Opacus with fixed batches); it is not a
proven bound for fixed-size sampling (Lebeda et al., "Avoiding Pitfalls for
Privacy Accounting of Subsampled Mechanisms under Composition", 2024), and
``summary_block`` says so in its ``sampling`` entry.

DP-SGD on the discriminators (``train.dp_sgd``, ``federated.dp_sgd``; Abadi
et al., CCS 2016) protects one real image of a client instead (add/remove one
image of that client's data set; the guarantee is per client, and an image
that several clients hold, as with ``data.partition='full'``, composes theirs).
Every D step of client c is the Gaussian mechanism with noise multiplier
sigma on a batch of B of its n_c images, accounted as Poisson subsampling with
probability q = B / n_c (``PoissonSampledDpEvent``), composed over the run's
D steps (rounds x ``train.local_steps``, or rounds x n_c // B with one local
epoch). The program does not sample by Poisson: it draws B distinct images
uniformly at random each step (or, with one local epoch, a shuffle). Reading
such fixed-size batches as Poisson sampling at q = B / n is the standard
approximation of DP-SGD implementations (Abadi et al. 2016 and most code since),
not a proof: for shuffled batches it can understate epsilon (Chua et al., "How
Private are DP-SGD Implementations?", ICML 2024). A bound that holds for the
program's uniform fixed-size batches is the accounting of sampling without
replacement under replace-one neighbouring (Wang, Balle & Kasiviswanathan,
AISTATS 2019; ``dp_accounting.SampledWithoutReplacementDpEvent``): at
q = 32 / 1000, sigma = 1, 500 steps, delta = 1e-5 it reads 9.3 where the
Poisson add/remove accounting reads 5.1.
Everything a client sends (its generator, which learns only through its D,
and its D when averaged) is post-processing of its private D; the losses it
reports (``client_stats``) and the logged clipped fractions are not covered.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

# The accountants of ``client_level_epsilon`` (config.privacy.accountant; config_lib keeps a copy, a test checks).
ACCOUNTANTS = ("rdp", "pld")
RULE = "dp_mean"  # The aggregation rule whose runs get a privacy block.


def _is_real(v: Any) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(v)


def _epsilon(who: str, noise_multiplier, rounds, delta, sampling_prob, accountant, releases_per_round) -> float:
  """The checked arguments' epsilon (``client_level_epsilon``'s body); errors name ``who``."""

  def check(name, value, ok, accepted):
    if not ok:
      raise ValueError(f"{who}: {name}={value!r} is invalid: {accepted}.")

  check(
    "noise_multiplier",
    noise_multiplier,
    _is_real(noise_multiplier) and 0 <= noise_multiplier < math.inf,
    "must be a finite number >= 0",
  )
  steps = "rounds" if who == "client_level_epsilon" else "steps"
  check(
    steps,
    rounds,
    isinstance(rounds, numbers.Integral) and not isinstance(rounds, bool) and rounds >= 0,
    "must be an integer >= 0",
  )
  check("delta", delta, _is_real(delta) and 0 < delta < 1, "must be in (0, 1)")
  check("sampling_prob", sampling_prob, _is_real(sampling_prob) and 0 < sampling_prob <= 1, "must be in (0, 1]")
  check("accountant", accountant, accountant in ACCOUNTANTS, f"accepted values are {list(ACCOUNTANTS)}")
  check(
    "releases_per_round",
    releases_per_round,
    isinstance(releases_per_round, numbers.Integral)
    and not isinstance(releases_per_round, bool)
    and releases_per_round >= 1,
    "must be an integer >= 1",
  )
  if rounds == 0:
    return 0.0
  if noise_multiplier == 0:
    return math.inf
  import dp_accounting  # Here: it imports scipy.stats (most of a second), which only this needs.

  event = dp_accounting.GaussianDpEvent(float(noise_multiplier) / math.sqrt(int(releases_per_round)))
  if sampling_prob < 1:
    event = dp_accounting.PoissonSampledDpEvent(float(sampling_prob), event)
  event = dp_accounting.SelfComposedDpEvent(event, int(rounds))
  acc = dp_accounting.rdp.RdpAccountant() if accountant == "rdp" else dp_accounting.pld.PLDAccountant()
  acc.compose(event)
  return float(acc.get_epsilon(float(delta)))


def client_level_epsilon(
  noise_multiplier: float,
  rounds: int,
  delta: float,
  sampling_prob: float = 1.0,
  accountant: str = "rdp",
  releases_per_round: int = 1,
) -> float:
  """The epsilon of ``rounds`` rounds of DP-FedAvg at this delta, by ``dp_accounting``.

  Each round is ``dp_accounting.GaussianDpEvent(noise_multiplier)`` (in units of
  the L2 sensitivity, so the clip norm drops out), wrapped in a
  ``PoissonSampledDpEvent`` when clients take part with probability
  ``sampling_prob < 1``, composed ``rounds`` times (``SelfComposedDpEvent``),
  then converted to (epsilon, delta) by ``RdpAccountant`` or ``PLDAccountant``,
  both with add/remove-one neighbouring.

  Args:
    noise_multiplier: z >= 0, the noise's standard deviation over the sensitivity.
    rounds: rounds released (>= 0).
    delta: in (0, 1).
    sampling_prob: each client's probability of taking part in a round, in (0, 1].
    accountant: ``'rdp'`` (Rényi DP, an upper bound) or ``'pld'`` (privacy loss
      distributions, tight up to discretization; slower for large epsilon).
    releases_per_round: Gaussian releases of each client's data per round with
      the same participation (2 when generators and discriminators are both
      noised): one Gaussian with noise multiplier ``z / sqrt(k)``, which is the
      exact composition of k Gaussians of multiplier z.

  Returns:
    epsilon: 0.0 for 0 rounds, ``inf`` when ``noise_multiplier == 0``.

  Raises:
    ValueError: an argument out of its range, naming it.
  """
  return _epsilon(
    "client_level_epsilon", noise_multiplier, rounds, delta, sampling_prob, accountant, releases_per_round
  )


def example_level_epsilon(
  noise_multiplier: float, steps: int, sampling_prob: float, delta: float, accountant: str = "rdp"
) -> float:
  """The epsilon of ``steps`` DP-SGD steps at this delta (one example, add/remove), by ``dp_accounting``.

  Each step is ``PoissonSampledDpEvent(sampling_prob, GaussianDpEvent(noise_multiplier))``
  (a plain Gaussian at ``sampling_prob = 1``), composed ``steps`` times, then
  ``RdpAccountant`` or ``PLDAccountant`` (see the module docstring for the
  Poisson approximation of fixed-size batches).

  Args:
    noise_multiplier: sigma >= 0, the noise's standard deviation over the clip norm.
    steps: DP-SGD steps (>= 0).
    sampling_prob: q = batch size / data set size, in (0, 1].
    delta: in (0, 1).
    accountant: ``'rdp'`` or ``'pld'``.

  Returns:
    epsilon: 0.0 for 0 steps, ``inf`` when ``noise_multiplier == 0``.

  Raises:
    ValueError: an argument out of its range, naming it.
  """
  return _epsilon("example_level_epsilon", noise_multiplier, steps, delta, sampling_prob, accountant, 1)


def unit(average_discriminator: bool) -> str:
  """What the guarantee covers: ``'client-level, generator uploads'`` (or generator and discriminator)."""
  return (
    "client-level, generator and discriminator uploads" if average_discriminator else "client-level, generator uploads"
  )


def summary_block(config, records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
  """``summary.json``'s ``privacy`` block for the rounds in ``records``, or None when the rule is not ``dp_mean``.

  The rounds are those the run has done (``records[-1]['round']``), resumed
  parts included. Each round's record holds the noise multiplier it was
  aggregated with (``agg/noise_multiplier``), so a run resumed with other
  settings (the checkpoints allow any stateless rule) is still accounted
  soundly: if some round was aggregated by another rule the epsilon is
  infinite, if some round used a smaller noise multiplier every round is
  accounted with the smallest one (an upper bound), and if the discriminators
  were noised in some round (``agg_d/noise_multiplier``) every round counts
  two releases; ``note`` then says so.

  Args:
    config: the run's validated config (``aggregation.*``, ``privacy.*``).
    records: the run's ``metrics.jsonl`` records, in round order.

  Returns:
    ``{epsilon, delta, noise_multiplier, clip_norm, rounds, accountant, unit}`` (and ``note`` where the
    records disagree with the config; ``sampling_prob`` and ``sampling`` when clients are sampled per
    round: ``config.clients_per_round``, read back from each round's ``agg/sampled``).
  """
  if config.aggregation.name != RULE:
    return None
  kwargs = config.aggregation.kwargs
  z = float(kwargs["noise_multiplier"])
  rounds = int(records[-1]["round"]) if records else 0
  both = bool(config.aggregation.average_discriminator) or any("agg_d/noise_multiplier" in r for r in records)
  seen = [r.get("agg/noise_multiplier") for r in records]
  note = None
  if any(v is None for v in seen) or len(seen) < rounds:
    missing = sum(v is None for v in seen) + rounds - len(seen)
    z, note = 0.0, f"{missing} of the {rounds} rounds were not aggregated by dp_mean (a resumed run): no guarantee"
  elif seen and min(seen) < z * (1 - 1e-6):  # The records hold float32: a relative 1e-6 is their rounding.
    z = float(min(seen))
    note = f"rounds ran with a smaller noise multiplier (a resumed run): every round accounted with {z:.6g}"
  q, sampling_note = _sampling_prob(config, records)
  if sampling_note:
    note = f"{note}; {sampling_note}" if note else sampling_note
  eps = client_level_epsilon(
    z,
    rounds,
    float(config.privacy.delta),
    sampling_prob=q,
    accountant=config.privacy.accountant,
    releases_per_round=2 if both else 1,
  )
  block = {
    "epsilon": eps,
    "delta": float(config.privacy.delta),
    "noise_multiplier": z,
    "clip_norm": float(kwargs["clip_norm"]),
    "rounds": rounds,
    "accountant": config.privacy.accountant,
    "unit": unit(both),
  }
  if q < 1:
    block["sampling_prob"] = q
    block["sampling"] = (
      f"every round draws exactly {round(q * config.num_clients)} of the {config.num_clients} clients without "
      f"replacement, accounted as Poisson sampling with q = {q:.4g}: the usual approximation, not a proven bound"
    )
  if note:
    block["note"] = note
  return block


def _sampling_prob(config, records: Sequence[dict[str, Any]]) -> tuple[float, str | None]:
  """The clients' per-round participation q of the rounds in ``records``, and a note when it varied.

  A round's q is its share of sampled clients (``agg/sampled``; 1 for a round
  without it: every client took part). Every round is accounted with the
  largest q of the run (an upper bound when a resumed run changed
  ``clients_per_round``); with no records, the config's ``m / C``.
  """
  m, c = config.clients_per_round or 0, config.num_clients
  configured = m / c if 0 < m < c else 1.0
  if not records:
    return configured, None
  shares = [sum(map(bool, r["agg/sampled"])) / len(r["agg/sampled"]) if "agg/sampled" in r else 1.0 for r in records]
  q = max(shares)
  if min(shares) != q:
    return q, f"rounds sampled different shares of the clients (a resumed run): every round accounted with q = {q:.4g}"
  return q, None


def epsilon_text(eps: float) -> str:
  """``4.728`` (4 significant digits), ``∞`` when infinite."""
  return "∞" if not math.isfinite(eps) else f"{eps:.4g}"


def guarantee_text(block: dict[str, Any]) -> str:
  """``(ε = 4.73, δ = 1e-05)-DP at the client level for the generator uploads over 200 rounds``."""
  what = "generator and discriminator uploads" if "discriminator" in str(block.get("unit", "")) else "generator uploads"
  text = (
    f"(ε = {epsilon_text(float(block['epsilon']))}, δ = {float(block['delta']):.3g})-DP at the client level "
    f"for the {what} over {block['rounds']} round{'' if block['rounds'] == 1 else 's'}"
  )
  if block.get("sampling_prob"):
    text += f", clients sampled with q = {float(block['sampling_prob']):.4g} a round"
  if block.get("note"):
    text += f" ({block['note']})"
  elif not math.isfinite(float(block["epsilon"])) and block["rounds"]:
    text += " (noise_multiplier = 0: no privacy)"
  return text


DP_SGD_UNIT = "one real image of a client (add/remove), its discriminator's DP-SGD"
DP_SGD_SAMPLING = "poisson at q = batch_size / images (the standard approximation of fixed-size batches)"


def _uniform_text(values: Sequence[float]) -> str:
  """``ε = 3.2 at every client`` or ``ε = 3.2 to 4.1 over the clients``."""
  lo, hi = min(values), max(values)
  if epsilon_text(lo) == epsilon_text(hi):
    return f"ε = {epsilon_text(lo)} at every client"
  return f"ε = {epsilon_text(lo)} to {epsilon_text(hi)} over the clients"


def dp_sgd_block(config, records: Sequence[dict[str, Any]], counts: Sequence[int]) -> dict[str, Any] | None:
  """``summary.json``'s ``privacy.dp_sgd``: each client's per-image (epsilon, delta), or None without DP-SGD.

  Client c's D steps are ``rounds * train.local_steps`` (one local epoch:
  ``rounds * (n_c // batch_size)``), each sampled at ``q_c = batch_size / n_c``
  (module docstring). Each round's record holds the noise multiplier it ran
  with (``train/dp_noise_multiplier``): a round without it (a resumed or
  forked run whose earlier rounds ran without DP-SGD) makes every epsilon
  infinite, and a smaller one is used for every round (an upper bound);
  ``note`` says so. A resumed run with another batch size or number of local
  steps is accounted with this config's.

  Args:
    config: the run's validated config (``train.*``, ``privacy.*``).
    records: the run's ``metrics.jsonl`` records, in round order.
    counts: real images per client (``summary.json``'s ``data.client_counts``).

  Returns:
    ``{epsilon: [C], delta, noise_multiplier, clip_norm, sampling_prob: [C], steps: [C], rounds, accountant,
    sampling, unit}`` (and ``note``).
  """
  dp = config.train.dp_sgd
  if not dp.enabled:
    return None
  B, L = int(config.train.batch_size), int(config.train.local_steps)
  counts = [int(n) for n in counts]
  rounds = int(records[-1]["round"]) if records else 0
  z = float(dp.noise_multiplier)
  seen = [r.get("train/dp_noise_multiplier") for r in records]
  notes = []
  if any(v is None for v in seen) or len(seen) < rounds:
    missing = sum(v is None for v in seen) + rounds - len(seen)
    z = 0.0
    notes.append(f"{missing} of the {rounds} rounds ran without DP-SGD (a resumed or forked run): no guarantee")
  elif seen and min(seen) < z * (1 - 1e-6):  # float32 records: a relative 1e-6 is their rounding.
    z = float(min(seen))
    notes.append(f"rounds ran with a smaller noise multiplier (a resumed run): every round accounted with {z:.6g}")
  delta = float(config.privacy.delta)
  if counts and delta >= 1 / min(counts):
    notes.append(f"delta={delta:g} is not below 1 / the smallest client's {min(counts)} images: a weak guarantee")
  q = [min(1.0, B / max(n, 1)) for n in counts]
  steps = [rounds * (L or n // B) for n in counts]
  cache: dict[tuple[float, int], float] = {}  # Clients of equal size share one accounting.
  for qc, sc in zip(q, steps):
    if (qc, sc) not in cache:
      cache[(qc, sc)] = example_level_epsilon(z, sc, qc, delta, config.privacy.accountant)
  block = {
    "epsilon": [cache[(qc, sc)] for qc, sc in zip(q, steps)],
    "delta": delta,
    "noise_multiplier": z,
    "clip_norm": float(dp.clip_norm),
    "sampling_prob": q,
    "steps": steps,
    "rounds": rounds,
    "accountant": config.privacy.accountant,
    "sampling": DP_SGD_SAMPLING,
    "unit": DP_SGD_UNIT,
  }
  if notes:
    block["note"] = "; ".join(notes)
  return block


def privacy_summary(config, records: Sequence[dict[str, Any]], counts: Sequence[int]) -> dict[str, Any] | None:
  """``summary.json``'s ``privacy``: ``summary_block``'s fields (``dp_mean``), ``dp_sgd`` (DP-SGD); None if neither."""
  block = summary_block(config, records)
  sgd = dp_sgd_block(config, records, counts)
  if sgd is not None:
    block = {**(block or {}), "dp_sgd": sgd}
  return block


def dp_sgd_text(block: dict[str, Any]) -> str:
  """``(ε = 3.2 at every client, δ = 1e-05)-DP per real image of a client, for its discriminator's 400 ...``."""
  steps = sorted(set(int(s) for s in block["steps"]))
  steps_text = str(steps[0]) if len(steps) == 1 else f"{steps[0]} to {steps[-1]}"
  text = (
    f"({_uniform_text([float(e) for e in block['epsilon']])}, δ = {float(block['delta']):.3g})-DP per real image "
    f"of a client, for its discriminator's {steps_text} DP-SGD steps (Poisson-sampling approximation)"
  )
  if block.get("note"):
    text += f" ({block['note']})"
  elif float(block["noise_multiplier"]) == 0 and block["rounds"]:
    text += " (noise_multiplier = 0: no privacy)"
  return text


def summary_lines(block: dict[str, Any]) -> list[str]:
  """The console's privacy lines of ``summary.json``'s ``privacy`` block: the client-level one, the DP-SGD one."""
  lines = [guarantee_text(block)] if "epsilon" in block else []
  if block.get("dp_sgd"):
    lines.append(dp_sgd_text(block["dp_sgd"]))
  return lines
