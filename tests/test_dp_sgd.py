"""DP-SGD on the discriminator (train.dp_sgd): per-example clipping against a loop of single-example gradients, the
examples' decomposition of the batch loss, noise statistics, the sampler, the accounting against dp_accounting,
the config's checks, the off program unchanged, the summary/console/report, and one end-to-end WGAN-GP run."""

from __future__ import annotations

import io
import json
import math
import types

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_config_error, tiny_config
from fedgan_jax import assemble, config_lib, presets, privacy, run_console
from fedgan_jax.federated import dp_sgd, losses
from fedgan_jax.models import dcgan
from fedgan_jax.report import run_report

B = 5


def _tiny_d(loss="wgan", gp=10.0, r1=0.0, norm="instance"):
  """A 8 px, width-4 critic (InstanceNorm after every conv), its params, a batch and the per-example loss."""
  d = dcgan.Discriminator(resolution=8, width=4, norm=norm, impl="xla", norm_first=True)
  rng = np.random.default_rng(0)
  real = jnp.asarray(rng.uniform(-1, 1, (B, 8, 8, 3)), jnp.float32)
  fake = jnp.asarray(rng.uniform(-1, 1, (B, 8, 8, 3)), jnp.float32)
  eps = jnp.asarray(rng.normal(size=(B, 1, 1, 1)), jnp.float32)
  params = d.init(jax.random.key(0), real, train=False)["params"]
  d_fn = lambda p, x: d.apply({"params": p}, x, train=True)
  return d_fn, params, (real, fake, eps), dp_sgd.example_loss(d_fn, loss, "stable", gp, r1)


def _flat(tree):
  return np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("loss,gp,r1", [("wgan", 10.0, 0.0), ("bce", 0.0, 1.0), ("hinge", 10.0, 0.5)])
def test_clipped_sum_matches_a_loop_of_single_example_gradients(loss, gp, r1):
  """Noise 0: the vmapped path equals each example's jax.grad taken alone, clipped and summed in numpy."""
  d_fn, params, batch, example_loss = _tiny_d(loss, gp, r1)
  grads = [_flat(jax.grad(example_loss)(params, *(a[i] for a in batch))) for i in range(B)]
  norms = np.linalg.norm(grads, axis=1)
  S = float(np.mean(np.sort(norms)[B // 2 : B // 2 + 2]))  # Half-way between two norms: about half clipped, no ties.
  ref = sum(g * min(1.0, S / n) for g, n in zip(grads, norms)) / B
  mean_loss, grad, clip_frac = jax.jit(
    lambda p: dp_sgd.private_value_and_grad(example_loss, p, batch, S, 0.0, jax.random.key(0))
  )(params)
  np.testing.assert_allclose(_flat(grad), ref, rtol=2e-4, atol=1e-6)
  assert float(clip_frac) == pytest.approx(np.mean(norms > S))
  assert 0 < float(clip_frac) < 1
  losses_i = [float(example_loss(params, *(a[i] for a in batch))) for i in range(B)]
  assert float(mean_loss) == pytest.approx(np.mean(losses_i), rel=1e-5)


@pytest.mark.parametrize("loss,gp,r1", [("wgan", 10.0, 0.0), ("bce", 0.0, 1.0)])
def test_examples_decompose_the_batch_loss(loss, gp, r1):
  """Unclipped and noise-free, the private gradient is the batch loss's gradient (local_trainer's D loss)."""
  d_fn, params, (real, fake, eps), example_loss = _tiny_d(loss, gp, r1)

  def batch_loss(p):
    d = lambda x: d_fn(p, x)
    out = losses.d_adversarial(loss, d(real), d(fake))
    if gp:
      out = out + gp * losses.gradient_penalty_at(d, real, fake, eps)
    if r1:
      out = out + r1 * losses.r1_penalty(d, real)
    return out

  value, ref = jax.value_and_grad(batch_loss)(params)
  mean_loss, grad, clip_frac = dp_sgd.private_value_and_grad(
    example_loss, params, (real, fake, eps), 1e9, 0.0, jax.random.key(0)
  )
  assert float(mean_loss) == pytest.approx(float(value), rel=1e-5)
  np.testing.assert_allclose(_flat(grad), _flat(ref), rtol=1e-4, atol=1e-6)
  assert float(clip_frac) == 0.0


def test_conditional_examples_decompose_the_batch_loss():
  """A projection critic: each example is judged with its own labels (the penalty with the real image's)."""
  d = dcgan.Discriminator(resolution=8, width=4, norm="instance", impl="xla", norm_first=True, num_classes=3)
  rng = np.random.default_rng(1)
  real = jnp.asarray(rng.uniform(-1, 1, (B, 8, 8, 3)), jnp.float32)
  fake = jnp.asarray(rng.uniform(-1, 1, (B, 8, 8, 3)), jnp.float32)
  eps = jnp.asarray(rng.uniform(size=(B, 1, 1, 1)), jnp.float32)
  y_real, y_fake = jnp.asarray([0, 1, 2, 1, 0]), jnp.asarray([2, 2, 0, 1, 1])
  params = d.init(jax.random.key(0), real, train=False, labels=y_real)["params"]
  d_fn = lambda p, x, y: d.apply({"params": p}, x, train=True, labels=y)

  def batch_loss(p):
    dr = lambda x: d_fn(p, x, y_real)
    return losses.d_adversarial("wgan", dr(real), d_fn(p, fake, y_fake)) + 10.0 * losses.gradient_penalty_at(
      dr, real, fake, eps
    )

  value, ref = jax.value_and_grad(batch_loss)(params)
  example_loss = dp_sgd.example_loss(d_fn, "wgan", "stable", 10.0)
  mean_loss, grad, _ = dp_sgd.private_value_and_grad(
    example_loss, params, (real, fake, eps, y_real, y_fake), 1e9, 0.0, jax.random.key(0)
  )
  assert float(mean_loss) == pytest.approx(float(value), rel=1e-5)
  np.testing.assert_allclose(_flat(grad), _flat(ref), rtol=1e-4, atol=1e-6)
  # The labels matter: the same examples with the fakes' labels swapped give another gradient.
  _, other, _ = dp_sgd.private_value_and_grad(
    example_loss, params, (real, fake, eps, y_real, y_fake[::-1]), 1e9, 0.0, jax.random.key(0)
  )
  assert np.abs(_flat(other) - _flat(grad)).max() > 1e-4


def test_gradient_penalty_is_unchanged_by_its_split():
  """gradient_penalty = gradient_penalty_at(interpolation_coefficients(key)) for both interpolations."""
  d_fn, params, (real, fake, _), _ = _tiny_d()
  d = lambda x: d_fn(params, x)
  for kind in ("uniform", "normal"):
    key = jax.random.key(3)
    eps = losses.interpolation_coefficients(key, real, kind)
    assert eps.shape == (B, 1, 1, 1)
    assert float(losses.gradient_penalty(d, real, fake, key, kind)) == float(
      losses.gradient_penalty_at(d, real, fake, eps)
    )
  assert bool(jnp.all((eps > -10) & (eps < 10))) and float(jnp.min(losses.interpolation_coefficients(key, real))) >= 0


def test_clipping_on_a_hand_checkable_input():
  """Norms 0, 5, 5, 5 over two leaves; S = 2.5 halves the last three (optax's per-example global norm)."""
  g = {
    "a": jnp.asarray([[0.0, 0.0], [0.0, 3.0], [4.0, 0.0], [3.0, 4.0]]),
    "b": jnp.asarray([[0.0], [4.0], [3.0], [0.0]]),
  }
  out, frac = dp_sgd.noisy_clipped_mean(g, 2.5, 0.0, jax.random.key(0))
  np.testing.assert_allclose(np.asarray(out["a"]), [3.5 / 4, 3.5 / 4])
  np.testing.assert_allclose(np.asarray(out["b"]), [3.5 / 4])
  assert float(frac) == 0.75


def test_noise_statistics():
  """The added noise is N(0, (sigma S / B)^2) per coordinate, independent across leaves and keys."""
  Bn, S, sigma = 16, 0.5, 1.3
  rng = np.random.default_rng(1)
  g = {"big": jnp.asarray(rng.normal(size=(Bn, 200_000)), jnp.float32), "small": jnp.ones((Bn, 7))}
  clean, _ = dp_sgd.noisy_clipped_mean(g, S, 0.0, jax.random.key(0))
  noisy, frac = dp_sgd.noisy_clipped_mean(g, S, sigma, jax.random.key(0))
  assert float(frac) == 1.0  # Every norm ~ 447 > S.
  noise = np.asarray(noisy["big"] - clean["big"], np.float64)
  std = sigma * S / Bn
  assert noise.std() == pytest.approx(std, rel=0.01)
  assert abs(noise.mean()) < 5 * std / math.sqrt(noise.size)
  other, _ = dp_sgd.noisy_clipped_mean(g, S, sigma, jax.random.key(1))
  assert abs(np.corrcoef(noise, np.asarray(other["big"] - clean["big"]))[0, 1]) < 0.02
  small = np.asarray(noisy["small"] - clean["small"])
  assert not np.allclose(small, noise[:7])  # Each leaf draws its own noise.


def test_distinct_indices_are_distinct_valid_and_uniform():
  draw = jax.jit(jax.vmap(lambda k: dp_sgd.distinct_indices(k, jnp.int32(10), 16, 4)))
  idx = np.asarray(draw(jax.random.split(jax.random.key(0), 20_000)))
  assert idx.shape == (20_000, 4) and idx.dtype == np.int32
  assert (idx < 10).all() and (idx >= 0).all()  # Never a padding slot.
  assert all(len(set(row)) == 4 for row in idx[:2000])
  freq = np.bincount(idx.reshape(-1), minlength=10) / idx.size
  np.testing.assert_allclose(freq, 0.1, atol=0.005)
  assert sorted(np.asarray(dp_sgd.distinct_indices(jax.random.key(1), jnp.int32(4), 6, 4)).tolist()) == [0, 1, 2, 3]


# ---------------------------------------------------------------- accounting


def _direct(sigma, steps, q, delta, accountant):
  event = dp_accounting.SelfComposedDpEvent(
    dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
  )
  acc = dp_accounting.rdp.RdpAccountant() if accountant == "rdp" else dp_accounting.pld.PLDAccountant()
  acc.compose(event)
  return acc.get_epsilon(delta)


@pytest.mark.parametrize(
  "sigma,steps,q,accountant", [(1.0, 500, 0.032, "rdp"), (0.8, 40, 0.25, "rdp"), (1.2, 60, 0.1, "pld")]
)
def test_epsilon_equals_a_direct_dp_accounting_computation(sigma, steps, q, accountant):
  eps = privacy.example_level_epsilon(sigma, steps, q, 1e-5, accountant)
  assert eps == pytest.approx(_direct(sigma, steps, q, 1e-5, accountant), rel=1e-9)
  assert 0 < eps < math.inf


def test_epsilon_is_monotone():
  d = 1e-5
  by_steps = [privacy.example_level_epsilon(1.0, t, 0.05, d) for t in (1, 10, 100, 1000)]
  assert all(a < b for a, b in zip(by_steps, by_steps[1:]))
  by_noise = [privacy.example_level_epsilon(z, 200, 0.05, d) for z in (0.6, 1.0, 2.0, 4.0)]
  assert all(a > b for a, b in zip(by_noise, by_noise[1:]))
  by_q = [privacy.example_level_epsilon(1.0, 200, q, d) for q in (0.01, 0.05, 0.2, 1.0)]
  assert all(a < b for a, b in zip(by_q, by_q[1:]))
  assert privacy.example_level_epsilon(0.0, 5, 0.1, d) == math.inf
  assert privacy.example_level_epsilon(1.0, 0, 0.1, d) == 0.0
  with pytest.raises(ValueError, match=r"example_level_epsilon: steps=-1 is invalid"):
    privacy.example_level_epsilon(1.0, -1, 0.1, d)
  with pytest.raises(ValueError, match=r"example_level_epsilon: sampling_prob=1.5 is invalid"):
    privacy.example_level_epsilon(1.0, 3, 1.5, d)


def _dp(**overrides):
  return tiny_config(**{**presets.GRADIENT_PENALTY, "train.dp_sgd.enabled": True, **overrides})


def _records(zs):
  return [{"round": r} if z is None else {"round": r, "train/dp_noise_multiplier": z} for r, z in enumerate(zs, 1)]


def test_dp_sgd_block_per_client():
  config = _dp(**{"train.dp_sgd.noise_multiplier": 1.1, "train.dp_sgd.clip_norm": 0.5})  # B = 8, L = 2.
  block = privacy.dp_sgd_block(config, _records([1.1] * 3), [32, 64, 32])
  eps32, eps64 = (privacy.example_level_epsilon(1.1, 6, q, 1e-5) for q in (0.25, 0.125))
  assert block == {
    "epsilon": [eps32, eps64, eps32],
    "delta": 1e-5,
    "noise_multiplier": 1.1,
    "clip_norm": 0.5,
    "sampling_prob": [0.25, 0.125, 0.25],
    "steps": [6, 6, 6],
    "rounds": 3,
    "accountant": "rdp",
    "sampling": privacy.DP_SGD_SAMPLING,
    "unit": privacy.DP_SGD_UNIT,
  }
  assert eps64 < eps32  # More images, less sampled: more private.
  # One local epoch: n_c // B steps per round.
  epoch = privacy.dp_sgd_block(_dp(**{"train.local_steps": 0}), _records([1.0] * 2), [32, 20])
  assert epoch["steps"] == [8, 4]
  assert epoch["epsilon"][1] == privacy.example_level_epsilon(1.0, 4, 0.4, 1e-5)
  assert privacy.dp_sgd_block(tiny_config(), _records([None] * 2), [32]) is None


def test_dp_sgd_block_of_a_resumed_run_stays_sound():
  config = _dp()
  mixed = privacy.dp_sgd_block(config, _records([None] * 2 + [1.0] * 3), [32, 32])
  assert mixed["epsilon"] == [math.inf, math.inf] and "2 of the 5 rounds ran without DP-SGD" in mixed["note"]
  forked = privacy.dp_sgd_block(config, [{"round": 4, "train/dp_noise_multiplier": 1.0}], [32, 32])
  assert forked["epsilon"][0] == math.inf and "3 of the 4 rounds" in forked["note"]
  less = privacy.dp_sgd_block(config, _records([0.7] + [1.0] * 2), [32, 32])
  assert less["noise_multiplier"] == 0.7 and less["epsilon"][0] == privacy.example_level_epsilon(0.7, 6, 0.25, 1e-5)
  weak = privacy.dp_sgd_block(_dp(**{"privacy.delta": 0.1}), _records([1.0]), [16, 32])
  assert "not below 1 / the smallest client's 16 images" in weak["note"]


def test_summary_console_and_report():
  config = _dp()
  block = privacy.privacy_summary(config, _records([1.0] * 2), [32, 32])
  assert set(block) == {"dp_sgd"}
  eps = block["dp_sgd"]["epsilon"][0]
  text = privacy.dp_sgd_text(block["dp_sgd"])
  assert text.startswith(f"(ε = {privacy.epsilon_text(eps)} at every client, δ = 1e-05)-DP per real image")
  assert "4 DP-SGD steps" in text
  uneven = privacy.dp_sgd_text(privacy.dp_sgd_block(config, _records([1.0] * 2), [32, 64]))
  assert "over the clients" in uneven
  out = io.StringIO()
  run_console.Console(out=out).done([("", {"rounds": 2, "privacy": block}, "/tmp/w", False)], 1.0)
  assert f"privacy: {text}" in out.getvalue().splitlines()
  html = "\n".join(run_report._privacy_section(types.SimpleNamespace(summary={"privacy": block})))
  assert "Differential privacy" in html and "DP-SGD" in html and privacy.epsilon_text(eps) in html
  # With dp_mean as well: both guarantees, the client-level one first.
  both_cfg = _dp(
    **{"aggregation.name": "dp_mean", "aggregation.kwargs.clip_norm": 0.1, "aggregation.kwargs.noise_multiplier": 1.0}
  )
  records = [{**r, "agg/noise_multiplier": 1.0} for r in _records([1.0] * 2)]
  both = privacy.privacy_summary(both_cfg, records, [32, 32])
  assert both["epsilon"] == privacy.client_level_epsilon(1.0, 2, 1e-5) and "dp_sgd" in both
  assert privacy.summary_lines(both) == [privacy.guarantee_text(both), privacy.dp_sgd_text(both["dp_sgd"])]
  assert privacy.privacy_summary(tiny_config(), _records([None]), [32]) is None


# ---------------------------------------------------------------- config, program


def test_config_defaults():
  dp = config_lib.base_config().train.dp_sgd
  assert (dp.enabled, dp.clip_norm, dp.noise_multiplier) == (False, 1.0, 1.0)
  assert _dp().train.dp_sgd.enabled


@pytest.mark.parametrize(
  "overrides,match",
  [
    ({"train.dp_sgd.clip_norm": 0.0}, r"config.train.dp_sgd.clip_norm=0.0 is invalid: must be a finite number > 0"),
    ({"train.dp_sgd.clip_norm": float("inf")}, r"config.train.dp_sgd.clip_norm=inf is invalid"),
    ({"train.dp_sgd.noise_multiplier": -1.0}, r"config.train.dp_sgd.noise_multiplier=-1.0 is invalid: .*>= 0"),
    ({"train.dp_sgd.noise_multiplier": float("nan")}, r"config.train.dp_sgd.noise_multiplier=nan is invalid"),
    (
      {"train.dp_sgd.enabled": True},  # The default D has BatchNorm.
      r"config.model.d_norm='batch' is invalid: train.dp_sgd.enabled=True needs a discriminator without BatchNorm",
    ),
    (
      {
        **presets.GRADIENT_PENALTY,
        "train.dp_sgd.enabled": True,
        "aggregation.name": "fltrust",
        "aggregation.kwargs.root_size": 16,
        "train.batch_size": 32,
      },
      r"config.aggregation.kwargs.root_size=16 is invalid: with train.dp_sgd.enabled=True .* accepted >= 32",
    ),
  ],
)
def test_config_errors(overrides, match):
  assert_config_error(overrides, match)


def test_config_error_for_a_non_bool_flag_and_too_few_images():
  raw = config_lib.base_config().to_dict()
  raw["train"]["dp_sgd"]["enabled"] = "yes"
  import ml_collections

  with pytest.raises(ValueError, match=r"config.train.dp_sgd.enabled='yes' is invalid: must be True or False"):
    config_lib.validate(ml_collections.ConfigDict(raw))
  config_lib.validate(_dp(**{"model.d_norm": "none"}))  # No norm at all is fine too.
  with pytest.raises(ValueError, match=r"train.dp_sgd.enabled=True draws batches of train.batch_size=8 distinct"):
    assemble.local_steps(_dp(), [32, 7])
  assert assemble.local_steps(_dp(), [32, 8]) == 2


def test_off_program_ignores_the_dp_settings():
  """dp_sgd off: the lowered round is the same whatever clip_norm and noise_multiplier say (no DP op traced).

  (The off program was also checked byte-identical to the one before train.dp_sgd existed, for BCE, WGAN-GP,
  one local epoch and R1 + FedProx configs, when the feature was added.)
  """

  def lowered(config):
    program, _, _ = assemble.build_program(config, 2)
    rng = np.random.default_rng(0)
    R = config.resolution
    data = assemble.round_data(config, rng.integers(0, 256, (2, 16, R, R, 3), dtype=np.uint8), [16, 16])
    return jax.jit(program.round).lower(program.init(jax.random.key(0)), data, jax.random.key(1)).as_text()

  base = {**presets.GRADIENT_PENALTY, "train.unroll": "false"}
  ref = lowered(tiny_config(**base))
  other = lowered(tiny_config(**base, **{"train.dp_sgd.clip_norm": 0.01, "train.dp_sgd.noise_multiplier": 9.0}))
  assert other == ref
  assert "top_k" not in ref  # The DP sampler is not there.


@pytest.mark.slow
def test_end_to_end_wgan_gp_with_dp_sgd(tmp_path):
  """Two rounds of WGAN-GP under DP-SGD: finite metrics, the clipped fraction logged, each client's epsilon."""
  from fedgan_jax import experiment

  # Batch 4: each per-example weight gradient is its own small conv on a CPU, so the compile grows with B.
  config = _dp(**{"train.batch_size": 4, "train.dp_sgd.noise_multiplier": 1.0})
  out = io.StringIO()
  summary = experiment.run(config, str(tmp_path), console=run_console.Console(out=out, err=io.StringIO()))
  on_disk = json.load(open(tmp_path / "summary.json"))
  counts = on_disk["data"]["client_counts"]
  B, L = config.train.batch_size, config.train.local_steps
  block = on_disk["privacy"]["dp_sgd"]
  assert block["epsilon"] == [privacy.example_level_epsilon(1.0, 2 * L, B / n, 1e-5) for n in counts]
  assert all(0 < e < math.inf for e in block["epsilon"]) and summary["privacy"] == on_disk["privacy"]
  assert f"privacy: {privacy.dp_sgd_text(block)}" in out.getvalue().splitlines()
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  for r in records:
    assert r["train/dp_noise_multiplier"] == 1.0
    assert len(r["train/dp_clip_frac"]) == config.num_clients
    assert all(0 <= f <= 1 for f in r["train/dp_clip_frac"])
    assert all(math.isfinite(v) for k in ("train/d_loss", "train/g_loss") for v in r[k])
  assert math.isfinite(on_disk["final"]["eval/swd"])
  assert "DP-SGD" in (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
