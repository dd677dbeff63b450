"""Class-conditional G and D (model.conditional): config, modules, labels through the round, evaluation, a run."""

from __future__ import annotations

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from fedgan_jax import assemble, config_lib, models
from fedgan_jax.data.types import Dataset
from fedgan_jax.federated import client as client_lib
from fedgan_jax.federated import replicas, sharding
from fedgan_jax.federated.state import ClientState
from fedgan_jax.models import dcgan
from fedgan_jax.models import stylegan2 as sg2

COND = {"model.conditional": True}


# --- config and data checks ---------------------------------------------------------------------------------------


def test_config_field_default_and_errors():
  assert tiny_config().model.conditional is False
  assert tiny_config(**COND).model.conditional is True
  raw = config_lib.base_config().to_dict()
  raw["model"]["conditional"] = "yes"
  with pytest.raises(ValueError, match=r"config\.model\.conditional='yes' is invalid: accepted values are False, True"):
    config_lib.validate(ml_collections.ConfigDict(raw))
  with pytest.raises(ValueError, match=r"model\.conditional='yes'"):
    tiny_config(**{"model.conditional": "yes"})  # Refused by the field's type on the command line.


def test_unlabelled_data_is_an_error_naming_the_field_and_the_source(tmp_path):
  # A MedMNIST-style npz without labels: one class.
  path = tmp_path / "x.npz"
  np.savez(path, train_images=np.random.default_rng(0).integers(0, 256, (100, 32, 32), dtype=np.uint8))
  config = tiny_config(**COND, **{"data.source": "npz", "data.path": str(path)})
  with pytest.raises(ValueError, match=r"config\.model\.conditional=True is invalid with data\.source='npz'.*1 class"):
    assemble.setup_data(config)
  assemble.setup_data(config_lib.copy_with(config, {"model.conditional": False}))  # Fine unconditional.
  ds = Dataset(images=np.zeros((4, 32, 32, 3), np.uint8), labels=np.asarray([0, 1, 2, 1], np.int32), num_classes=2)
  with pytest.raises(ValueError, match=r"labels in \[0, 2\], outside the 2 classes"):
    assemble.check_conditional(tiny_config(**COND), ds, {})
  assert assemble.check_conditional(tiny_config(**COND), ds._replace(num_classes=3), {}) == 3
  assert assemble.check_conditional(tiny_config(), ds._replace(num_classes=1), {}) == 0
  # The models need the data's classes.
  with pytest.raises(ValueError, match=r"model\.conditional=True needs the data's number of classes"):
    models.build(tiny_config(**COND))
  assert models.build(tiny_config(**COND), 2)[0].num_classes == 2
  assert models.build(tiny_config(), 2)[0].num_classes == 0  # Ignored when off.


def test_synthetic_data_gives_two_classes_and_labels_in_the_round_data():
  config = tiny_config(**COND)
  data, heldout, info = assemble.setup_data(config)
  assert info["num_classes"] == 2 and heldout.num_classes == 2
  labels = np.asarray(data.labels)
  assert data.labels.dtype == jnp.int32 and labels.shape == data.images.shape[:2]
  assert set(np.unique(labels)) == {0, 1}
  assert assemble.setup_data(tiny_config())[0].labels is None  # Off: nothing carried, nothing traced.


def test_round_data_keeps_labels_only_when_conditional():
  R = 32
  images, labels = np.zeros((2, 5, R, R, 3), np.uint8), np.arange(10).reshape(2, 5) % 2
  assert assemble.round_data(tiny_config(), images, [5, 4], labels=labels).labels is None
  data = assemble.round_data(tiny_config(**COND), images, [5, 4], labels=labels)
  np.testing.assert_array_equal(np.asarray(data.labels), labels)
  assert data.root_labels is None
  with pytest.raises(ValueError, match=r"model\.conditional=True: the client shards' labels must be \[C, n_max\]"):
    assemble.round_data(tiny_config(**COND), images, [5, 4])
  fl = tiny_config(**COND, **{"aggregation.name": "fltrust", "aggregation.kwargs.root_size": 3})
  root = np.zeros((3, R, R, 3), np.uint8)
  with pytest.raises(ValueError, match=r"fltrust'?: the server's root set needs 3 labels"):
    assemble.round_data(fl, images, [5, 4], root=root, labels=labels)
  data = assemble.round_data(fl, images, [5, 4], root=root, labels=labels, root_labels=[1, 0, 1])
  np.testing.assert_array_equal(np.asarray(data.root_labels), [1, 0, 1])
  # Replicas: shorter shards' labels padded (never drawn), and the labels are sharded with the clients.
  short = assemble.round_data(tiny_config(**COND), images[:, :3], [3, 2], labels=labels[:, :3])
  stacked = replicas.stack_replicas([short, data._replace(root=None, root_labels=None)])
  assert stacked.labels.shape == (2, 2, 5) and not np.asarray(stacked.labels[0, :, 3:]).any()
  state = jax.eval_shape(assemble.build_program(tiny_config(**COND), num_classes=2)[0].init, jax.random.key(0))
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), (sharding.CLIENT_AXIS,))
  _, data_sh = sharding.round_shardings(state, data, mesh)
  P = jax.sharding.PartitionSpec
  assert data_sh.labels.spec == P(sharding.CLIENT_AXIS) and data_sh.root_labels.spec == P()  # Replicated.


# --- modules ------------------------------------------------------------------------------------------------------


def _shapes(variables) -> dict[str, tuple]:
  return {jax.tree_util.keystr(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(variables)}


def test_unconditional_modules_build_exactly_their_old_variables():
  """num_classes = 0 builds the same variables as before the option; > 0 adds the embedding (and widens G's input)."""
  nz, y = 5, jnp.asarray([0, 2])
  g0 = dcgan.Generator(resolution=8, width=4, channels=3)
  v0 = _shapes(g0.init(jax.random.key(0), jnp.zeros((2, nz)), train=False))
  assert v0 == {
    "['params']['Dense_0']['kernel']": (nz, 64),
    "['params']['bn0']['scale']": (4,),
    "['params']['bn0']['bias']": (4,),
    "['params']['out']['kernel']": (4, 4, 3, 4),
    "['batch_stats']['bn0']['mean']": (4,),
    "['batch_stats']['bn0']['var']": (4,),
  }
  g3 = dcgan.Generator(resolution=8, width=4, channels=3, num_classes=3)
  v3 = _shapes(g3.init(jax.random.key(0), jnp.zeros((2, nz)), train=False, labels=y))
  assert v3 == {**v0, "['params']['Dense_0']['kernel']": (2 * nz, 64), "['params']['embed']['embedding']": (3, nz)}
  d0 = dcgan.Discriminator(resolution=8, width=2)
  w0 = _shapes(d0.init(jax.random.key(0), jnp.zeros((2, 8, 8, 3)), train=False))
  assert w0 == {"['params']['in']['kernel']": (4, 4, 3, 2), "['params']['logit']['kernel']": (32, 1)}
  d3 = dcgan.Discriminator(resolution=8, width=2, num_classes=3)
  w3 = _shapes(d3.init(jax.random.key(0), jnp.zeros((2, 8, 8, 3)), train=False, labels=y))
  assert w3 == {**w0, "['params']['embed']['embedding']": (3, 32)}
  m0 = _shapes(sg2.MappingNetwork(8, 2).init(jax.random.key(0), jnp.zeros((2, nz)), train=False))
  assert m0 == {
    "['params']['fc0']['kernel']": (nz, 8),
    "['params']['fc0']['bias']": (8,),
    "['params']['fc1']['kernel']": (8, 8),
    "['params']['fc1']['bias']": (8,),
    "['buffers']['w_avg']": (8,),
  }
  m3 = _shapes(
    sg2.MappingNetwork(8, 2, num_classes=3).init(jax.random.key(0), jnp.zeros((2, nz)), train=False, labels=y)
  )
  assert m3 == {
    **m0,
    "['params']['fc0']['kernel']": (nz + 8, 8),
    "['params']['embed']['kernel']": (3, 8),
    "['params']['embed']['bias']": (8,),
  }


def test_label_errors_are_clear():
  g = dcgan.Generator(resolution=8, width=4, num_classes=2)
  z = jnp.zeros((3, 5))
  with pytest.raises(ValueError, match=r"generator is class-conditional .* needs labels, int32 \[3\]"):
    g.init(jax.random.key(0), z, train=False)
  with pytest.raises(ValueError, match=r"labels have shape \(2,\); expected \(3,\)"):
    g.init(jax.random.key(0), z, train=False, labels=jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match=r"discriminator is unconditional .*labels must be None"):
    dcgan.Discriminator(resolution=8, width=2).init(
      jax.random.key(0), jnp.zeros((3, 8, 8, 3)), train=False, labels=jnp.zeros((3,), jnp.int32)
    )
  config = tiny_config(**COND)
  program, _, _ = assemble.build_program(config, num_classes=2)
  g_vars = program.init(jax.random.key(0)).g_global
  with pytest.raises(ValueError, match=r"Program\.sample\(g_vars, z, labels\) needs labels"):
    program.sample(g_vars, jnp.zeros((2, 16)))
  with pytest.raises(ValueError, match=r"labels of shape \(3,\) for 2 latents"):
    program.sample(g_vars, jnp.zeros((2, 16)), jnp.zeros((3,), jnp.int32))
  plain, _, _ = assemble.build_program(tiny_config())
  with pytest.raises(ValueError, match=r"model\.conditional=False: Program\.sample.* takes no labels"):
    plain.sample(plain.init(jax.random.key(0)).g_global, jnp.zeros((2, 16)), jnp.zeros((2,), jnp.int32))


@pytest.mark.parametrize("name", ["dcgan", "stylegan2"])
def test_conditional_generator_output_shape_and_dependence_on_labels(name):
  if name == "dcgan":
    g = dcgan.Generator(resolution=8, width=4, channels=3, num_classes=3)
  else:
    g = sg2.Generator(
      resolution=8,
      channels=3,
      w_dim=8,
      mapping_layers=2,
      channel_base=64,
      channel_max=8,
      noise_mode="const",
      num_classes=3,
    )
  z1 = jax.random.normal(jax.random.key(1), (1, 5))
  z = jnp.repeat(z1, 4, axis=0)  # The same latent with classes 0, 1, 2, 0.
  y = jnp.asarray([0, 1, 2, 0], jnp.int32)
  v = g.init(jax.random.key(0), z, train=False, labels=y)
  out = np.asarray(g.apply(v, z, train=False, labels=y))
  assert out.shape == (4, 8, 8, 3) and np.isfinite(out).all()
  np.testing.assert_allclose(out[0], out[3], rtol=1e-6, atol=1e-6)  # Same (z, y): same image.
  for a, b in ((0, 1), (0, 2), (1, 2)):
    assert np.abs(out[a] - out[b]).max() > 1e-3, (a, b)  # Another class: another image.
  # The label enters only through the embedding: with equal rows the classes give the same image.
  path = ("embed", "embedding") if name == "dcgan" else ("mapping", "embed", "kernel")
  params = jax.tree_util.tree_map_with_path(
    lambda p, x: jnp.broadcast_to(x[:1], x.shape) if tuple(k.key for k in p)[-len(path) :] == path else x,
    v["params"],
  )
  same = np.asarray(g.apply({**v, "params": params}, z, train=False, labels=y))
  np.testing.assert_allclose(same[1], same[0], rtol=1e-5, atol=1e-6)


def test_stylegan2_mapping_embeds_the_class_as_stylegan2_ada_does():
  """w = lrelu-fc(concat(norm(z), norm(embed(one_hot(c))))) with equalized lr, in numpy."""
  nz, wd, k = 3, 4, 3
  m = sg2.MappingNetwork(wd, 1, lr_mult=0.01, num_classes=k)
  z = np.random.default_rng(0).normal(size=(2, nz)).astype(np.float32)
  y = np.asarray([2, 0], np.int32)
  v = m.init(jax.random.key(0), jnp.asarray(z), train=False, labels=jnp.asarray(y))
  p = jax.tree.map(np.asarray, v["params"])
  norm = lambda x: x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-8)
  e = np.eye(k)[y] @ (p["embed"]["kernel"] / math.sqrt(k)) + p["embed"]["bias"]  # lr multiplier 1.
  x = np.concatenate([norm(z), norm(e)], axis=-1)
  h = x @ (p["fc0"]["kernel"] * 0.01 / math.sqrt(nz + wd)) + p["fc0"]["bias"] * 0.01
  want = np.where(h > 0, h, 0.2 * h) * math.sqrt(2.0)
  got = m.apply(v, jnp.asarray(z), train=False, labels=jnp.asarray(y))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init", ["dcgan", "torch"])
def test_projection_discriminator_matches_numpy(init):
  """logit = psi(h) + <embed[y], h> (Miyato & Koyama 2018), h the features psi reads."""
  d = dcgan.Discriminator(resolution=8, width=2, norm="batch", weight_init=init, num_classes=3)
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 3), minval=-1, maxval=1)
  y = jnp.asarray([2, 0, 1, 2], jnp.int32)
  v = d.init(jax.random.key(0), x, train=False, labels=y)
  logits, inter = d.apply(v, x, train=False, labels=y, mutable=["intermediates"])
  h = np.asarray(inter["intermediates"]["features"][0], np.float64)  # [4, 32]
  W = np.asarray(v["params"]["logit"]["kernel"], np.float64)[:, 0]
  E = np.asarray(v["params"]["embed"]["embedding"], np.float64)
  proj = np.array([E[y_i] @ h_i for y_i, h_i in zip(np.asarray(y), h)])
  np.testing.assert_allclose(np.asarray(logits), h @ W + proj, rtol=1e-5, atol=1e-6)
  # The unconditional part is exactly the unconditional D with the same weights.
  plain = dcgan.Discriminator(resolution=8, width=2, norm="batch", weight_init=init)
  params = {k: w for k, w in v["params"].items() if k != "embed"}
  base = np.asarray(plain.apply({**v, "params": params}, x, train=False))
  np.testing.assert_allclose(np.asarray(logits) - base, proj, rtol=1e-5, atol=1e-6)
  assert np.abs(proj).max() > 1e-4  # The term is there at init.
  # The table is initialized as psi's kernel: N(0, 0.02), or U(+-1/sqrt(dim h)) with the torch init.
  if init == "torch":
    assert np.abs(E).max() <= 1 / math.sqrt(32) and np.abs(E).max() > 0.5 / math.sqrt(32)
  else:
    assert 0.01 < E.std() < 0.03


# --- labels through local training --------------------------------------------------------------------------------


class _ConstG(nn.Module):
  """Fakes of constant value 0.3 (whatever the label): D's logit on them reads the fake labels."""

  num_classes: int = 2

  @nn.compact
  def __call__(self, z, train=True, labels=None):
    assert labels is not None and labels.shape == z.shape[:1]
    return jnp.full((z.shape[0], 32, 32, 3), 0.3) * self.param("w", nn.initializers.ones, ())


class _SignD(nn.Module):
  """logit = b * mean(x) * (2 y - 1): +1 on a real image (+-1) seen with its own label, 0.3 (2 y - 1) on fakes."""

  @nn.compact
  def __call__(self, x, train=True, labels=None):
    return self.param("b", nn.initializers.ones, ()) * jnp.mean(x, axis=(1, 2, 3)) * (2.0 * labels - 1.0)


def test_batches_see_their_own_labels_and_fakes_the_clients_label_mix():
  """Real images with their labels (drawn by the same index); fake labels from the client's own labels, never padding.

  WGAN losses, learning rates ~0 and one local step: d_loss = mean(fake logits) - mean(real logits),
  g_loss = -mean(fake logits), with real logits 1 exactly when every image is seen with its own label.
  """
  config = tiny_config(
    **COND,
    **{"train.loss": "wgan", "train.g_lr": 1e-12, "train.d_lr": 1e-12, "train.local_steps": 1, "attack.malicious": ()},
  )
  g, d = _ConstG(), _SignD()
  local_train = jax.jit(client_lib.local_trainer(config, g, d))
  g_vars = g.init(jax.random.key(0), jnp.zeros((2, 16)), labels=jnp.zeros((2,), jnp.int32))
  d_vars = d.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)), labels=jnp.zeros((2,), jnp.int32))
  opt = lambda v: client_lib.optimizer(config, 1e-12).init(v["params"])
  client = ClientState(d_vars=d_vars, g_opt=opt(g_vars), d_opt=opt(d_vars))
  n = 8
  # Client 0: 4 real images of class 1 (white), padded with 4 of class 0 (black) that must never be drawn.
  # Client 1: 8 images, class 1 white and class 0 black, interleaved. Client 2: all class 0.
  shards = {
    0: (np.asarray([1, 1, 1, 1, 0, 0, 0, 0]), 4),
    1: (np.asarray([1, 0, 0, 1, 1, 0, 1, 0]), 8),
    2: (np.zeros(n, int), 8),
  }
  trigger = jnp.zeros((4, 4, 3))
  losses = {}
  for c, (labels, count) in shards.items():
    images = np.broadcast_to((labels * 255).astype(np.uint8)[:, None, None, None], (n, 32, 32, 3))
    out = local_train(
      client,
      g_vars,
      d_vars,
      jnp.asarray(images),
      jnp.int32(count),
      jnp.bool_(False),
      jnp.zeros((n,), bool),
      trigger,
      jnp.asarray([27, 27], jnp.int32),
      jax.random.key(10 + c),
      labels=jnp.asarray(labels, jnp.int32),
    )
    losses[c] = (float(out[3]["d_loss"]), float(out[3]["g_loss"]))
  # Client 0: every fake is class 1 (its own labels, not the padding's): fake logits 0.3; real logits 1.
  assert losses[0] == pytest.approx((0.3 - 1.0, -0.3), abs=1e-6)
  assert losses[2] == pytest.approx((-0.3 - 1.0, 0.3), abs=1e-6)
  # Client 1: d_loss + 1 = 0.3 (2 k / 8 - 1) for k fakes of class 1; a real image seen with the wrong label would
  # add 2/8 per image, which no k can produce (0.075 k + 0.25 m has a unique solution in 0..8).
  k = (losses[1][0] + 1.0) / 0.3 * 4 + 4
  assert abs(k - round(k)) < 1e-4 and 0 <= round(k) <= 8, losses[1]


def test_fltrust_and_replicas_trace_with_labels():
  """The server's root-set training takes the root labels; the replicated sample takes labels."""
  config = tiny_config(**COND, **{"aggregation.name": "fltrust", "aggregation.kwargs.root_size": 4})
  R, rng = config.resolution, np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 8, R, R, 3), dtype=np.uint8)
  data = assemble.round_data(
    config, images, [8, 6], root=images[0, :4], labels=rng.integers(0, 2, (2, 8)), root_labels=[0, 1, 1, 0]
  )
  program, _, _ = assemble.build_program(config, num_classes=2)
  state = jax.eval_shape(program.init, jax.random.key(0))
  new_state, metrics = jax.eval_shape(program.round, state, data, jax.random.key(1))
  assert "agg/server_g_loss" in metrics and jax.tree.structure(new_state) == jax.tree.structure(state)
  with pytest.raises(ValueError, match=r"needs RoundData\.root_labels of 4 class ids"):
    jax.eval_shape(program.round, state, data._replace(root_labels=None), jax.random.key(1))
  with pytest.raises(ValueError, match=r"model\.conditional=True: local training needs the clients' labels"):
    jax.eval_shape(program.round, state, data._replace(labels=None), jax.random.key(1))
  rep = replicas.replicate(program)
  g2 = jax.tree.map(lambda s: jax.ShapeDtypeStruct((2, *s.shape), s.dtype), state.g_global)
  out = jax.eval_shape(rep.sample, g2, jnp.zeros((3, 16)), jnp.zeros((3,), jnp.int32))
  assert out.shape == (2, 3, R, R, 3)


# --- one run ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_conditional_run_writes_per_class_grids_and_finite_metrics(tmp_path):
  from fedgan_jax import experiment
  from fedgan_jax.io import rundir

  config = tiny_config(**COND, num_rounds=1)
  summary = experiment.run(config, str(tmp_path))
  assert summary["data"]["num_classes"] == 2
  rec = rundir.read_records(str(tmp_path / "metrics.jsonl"))[-1]
  for key in ("eval/swd", "eval/diversity", "eval/implant_amplitude", "eval/implant_above_p99"):
    assert math.isfinite(rec[key]), key
  assert np.isfinite(rec["train/g_loss"]).all() and np.isfinite(rec["train/d_loss"]).all()
  assert rec["eval/nonfinite_samples"] == 0
  # The downstream utility and membership metrics of the final evaluation (metrics/utility.py, membership.py).
  for key in ("eval/tstr_acc", "eval/tstr_bacc", "eval/trtr_acc", "eval/trigger_transfer", "eval/mia_auc"):
    assert 0.0 <= rec[key] <= 1.0, key
  assert summary["eval_references"]["utility"]["num_classes"] == 2
  load = lambda *p: np.asarray(Image.open(os.path.join(tmp_path, "samples", *p)), np.int16)
  main = load("round_000001.png")
  per_class = [load(f"class_{k}", "round_000001.png") for k in range(2)]
  assert all(g.shape == main.shape for g in per_class)
  # Row i of the main grid is class i % 2 (same noise): it equals row i of that class's grid.
  R, scale = config.resolution, max(1, 128 // config.resolution)  # io.images.grid's 2 px padding, upscaled.
  for i in range(config.eval.grid_size):
    band = slice(scale * (2 + i * (R + 2)), scale * (2 + i * (R + 2) + R))
    assert np.abs(main[band] - per_class[i % 2][band]).max() <= 1, i
  assert np.abs(per_class[0] - per_class[1]).max() > 0  # The classes differ.
