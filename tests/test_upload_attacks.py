"""Attacks on the uploaded generator and the attack window: numpy references, the round, the summary."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from conftest import tiny_config
from fedgan_jax import config_lib
from fedgan_jax.federated import program as program_lib
from fedgan_jax.federated import upload_attacks as ua_lib


def _ua(kind: str, strength: float, start=1, end=0, every=1) -> ua_lib.UploadAttack:
  return ua_lib.UploadAttack(
    kind=jnp.asarray(ua_lib.KINDS.index(kind), jnp.int32),
    strength=jnp.asarray(strength, jnp.float32),
    start=jnp.asarray(start, jnp.int32),
    end=jnp.asarray(end, jnp.int32),
    every=jnp.asarray(every, jnp.int32),
  )


def _trees(seed: int, C: int = 5):
  rng = np.random.default_rng(seed)
  g = {"params": {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=(4,))}, "batch_stats": {"m": rng.normal(size=4)}}
  c = jax.tree.map(lambda x: x[None] + 0.1 * rng.normal(size=(C,) + x.shape), g)
  f32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)
  return f32(g), f32(c)


def _reference(kind, s, g, c, attackers):
  """Each attack written per client with numpy (the papers' formulas on the flattened update)."""
  out = {}
  for name in g["params"]:
    gg, cc = np.asarray(g["params"][name], np.float64), np.asarray(c["params"][name], np.float64)
    d = cc - gg[None]
    honest = d[~attackers]
    new = d.copy()
    # The update's norm over every leaf of params, per client.
    norms = np.sqrt(
      sum(
        ((np.asarray(c["params"][k], np.float64) - np.asarray(g["params"][k], np.float64)[None]) ** 2)
        .reshape(len(d), -1)
        .sum(1)
        for k in g["params"]
      )
    )
    for i in np.flatnonzero(attackers):
      new[i] = {
        "none": d[i],
        "scale": s * d[i],
        "sign_flip": -s * d[i],
        "alie": honest.mean(0) - s * honest.std(0),
        "ipm": -s * honest.mean(0),
        "pgd": d[i],  # Projected during local training, uploaded as trained.
        "pgd_scale": d[i] * s / norms[i],  # Scaled up (or down) to the bound.
      }[kind]
    out[name] = gg[None] + new
  return out


@pytest.mark.parametrize("kind", ua_lib.KINDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tamper_matches_the_papers_formulas(kind, seed):
  g, c = _trees(seed)
  attackers = np.zeros(5, bool)
  attackers[np.random.default_rng(seed).choice(5, 2, replace=False)] = True
  s = 0.0 if kind == "none" else [5.0, 1.0, 0.7][seed]
  got = jax.jit(ua_lib.tamper)(g, c, jnp.asarray(attackers), _ua(kind, s))
  want = _reference(kind, s, g, c, attackers)
  for name, w in want.items():
    np.testing.assert_allclose(np.asarray(got["params"][name]), w, rtol=1e-5, atol=1e-6)
    # Honest clients' uploads are untouched, bit for bit.
    np.testing.assert_array_equal(
      np.asarray(got["params"][name])[~attackers], np.asarray(c["params"][name])[~attackers]
    )
  np.testing.assert_array_equal(got["batch_stats"]["m"], c["batch_stats"]["m"])  # Only params are attacked.


def test_none_and_no_attacker_leave_uploads_bit_exact():
  g, c = _trees(4)
  for kind, attackers in (("none", [True, False, True, False, False]), ("scale", [False] * 5)):
    got = ua_lib.tamper(g, c, jnp.asarray(attackers), _ua(kind, 4.0))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(c)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_scale_by_c_replaces_the_mean_when_honest_updates_cancel():
  """Model replacement (Bagdasaryan et al.): with gamma = C and honest updates summing to 0, mean = attacker's model."""
  C = 4
  g = {"params": {"w": jnp.zeros(3)}}
  target = jnp.asarray([1.0, -2.0, 0.5])
  local = jnp.stack([target / C * 1.0, jnp.asarray([1.0, 0, 0]), jnp.asarray([-1.0, 0, 0]), jnp.zeros(3)])
  # The attacker's own local model is target / C: after scaling by C its upload is the target itself.
  up = ua_lib.tamper(g, {"params": {"w": local}}, jnp.asarray([True, False, False, False]), _ua("scale", C))
  np.testing.assert_allclose(up["params"]["w"][0], target, rtol=1e-6)
  np.testing.assert_allclose(np.mean(np.asarray(up["params"]["w"]), 0), target / C, rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_project_is_the_l2_ball_projection(seed):
  rng = np.random.default_rng(seed)
  anchor = {"a": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": jnp.asarray(rng.normal(size=4), jnp.float32)}
  params = jax.tree.map(lambda x: x + jnp.asarray(rng.normal(size=x.shape), jnp.float32), anchor)
  d = np.concatenate([np.ravel(np.asarray(params[k]) - np.asarray(anchor[k])) for k in ("a", "b")])
  r = 0.5 * np.linalg.norm(d)
  got = ua_lib.project(params, anchor, jnp.asarray(True), _ua("pgd", r))
  got_d = np.concatenate([np.ravel(np.asarray(got[k]) - np.asarray(anchor[k])) for k in ("a", "b")])
  np.testing.assert_allclose(got_d, d * r / np.linalg.norm(d), rtol=1e-5, atol=1e-6)  # Same direction, norm r.
  for attacking, kind, radius in ((False, "pgd", r), (True, "scale", r), (True, "pgd", 2 * np.linalg.norm(d))):
    same = ua_lib.project(params, anchor, jnp.asarray(attacking), _ua(kind, radius))
    for k in ("a", "b"):  # Honest, another kind, or already inside the ball: unchanged.
      np.testing.assert_allclose(np.asarray(same[k]), np.asarray(params[k]), rtol=1e-6, atol=1e-6)


def test_alie_z_is_baruch_et_al_z_max():
  # Their example: n = 50, m = 12 -> s = 26 - 12 = 14, z = Phi^-1(36 / 50).
  assert ua_lib.alie_z(50, 12) == pytest.approx(scipy.stats.norm.ppf(0.72)) == pytest.approx(0.5828, abs=1e-4)
  assert ua_lib.alie_z(4, 1) == 0.0  # s = 2: Phi^-1(1/2) = 0, the honest mean.
  assert ua_lib.alie_z(10, 3) == pytest.approx(scipy.stats.norm.ppf(0.7))  # s = 3.
  assert ua_lib.default_strength("scale", 7, 1) == 7.0 and ua_lib.default_strength("ipm", 7, 1) == 0.1


@pytest.mark.parametrize("start,end,every", [(1, 0, 1), (3, 0, 1), (2, 9, 3), (5, 5, 1), (4, 0, 4)])
def test_window_in_graph_equals_host(start, end, every):
  ua = _ua("scale", 2.0, start, end, every)
  got = [int(n) for n in range(1, 21) if bool(ua_lib.in_window(ua, jnp.asarray(n - 1)))]
  assert got == ua_lib.window_rounds(start, end, every, 20).tolist()
  assert ua_lib.window_rounds(2, 9, 3, 20).tolist() == [2, 5, 8]


def test_durability_counts_rounds_until_the_implant_is_within_the_floor():
  recs = [{"round": r, "eval/implant_amplitude_lo": lo} for r, lo in [(10, 0.3), (20, 0.2), (30, 0.05), (40, -0.01)]]
  assert ua_lib.durability(recs, 20) == 20  # Window ends at round 20; first within the floor at 40.
  assert ua_lib.durability(recs, 35) == 5
  assert ua_lib.durability(recs[:3], 20) is None  # Still above when the run ends.
  assert ua_lib.durability([{"round": 30, "eval/implant_amplitude_lo": -0.1}], 30) == 0


def test_config_errors_name_the_field():
  assert tuple(config_lib.UPLOAD_ATTACKS) == ua_lib.KINDS
  for field, value, words in [
    ("attack.upload", "boost", "accepted values"),
    ("attack.start_round", 0, ">= 1"),
    ("attack.every", 0, ">= 1"),
    ("attack.upload_strength", -1.0, ">= 0"),
  ]:
    with pytest.raises(ValueError, match=rf"{field}.*{words}"):
      tiny_config(**{field: value})
  with pytest.raises(ValueError, match="attack.upload_strength=0.0.*pgd.*bound"):
    tiny_config(**{"attack.upload": "pgd"})
  with pytest.raises(ValueError, match="attack.end_round=3.*start_round=5"):
    tiny_config(**{"attack.start_round": 5, "attack.end_round": 3})
  ua = ua_lib.from_config(tiny_config(num_clients=3, **{"attack.upload": "scale"}))
  assert int(ua.kind) == 1 and float(ua.strength) == 3.0 and int(ua.end) == 0


def test_the_round_uploads_the_tampered_generator(tiny_program):
  """In the compiled round (no retrace): scale moves the mean by w0 (gamma - 1) d0; outside the window = clean."""
  config, program, round_jit, data, traces = tiny_program
  state = program.init(jax.random.key(0))
  key = jax.random.key(5)
  n_traces = len(traces)
  base, _ = round_jit(state, data, key)
  scaled, m = round_jit(state, data._replace(upload=_ua("scale", 3.0)), key)
  local = jax.jit(program.local_round)(state, data, program_lib.client_keys(key, 3))
  w0 = float(m["agg/weights"][0])
  for leaf_b, leaf_s, leaf_l, leaf_g in zip(
    jax.tree.leaves(base.g_global["params"]),
    jax.tree.leaves(scaled.g_global["params"]),
    jax.tree.leaves(local.client_g["params"]),
    jax.tree.leaves(state.g_global["params"]),
  ):
    d0 = np.asarray(leaf_l[0]) - np.asarray(leaf_g)
    np.testing.assert_allclose(np.asarray(leaf_s) - np.asarray(leaf_b), w0 * 2.0 * d0, rtol=1e-3, atol=1e-6)
  # Outside the window the attacker is an honest client: the round equals a clean run's.
  later, _ = round_jit(state, data._replace(upload=_ua("scale", 3.0, start=2)), key)
  clean, _ = round_jit(state, data._replace(is_malicious=jnp.zeros(3, bool)), key)
  for a, b in zip(jax.tree.leaves(later), jax.tree.leaves(clean)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # pgd: the attacker's update stays in the ball after its local steps (its unprojected update is larger).
  free = float(m["train/update_norm"][0])
  _, m_pgd = round_jit(state, data._replace(upload=_ua("pgd", 0.25 * free)), key)
  assert float(m_pgd["train/update_norm"][0]) <= 0.25 * free * (1 + 1e-4)
  np.testing.assert_allclose(m_pgd["train/update_norm"][1:], m["train/update_norm"][1:], rtol=1e-5)
  # pgd_scale: projected in training, then uploaded exactly at the bound.
  _, m_ps = round_jit(state, data._replace(upload=_ua("pgd_scale", 0.25 * free)), key)
  np.testing.assert_allclose(float(m_ps["train/update_norm"][0]), 0.25 * free, rtol=1e-4)
  assert len(traces) == n_traces + (n_traces == 0)  # One program for every attack and window.


@pytest.mark.slow
def test_main_job_runs_an_upload_attack_with_a_window(tmp_path):
  from fedgan_jax import experiment
  from fedgan_jax.io import rundir

  config = tiny_config(num_rounds=3, **{"attack.upload": "sign_flip", "attack.end_round": 2})
  experiment.run(config, str(tmp_path / "run"))
  attack = rundir.read_summary(str(tmp_path / "run"))["attack"]
  assert attack["upload"] == "sign_flip" and attack["upload_strength"] == 1.0
  assert attack["rounds_attacked"] == 2 and attack["end_round"] == 2
  assert "durability_rounds" in attack  # None or a count: the run's one evaluation after round 2 decides.
