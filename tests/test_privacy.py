"""Client-level DP: ``dp_mean`` against numpy (clipping, fixed denominator, noise statistics, NaN/Inf), the
accountant against the analytic Gaussian mechanism (Balle & Wang, ICML 2018) solved here with scipy, the
config's checks, the summary/console/report block, and one end-to-end run."""

from __future__ import annotations

import io
import json
import math
import os
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.stats

from conftest import ROOT, assert_config_error, tiny_config
from fedgan_jax import aggregation, config_lib, privacy, run_console
from fedgan_jax.report import run_report

C = 5


def _global(rng):
  return {
    "params": {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)},
    "batch_stats": {"mean": rng.normal(size=(2,)).astype(np.float32)},
  }


def _clients(rng, g, scale):
  return jax.tree.map(lambda x: (x[None] + scale * rng.normal(size=(C,) + x.shape)).astype(np.float32), g)


def _flat(tree):
  return np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in jax.tree.leaves(tree)])


def _flat_clients(tree):
  return np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in jax.tree.leaves(tree)], axis=1)


def _aggregate(g, cp, num_examples, clip_norm, noise_multiplier, key=0):
  agg = aggregation.get("dp_mean", clip_norm=clip_norm, noise_multiplier=noise_multiplier, num_clients=C)
  stats = {"num_examples": np.asarray(num_examples, np.float32)}
  return jax.jit(agg.aggregate)(agg.init(g), g, cp, stats, jax.random.key(key))


def _reference(g, cp, valid, clip_norm):
  """DP-FedAvg's noise-free server step in numpy (float64)."""
  u = _flat_clients(cp) - _flat(g)
  norms = np.linalg.norm(u, axis=1)
  clipped = u * np.minimum(1.0, clip_norm / norms)[:, None]
  return _flat(g) + np.where(valid[:, None], clipped, 0.0).sum(0) / C, norms


# ---------------------------------------------------------------- the aggregate


def test_dp_mean_without_noise_matches_numpy():
  rng = np.random.default_rng(0)
  g = _global(rng)
  cp = _clients(rng, g, scale=0.5)  # Update norms 1.7 to 2.4: some clipped at 2.1, some not.
  counts = rng.integers(1, 50, size=C)  # Ignored: the weights are 1/C.
  out, _, diag = _aggregate(g, cp, counts, clip_norm=2.1, noise_multiplier=0.0)
  expect, norms = _reference(g, cp, np.ones(C, bool), 2.1)
  assert 0 < (norms > 2.1).sum() < C
  np.testing.assert_allclose(_flat(out), expect, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(diag["update_norm"], norms, rtol=1e-5)
  np.testing.assert_array_equal(diag["clipped"], norms > 2.1)
  np.testing.assert_allclose(diag["weights"], np.full(C, 1 / C), rtol=1e-6)
  assert float(diag["noise_std"]) == 0.0 and not np.any(diag["flagged"]) and not np.any(diag["nonfinite"])
  assert jax.tree.structure(out) == jax.tree.structure(g)
  assert all(o.dtype == x.dtype and o.shape == x.shape for o, x in zip(jax.tree.leaves(out), jax.tree.leaves(g)))


def test_clipping_on_a_hand_checkable_input():
  g = {"w": jnp.zeros(2)}
  cp = {"w": jnp.array([[3.0, 4.0], [0.0, 0.5], [0.0, 0.0], [-6.0, 8.0], [1.0, 0.0]])}
  agg = aggregation.dp_mean(clip_norm=1.0, noise_multiplier=0.0)
  out, _, diag = agg.aggregate(agg.init(g), g, cp, {"num_examples": jnp.ones(C)}, jax.random.key(0))
  # (3, 4) -> (0.6, 0.8); (0, 0.5) kept; (-6, 8) -> (-0.6, 0.8); (1, 0) on the bound: kept. Sum / 5.
  np.testing.assert_allclose(
    out["w"], np.array([0.6 + 0.0 + 0.0 - 0.6 + 1.0, 0.8 + 0.5 + 0.0 + 0.8 + 0.0]) / 5, atol=1e-6
  )
  np.testing.assert_array_equal(diag["clipped"], [True, False, False, True, False])
  np.testing.assert_allclose(diag["update_norm"], [5.0, 0.5, 0.0, 10.0, 1.0], rtol=1e-7)


def test_excluded_clients_add_a_zero_update_and_nan_inf_never_leak():
  rng = np.random.default_rng(1)
  g = _global(rng)
  cp = _clients(rng, g, scale=0.3)
  cp["params"]["w"] = np.array(cp["params"]["w"])
  cp["params"]["w"][1, 0, 0] = np.nan
  cp["params"]["b"] = np.array(cp["params"]["b"])
  cp["params"]["b"][3, 2] = np.inf
  counts = np.array([10, 10, 0, 10, 10])  # Client 2 has no data; 1 and 3 upload NaN / Inf.
  valid = np.array([True, False, False, False, True])
  out, _, diag = _aggregate(g, cp, counts, clip_norm=1.0, noise_multiplier=0.0)
  expect, _ = _reference(g, jax.tree.map(lambda x: np.where(np.isfinite(x), x, 0.0), cp), valid, 1.0)
  np.testing.assert_allclose(_flat(out), expect, rtol=1e-5, atol=1e-6)  # Denominator stays C = 5.
  np.testing.assert_allclose(diag["weights"], valid / C)
  np.testing.assert_array_equal(diag["nonfinite"], [False, True, False, True, False])
  assert not np.any(np.asarray(diag["clipped"])[~valid])
  # With noise, still finite.
  out, _, _ = _aggregate(g, cp, counts, clip_norm=1.0, noise_multiplier=1.0)
  assert np.all(np.isfinite(_flat(out)))


def test_no_valid_client_keeps_global_without_noise_and_still_adds_noise_with_it():
  rng = np.random.default_rng(2)
  g = _global(rng)
  cp = jax.tree.map(lambda x: np.full_like(x, np.nan), _clients(rng, g, 0.1))
  out, _, diag = _aggregate(g, cp, np.ones(C), clip_norm=1.0, noise_multiplier=0.0)
  np.testing.assert_array_equal(_flat(out), _flat(g))
  assert float(np.sum(diag["weights"])) == 0
  out, _, _ = _aggregate(g, cp, np.ones(C), clip_norm=1.0, noise_multiplier=1.0)
  assert np.all(np.isfinite(_flat(out))) and not np.allclose(_flat(out), _flat(g))  # Skipping it would tell.


def test_noise_statistics_and_keys():
  g = {"a": np.zeros((200, 500), np.float32), "b": np.zeros((100_000,), np.float32), "c": np.zeros(3, np.float32)}
  cp = jax.tree.map(lambda x: np.repeat(x[None], C, axis=0), g)  # Zero updates: the output is the noise.
  clip_norm, z = 2.0, 1.5
  out, _, diag = _aggregate(g, cp, np.ones(C), clip_norm, z, key=7)
  std = z * clip_norm / C
  assert float(diag["noise_std"]) == pytest.approx(std)
  for leaf in (out["a"].reshape(-1), out["b"]):
    n = leaf.size  # 1e5 draws: the sample mean's sd is std / 316, the sample std's relative sd 0.22 %.
    assert abs(float(np.mean(leaf))) < 5 * std / math.sqrt(n)
    assert float(np.std(leaf)) == pytest.approx(std, rel=0.012)
    assert abs(scipy.stats.kurtosis(leaf)) < 0.1  # Gaussian tails.
  assert abs(np.corrcoef(out["a"].reshape(-1)[:50_000], out["b"][:50_000])[0, 1]) < 0.02  # Independent leaves.
  again, _, _ = _aggregate(g, cp, np.ones(C), clip_norm, z, key=7)
  other, _, _ = _aggregate(g, cp, np.ones(C), clip_norm, z, key=8)
  np.testing.assert_array_equal(_flat(again), _flat(out))
  assert not np.allclose(_flat(other), _flat(out))


def test_noise_is_added_to_the_noise_free_aggregate():
  rng = np.random.default_rng(4)
  g = _global(rng)
  cp = _clients(rng, g, scale=1.0)
  clean, _, _ = _aggregate(g, cp, np.ones(C), 1.0, 0.0, key=3)
  noisy, _, _ = _aggregate(g, cp, np.ones(C), 1.0, 0.8, key=3)
  zeros = jax.tree.map(lambda x: np.repeat(np.asarray(x)[None], C, axis=0), g)
  pure, _, _ = _aggregate(g, zeros, np.ones(C), 1.0, 0.8, key=3)  # Same key: the same noise.
  np.testing.assert_allclose(_flat(noisy) - _flat(clean), _flat(pure) - _flat(g), atol=1e-5)


def test_running_variances_stay_non_negative():
  g = {"params": {"w": np.zeros(4000, np.float32)}, "batch_stats": {"bn": {"var": np.full(4000, 0.01, np.float32)}}}
  cp = jax.tree.map(lambda x: np.repeat(x[None], C, axis=0), g)
  out, _, _ = _aggregate(g, cp, np.ones(C), 1.0, 5.0)  # Noise std 1 >> 0.01.
  assert np.min(out["batch_stats"]["bn"]["var"]) == 0.0 and np.min(out["params"]["w"]) < -1


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"clip_norm": 0.0, "noise_multiplier": 1.0}, r"aggregation.kwargs.clip_norm=0.0: must be a finite number > 0"),
    ({"clip_norm": -1, "noise_multiplier": 1.0}, r"aggregation.kwargs.clip_norm=-1: must be"),
    ({"clip_norm": float("nan"), "noise_multiplier": 1.0}, r"aggregation.kwargs.clip_norm=nan"),
    ({"clip_norm": True, "noise_multiplier": 1.0}, r"aggregation.kwargs.clip_norm=True"),
    ({"clip_norm": 1.0, "noise_multiplier": -0.5}, r"aggregation.kwargs.noise_multiplier=-0.5: must be .*>= 0"),
    ({"clip_norm": 1.0, "noise_multiplier": float("inf")}, r"aggregation.kwargs.noise_multiplier=inf"),
    ({"clip_norm": 1.0, "noise_multiplier": "1"}, r"aggregation.kwargs.noise_multiplier='1'"),
    ({"clip_norm": 1.0}, r"bad aggregation.kwargs.*noise_multiplier"),
  ],
)
def test_bad_kwargs_name_the_field(kwargs, match):
  with pytest.raises(ValueError, match=match):
    aggregation.get("dp_mean", **kwargs)


def test_client_axis_may_not_exceed_num_clients():
  agg = aggregation.get("dp_mean", clip_norm=1.0, noise_multiplier=1.0, num_clients=3)
  g = {"w": jnp.zeros(2)}
  with pytest.raises(ValueError, match="4 clients.*num_clients=3"):
    agg.aggregate(agg.init(g), g, {"w": jnp.zeros((4, 2))}, {"num_examples": jnp.ones(4)}, jax.random.key(0))
  # Fewer uploads: the m clients sampled for the round (config.clients_per_round), m slots of weight 1/m.
  _, _, diag = agg.aggregate(agg.init(g), g, {"w": jnp.zeros((2, 2))}, {"num_examples": jnp.ones(2)}, jax.random.key(0))
  np.testing.assert_allclose(diag["weights"], [0.5, 0.5])
  assert float(diag["noise_std"]) == pytest.approx(1.0 / 2)


# ---------------------------------------------------------------- the accountant


def _analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
  """Exact epsilon of one Gaussian mechanism of L2 sensitivity 1 and noise sigma (Balle & Wang, ICML 2018, Thm. 8).

  delta(eps) = Phi(1 / (2 sigma) - eps sigma) - e^eps Phi(-1 / (2 sigma) - eps sigma), decreasing in eps.
  """
  norm = scipy.stats.norm

  def excess(eps):
    a, b = 1 / (2 * sigma) - eps * sigma, -1 / (2 * sigma) - eps * sigma
    return norm.cdf(a) - math.exp(eps) * norm.cdf(b) - delta

  return scipy.optimize.brentq(excess, 0.0, 500.0, xtol=1e-12)


@pytest.mark.parametrize("sigma,rounds", [(1.0, 1), (2.0, 1), (0.8, 1), (3.0, 4), (5.0, 10)])
def test_epsilon_against_the_analytic_gaussian_mechanism(sigma, rounds):
  delta = 1e-5
  # T rounds of the Gaussian mechanism = one Gaussian mechanism with noise sigma / sqrt(T) (exactly).
  exact = _analytic_gaussian_epsilon(sigma / math.sqrt(rounds), delta)
  pld = privacy.client_level_epsilon(sigma, rounds, delta, accountant="pld")
  rdp = privacy.client_level_epsilon(sigma, rounds, delta, accountant="rdp")
  assert pld == pytest.approx(exact, rel=2e-3, abs=1e-3)
  assert exact - 1e-6 <= rdp <= 1.25 * exact  # RDP is an upper bound, and not a loose one here.


def test_epsilon_monotone_and_edge_cases():
  d = 1e-5
  by_rounds = [privacy.client_level_epsilon(1.0, t, d) for t in (1, 2, 5, 20, 200)]
  assert all(a < b for a, b in zip(by_rounds, by_rounds[1:]))
  by_noise = [privacy.client_level_epsilon(z, 50, d) for z in (0.5, 1.0, 2.0, 8.0)]
  assert all(a > b for a, b in zip(by_noise, by_noise[1:]))
  by_delta = [privacy.client_level_epsilon(1.0, 50, x) for x in (1e-7, 1e-5, 1e-3)]
  assert all(a > b for a, b in zip(by_delta, by_delta[1:]))
  # Privacy amplification by sampling.
  assert privacy.client_level_epsilon(2.0, 50, d, sampling_prob=0.1) < privacy.client_level_epsilon(2.0, 50, d)
  # Two releases per round (G and D) = twice the rounds of one.
  both = privacy.client_level_epsilon(2.0, 30, d, releases_per_round=2)
  assert both == pytest.approx(privacy.client_level_epsilon(2.0, 60, d), rel=1e-6)
  assert privacy.client_level_epsilon(0.0, 3, d) == math.inf
  assert privacy.client_level_epsilon(1.0, 0, d) == 0.0


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"noise_multiplier": -1.0}, r"noise_multiplier=-1.0 is invalid"),
    ({"rounds": -1}, r"rounds=-1 is invalid"),
    ({"rounds": 2.5}, r"rounds=2.5 is invalid"),
    ({"delta": 0.0}, r"delta=0.0 is invalid: must be in \(0, 1\)"),
    ({"delta": 1.0}, r"delta=1.0 is invalid"),
    ({"sampling_prob": 0.0}, r"sampling_prob=0.0 is invalid"),
    ({"accountant": "moments"}, r"accountant='moments' is invalid: accepted values are \['rdp', 'pld'\]"),
    ({"releases_per_round": 0}, r"releases_per_round=0 is invalid"),
  ],
)
def test_epsilon_argument_errors(kwargs, match):
  args = {"noise_multiplier": 1.0, "rounds": 3, "delta": 1e-5, **kwargs}
  with pytest.raises(ValueError, match=match):
    privacy.client_level_epsilon(**args)


# ---------------------------------------------------------------- config, summary, console, report


def test_config_privacy_fields():
  assert config_lib.PRIVACY_ACCOUNTANTS == privacy.ACCOUNTANTS
  c = config_lib.base_config()
  assert c.privacy.delta == 1e-5 and c.privacy.accountant == "rdp"
  config_lib.validate(c)


@pytest.mark.parametrize(
  "overrides,match",
  [
    ({"privacy.delta": 0.0}, r"config.privacy.delta=0.0 is invalid: must be a number in \(0, 1\)"),
    ({"privacy.delta": 1.5}, r"config.privacy.delta=1.5 is invalid"),
    ({"privacy.accountant": "moments"}, r"config.privacy.accountant='moments' is invalid: .*\['pld', 'rdp'\]"),
    (
      {"aggregation.name": "dp_mean", "privacy.delta": 0.3},
      r"config.privacy.delta=0.3 is invalid: with aggregation.name='dp_mean' it must be below 1/num_clients = 0.25",
    ),
  ],
)
def test_config_errors(overrides, match):
  assert_config_error(overrides, match)


def _dp_config(**overrides):
  return tiny_config(
    **{
      "aggregation.name": "dp_mean",
      "aggregation.kwargs.clip_norm": 0.1,
      "aggregation.kwargs.noise_multiplier": 0.5,
      **overrides,
    }
  )


def _records(zs, d_too=False):
  """metrics.jsonl records of rounds aggregated with these noise multipliers (None: another rule)."""
  out = []
  for r, z in enumerate(zs, start=1):
    rec = {"round": r} if z is None else {"round": r, "agg/noise_multiplier": float(np.float32(z))}
    if d_too and z is not None:
      rec["agg_d/noise_multiplier"] = float(np.float32(z))
    out.append(rec)
  return out


def test_summary_block_and_its_line():
  block = privacy.summary_block(_dp_config(), _records([0.5] * 7))
  eps = privacy.client_level_epsilon(0.5, 7, 1e-5)
  assert block == {
    "epsilon": eps,
    "delta": 1e-5,
    "noise_multiplier": 0.5,
    "clip_norm": 0.1,
    "rounds": 7,
    "accountant": "rdp",
    "unit": "client-level, generator uploads",
  }
  text = privacy.guarantee_text(block)
  assert text == f"(ε = {eps:.4g}, δ = 1e-05)-DP at the client level for the generator uploads over 7 rounds"
  assert privacy.guarantee_text({**block, "rounds": 1}).endswith("over 1 round")
  both = privacy.summary_block(
    _dp_config(**{"aggregation.average_discriminator": True, "privacy.accountant": "pld"}), _records([0.5] * 7, True)
  )
  assert both["unit"] == "client-level, generator and discriminator uploads" and both["accountant"] == "pld"
  assert both["epsilon"] == pytest.approx(
    privacy.client_level_epsilon(0.5, 7, 1e-5, accountant="pld", releases_per_round=2)
  )
  assert "generator and discriminator uploads" in privacy.guarantee_text(both)
  assert privacy.summary_block(tiny_config(), _records([None] * 7)) is None
  none = privacy.guarantee_text({**block, "epsilon": math.inf})
  assert "ε = ∞" in none and "no privacy" in none
  assert privacy.summary_block(_dp_config(), [])["epsilon"] == 0.0
  z = 1.1  # Not a float32: the records' rounding must not read as "less noise".
  assert "note" not in privacy.summary_block(
    _dp_config(**{"aggregation.kwargs.noise_multiplier": z}), _records([z] * 3)
  )


def test_summary_block_of_a_run_resumed_with_other_settings_stays_sound():
  # Rounds 1-3 with FedAvg, then resumed with dp_mean: no guarantee.
  mixed = privacy.summary_block(_dp_config(), _records([None] * 3 + [0.5] * 4))
  assert mixed["epsilon"] == math.inf and mixed["rounds"] == 7 and "3 of the 7 rounds" in mixed["note"]
  assert mixed["note"] in privacy.guarantee_text(mixed)
  # Rounds with less noise: every round accounted with the smallest multiplier (an upper bound).
  less = privacy.summary_block(_dp_config(), _records([0.3] * 2 + [0.5] * 5))
  assert less["noise_multiplier"] == pytest.approx(0.3) and "0.3" in less["note"]
  assert less["epsilon"] == pytest.approx(privacy.client_level_epsilon(float(np.float32(0.3)), 7, 1e-5))
  # More noise earlier: the config's multiplier bounds it already.
  more = privacy.summary_block(_dp_config(), _records([2.0] * 2 + [0.5] * 5))
  assert "note" not in more and more["epsilon"] == privacy.client_level_epsilon(0.5, 7, 1e-5)
  # Discriminators noised in some rounds: two releases every round.
  d = privacy.summary_block(_dp_config(), _records([0.5] * 2, d_too=True) + _records([0.5] * 7)[2:])
  assert d["unit"].endswith("generator and discriminator uploads")
  assert d["epsilon"] == pytest.approx(privacy.client_level_epsilon(0.5, 7, 1e-5, releases_per_round=2))


def test_console_and_report_show_the_guarantee():
  block = privacy.summary_block(_dp_config(), _records([0.5] * 2))
  out = io.StringIO()
  run_console.Console(out=out).done([("", {"rounds": 2, "privacy": block}, "/tmp/w", False)], 1.0)
  lines = out.getvalue().splitlines()
  assert f"privacy: {privacy.guarantee_text(block)}" in lines
  html = "\n".join(run_report._privacy_section(types.SimpleNamespace(summary={"privacy": block})))
  assert "Differential privacy" in html and "δ = 1e-05" in html and "over 2 rounds" in html
  assert run_report._privacy_section(types.SimpleNamespace(summary={})) == []
  html = "\n".join(
    run_report._privacy_section(types.SimpleNamespace(summary={"privacy": {**block, "epsilon": math.inf}}))
  )
  assert "∞" in html


def test_readme_section_stays_true():
  readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  section = readme[readme.index("### Client-level differential privacy") :]
  section = section[: section.index("\n### ", 1)]
  for field in re.findall(r"--config\.([\w.]+)=", section):
    config_lib.check_field(field)
  assert "ε ≈ 4.7 after one round and ≈ 166 after 200 (RDP; PLD: 4.4" in section
  assert f"{privacy.client_level_epsilon(1.0, 1, 1e-5):.1f}" == "4.7"
  assert f"{privacy.client_level_epsilon(1.0, 200, 1e-5):.0f}" == "166"
  assert f"{privacy.client_level_epsilon(1.0, 1, 1e-5, accountant='pld'):.1f}" == "4.4"


@pytest.mark.slow
def test_end_to_end_dp_run_reports_its_guarantee(tmp_path):
  from fedgan_jax import experiment

  config = _dp_config()
  out = io.StringIO()
  summary = experiment.run(config, str(tmp_path), console=run_console.Console(out=out, err=io.StringIO()))
  on_disk = json.load(open(tmp_path / "summary.json"))
  assert on_disk["rounds"] == 2
  expect = {
    "epsilon": privacy.client_level_epsilon(0.5, 2, 1e-5, accountant="rdp"),
    "delta": 1e-5,
    "noise_multiplier": 0.5,
    "clip_norm": 0.1,
    "rounds": 2,
    "accountant": "rdp",
    "unit": "client-level, generator uploads",
  }
  assert on_disk["privacy"] == expect and summary["privacy"] == expect
  assert f"privacy: {privacy.guarantee_text(expect)}" in out.getvalue().splitlines()
  html = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
  assert "Differential privacy" in html
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["agg/noise_std"] for r in records] == pytest.approx([0.5 * 0.1 / 2] * 2)
  assert all(r["train/global_finite"] for r in records)
  assert os.path.exists(tmp_path / "samples" / "round_000002.png")
