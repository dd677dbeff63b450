"""The latent-trigger backdoor of the generator (attack.latent_trigger): the term, config, the round, a run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import tiny_config
from fedgan_jax import assemble, config_lib
from fedgan_jax.data import triggers
from fedgan_jax.federated import latent_trigger as lt
from fedgan_jax.federated import upload_attacks as ua_lib


def _window(start=1, end=0, every=1) -> ua_lib.UploadAttack:
  i32 = lambda v: jnp.asarray(v, jnp.int32)
  return ua_lib.UploadAttack(kind=i32(0), strength=jnp.float32(0.0), start=i32(start), end=i32(end), every=i32(every))


def test_masked_term_matches_numpy_on_a_hand_made_case():
  """mask_i * weight * mean((G_i(z*) - x*)^2) for a toy G_i(z) = tanh(z W_i): attackers in the window only."""
  rng = np.random.default_rng(0)
  C, nz = 4, 3
  W = rng.normal(size=(C, nz, 4)).astype(np.float32)  # Client i's "generator": 2x2x1 images.
  z = np.asarray([0.5, -1.0, 2.0], np.float32)
  x = np.asarray([[1.0, -1.0], [-1.0, 1.0]], np.float32)[..., None]  # x*: a 2x2 checkerboard.
  weight = 7.5
  is_mal = np.asarray([True, False, True, False])
  ua = _window(start=3, end=7, every=2)  # Rounds 3, 5, 7.

  def term(w, attacking):
    g = jnp.tanh(jnp.asarray(z)[None] @ w).reshape(1, 2, 2, 1)
    return lt.loss_term(attacking, jnp.float32(weight), lt.distance(g, jnp.asarray(x))[0])

  value_and_grad = jax.jit(jax.vmap(jax.value_and_grad(term), in_axes=(0, 0)))
  attacked = ua_lib.window_rounds(3, 7, 2, 10)
  assert attacked.tolist() == [3, 5, 7]
  for done in range(10):  # ``done`` rounds completed: this is round done + 1.
    attacking = jnp.asarray(is_mal) & ua_lib.in_window(ua, jnp.int32(done))
    values, grads = value_and_grad(jnp.asarray(W), attacking)
    mask = is_mal & (done + 1 in attacked)
    ref = mask * weight * np.mean((np.tanh(z @ W) - x.reshape(-1)) ** 2, axis=1)
    np.testing.assert_allclose(np.asarray(values), ref, rtol=1e-5, atol=0)
    grads = np.asarray(grads)
    assert (grads[~mask] == 0).all()  # Honest clients (and attackers outside the window): exactly nothing.
    if mask.any():
      # d/dW of weight * mean((tanh(zW) - x)^2) = weight * 2/4 * z^T ((tanh(zW) - x) * (1 - tanh^2)).
      t = np.tanh(z @ W[mask])
      ref_g = weight * 0.5 * z[None, :, None] * ((t - x.reshape(-1)) * (1 - t**2))[:, None, :]
      np.testing.assert_allclose(grads[mask], ref_g, rtol=1e-4, atol=1e-6)
  # The per-image distance of several images.
  imgs = rng.uniform(-1, 1, (3, 2, 2, 1)).astype(np.float32)
  np.testing.assert_allclose(
    np.asarray(lt.distance(jnp.asarray(imgs), jnp.asarray(x))), ((imgs - x) ** 2).mean(axis=(1, 2, 3)), rtol=1e-6
  )
  m = lt.eval_metrics(imgs[:1], imgs, x)
  assert m["eval/latent_trigger_dist"] == pytest.approx(float(((imgs[0] - x) ** 2).mean()))
  assert m["eval/latent_clean_dist"] == pytest.approx(float(np.median(((imgs - x) ** 2).mean(axis=(1, 2, 3)))))


def test_secret_latent_and_target_are_fixed_by_the_config():
  config = tiny_config(**{"attack.latent_trigger": True})
  nz, R = config.model.latent_dim, config.resolution
  z0 = lt.secret_latent(0, nz)
  assert z0.shape == (nz,) and z0.dtype == np.float32
  np.testing.assert_array_equal(z0, lt.secret_latent(0, nz))  # Deterministic from the seed.
  assert not np.allclose(z0, lt.secret_latent(1, nz))
  # Not a latent the run draws elsewhere (its keys come from split(key(seed), 3)).
  for k in jax.random.split(jax.random.key(0), 3):
    assert not np.allclose(z0, np.asarray(jax.random.normal(k, (nz,))))
  x = lt.target_image(config)
  assert x.shape == (R, R, 3) and set(np.unique(x)) <= {-1.0, 1.0}  # The default pattern, full size.
  np.testing.assert_array_equal(x, triggers.default_trigger(R, 3))
  unit = lt.target_image(config_lib.copy_with(config, {"attack.trigger_range": "unit"}))
  assert unit.min() >= 0.0 and unit.max() <= 1.0  # In the range the trigger is pasted.
  latent = lt.from_config(config)
  np.testing.assert_array_equal(np.asarray(latent.z), z0)
  assert float(latent.weight) == 100.0  # The default attack.latent_weight.
  assert lt.from_config(tiny_config()) is None  # Off by default: nothing in RoundData, nothing traced.
  data = assemble.round_data(config, np.zeros((2, 8, R, R, 3), np.uint8), [8, 8])
  assert data.latent is not None and assemble.round_data(tiny_config(), data.images, [8, 8]).latent is None


def test_config_errors_name_field_value_and_what_is_accepted():
  for value in (0.0, -1.0, float("nan"), float("inf")):
    with pytest.raises(ValueError, match=r"config\.attack\.latent_weight=.* is invalid: must be a finite number > 0"):
      tiny_config(**{"attack.latent_weight": value})
  with pytest.raises(ValueError, match=r"attack\.latent_trigger='yes'"):
    tiny_config(**{"attack.latent_trigger": "yes"})  # Refused by the field's type on the command line.
  # A config built from a dict (no field types): the validator says it.
  raw = config_lib.base_config().to_dict()
  raw["attack"]["latent_trigger"] = "yes"
  with pytest.raises(ValueError, match=r"config\.attack\.latent_trigger='yes' is invalid: must be True or False"):
    config_lib.validate(ml_collections.ConfigDict(raw))
  raw["attack"]["latent_trigger"], raw["attack"]["latent_weight"] = True, "big"
  with pytest.raises(ValueError, match=r"config\.attack\.latent_weight='big' is invalid"):
    config_lib.validate(ml_collections.ConfigDict(raw))
  # A clean run may carry the flag: it measures the clean reference of both distances.
  assert tiny_config(**{"attack.latent_trigger": True, "attack.malicious": ()}).attack.latent_trigger


@pytest.fixture(scope="module")
def latent_program():
  """(config, program, jitted round, RoundData, traces): conftest's tiny_program with the latent backdoor on."""
  config = tiny_config(num_clients=3, **{"attack.latent_trigger": True})
  program, _, _ = assemble.build_program(config)
  rng = np.random.default_rng(0)
  R = config.resolution
  data = assemble.round_data(config, rng.integers(0, 256, (3, 16, R, R, 3), dtype=np.uint8), [16, 12, 16])
  traces = []

  def counted(state, data, key):
    traces.append(1)
    return program.round(state, data, key)

  return config, program, jax.jit(counted), data, traces


@pytest.mark.slow
def test_one_program_serves_attackers_windows_and_weights(latent_program, tiny_program):
  """One trace: attackers, window, weight and z* are array inputs; with no attacker, the round without the feature."""
  config, program, round_jit, data, traces = latent_program
  _, _, off_jit, off_data, _ = tiny_program
  np.testing.assert_array_equal(np.asarray(data.images), np.asarray(off_data.images))
  assert off_data.latent is None
  state = program.init(jax.random.key(1))
  nobody = jnp.zeros(3, bool)
  # No attacker: the term is traced but masked everywhere, and the round is the one of the program without it.
  clean, m_clean = round_jit(state, data._replace(is_malicious=nobody), jax.random.key(2))
  off, m_off = off_jit(state, off_data._replace(is_malicious=nobody), jax.random.key(2))
  for a, b in zip(jax.tree.leaves(clean), jax.tree.leaves(off)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  assert set(m_clean) - set(m_off) == {"train/latent_dist"}  # Logged, never reported to the server.
  # Outside the window (rounds 2..) the attacker trains as an honest client: the round equals a clean one.
  later, _ = round_jit(state, data._replace(upload=_window(start=2)), jax.random.key(2))
  for a, b in zip(jax.tree.leaves(later), jax.tree.leaves(clean)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # 30 rounds with and without the attacker (weight 1e3; ~3 s): the attacker's own G(z*) is pulled to x*
  # furthest, the honest clients' generators of the last round less (only through the global model).
  heavy = data._replace(latent=data.latent._replace(weight=jnp.float32(1e3)))
  s_att, s_cln = state, state
  for r in range(30):
    s_att, m = round_jit(s_att, heavy, jax.random.key(r))
    s_cln, m_cln = round_jit(s_cln, heavy._replace(is_malicious=nobody), jax.random.key(r))
  d, d_cln = np.asarray(m["train/latent_dist"]), np.asarray(m_cln["train/latent_dist"])
  assert d[0] < min(d[1:]) - 0.02 and max(d[1:]) < min(d_cln) - 0.05, (d, d_cln)
  # Another z*, other attackers, a window with a period: the same program.
  other = data.latent._replace(z=jnp.asarray(lt.secret_latent(7, config.model.latent_dim)))
  round_jit(state, data._replace(latent=other, is_malicious=jnp.asarray([False, True, True])), jax.random.key(3))
  round_jit(state, data._replace(upload=_window(start=1, end=5, every=2)), jax.random.key(3))
  assert len(traces) == 1


@pytest.mark.slow
def test_the_main_job_implants_the_latent_trigger(tmp_path):
  """Two rounds of configs/test.py: with a heavily weighted attacker, G_global(z*) moves to x*; without, it does not."""
  from fedgan_jax import experiment
  from fedgan_jax.io import rundir

  common = {
    "attack.latent_trigger": True,
    "attack.latent_weight": 100.0,
    "attack.poison_rate": 0.0,  # The latent backdoor alone.
    "attack.upload": "scale",  # Model replacement (gamma = C): the global model takes the attacker's update.
    "train.local_steps": 20,
    "train.g_lr": 1e-3,
  }
  finals = {}
  for name, malicious in (("clean", ()), ("attack", (0,))):
    config = tiny_config(**common, **{"attack.malicious": malicious})
    experiment.run(config, str(tmp_path / name))
    summary = rundir.read_summary(str(tmp_path / name))
    finals[name] = summary["final"]
    records = rundir.read_records(str(tmp_path / name / "metrics.jsonl"))
    assert all("eval/latent_trigger_dist" in r and "eval/latent_clean_dist" in r for r in records)
  clean, attack = finals["clean"], finals["attack"]
  # Without the attack G(z*) is as far from x* as any sample; with it, specifically closer.
  assert clean["eval/latent_trigger_dist"] == pytest.approx(clean["eval/latent_clean_dist"], abs=0.02)
  assert attack["eval/latent_trigger_dist"] < 0.8 * clean["eval/latent_trigger_dist"]
  assert attack["eval/latent_trigger_dist"] < attack["eval/latent_clean_dist"] - 0.1
  assert attack["train/latent_dist"][0] < min(attack["train/latent_dist"][1:])
