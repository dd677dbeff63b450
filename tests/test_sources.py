"""Tests for fedgan_jax.data.sources: every source, layout, conversion and error."""

from __future__ import annotations

import io
import json
import os
import sys
import types
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image

from fedgan_jax.data import images as images_lib
from fedgan_jax.data import partition as partition_lib
from fedgan_jax.data import sources

# Solid colours per class, far apart so JPEG noise cannot confuse them.
COLOURS = [(220, 30, 30), (30, 220, 30), (30, 30, 220), (220, 220, 30)]


def make_config(tmp_path: Path, **data) -> ml_collections.ConfigDict:
  """A config with every field ``load_data`` reads; ``data`` overrides."""
  cfg = ml_collections.ConfigDict()
  cfg.resolution = 8
  cfg.seed = 0
  cfg.num_clients = 2
  cfg.train = ml_collections.ConfigDict(dict(batch_size=2))
  cfg.data = ml_collections.ConfigDict(
    dict(
      source="folder",
      path="",
      labels_csv="",
      channels=3,
      num_images=16,
      heldout=0,
      skip_unreadable=False,
      cache_dir=str(tmp_path / "cache"),
      tfds_name="",
      tfds_split="train",
      tfds_data_dir="",
      image_key="image",
      label_key="label",
      partition="iid",
      alpha=0.5,
      group_column="",
    )
  )
  cfg.data.update(data)
  return cfg


def save(path: Path, colour, size=(12, 10), mode="RGB") -> None:
  """Writes a solid image (format from the suffix); size is (W, H)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  img = Image.new(mode, size, colour)
  img.save(path, quality=95) if path.suffix.lower() in (".jpg", ".jpeg") else img.save(path)


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
  path.write_text("\n".join(",".join(str(c) for c in r) for r in [header] + rows) + "\n")
  return path


def colour_class(images: np.ndarray) -> np.ndarray:
  """Index into COLOURS of each (solid) image's mean colour."""
  mean = images.reshape(len(images), -1, 3).mean(axis=1)
  dist = ((mean[:, None, :] - np.array(COLOURS)[None]) ** 2).sum(-1)
  return dist.argmin(axis=1)


# ----------------------------------------------------------------------------
# Conversion golden checks.


def _striped(h: int, w: int) -> np.ndarray:
  """Red left quarter, blue right quarter, 2x2 blocks of distinct values between."""
  a = np.zeros((h, w, 3), np.uint8)
  a[:, : w // 4] = (255, 0, 0)
  a[:, w - w // 4 :] = (0, 0, 255)
  return a


def test_center_crop_keeps_middle_exactly():
  a = _striped(4, 8)
  mid = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3) * 3
  a[:, 2:6] = mid
  out = sources.convert_image(Image.fromarray(a), 4, 3)  # no resize: exact crop
  np.testing.assert_array_equal(out, mid)
  tall = np.ascontiguousarray(a.transpose(1, 0, 2))  # 8x4: crop keeps middle rows
  out = sources.convert_image(Image.fromarray(tall), 4, 3)
  np.testing.assert_array_equal(out, tall[2:6])


def test_center_crop_then_resize_golden():
  a = _striped(4, 8)
  blocks = np.array([[[10, 20, 30], [40, 50, 60]], [[70, 80, 90], [100, 110, 120]]], np.uint8)
  a[:, 2:6] = np.repeat(np.repeat(blocks, 2, axis=0), 2, axis=1)
  out = sources.convert_image(Image.fromarray(a), 2, 3, resample=Image.Resampling.NEAREST)
  np.testing.assert_array_equal(out, blocks)
  # LANCZOS (the package default) on a uniform crop: exact, no red/blue leak.
  a[:, 2:6] = (0, 200, 0)
  out = sources.convert_image(Image.fromarray(a), 2, 3)
  np.testing.assert_array_equal(out, np.full((2, 2, 3), (0, 200, 0), np.uint8))


def test_channel_conversions():
  gray = Image.fromarray(np.full((6, 6), 77, np.uint8), "L")
  np.testing.assert_array_equal(sources.convert_image(gray, 6, 3), np.full((6, 6, 3), 77, np.uint8))
  for colour, luma in [((255, 0, 0), 76), ((0, 255, 0), 150), ((0, 0, 255), 29)]:
    rgb = Image.new("RGB", (6, 6), colour)
    np.testing.assert_array_equal(sources.convert_image(rgb, 6, 1), np.full((6, 6, 1), luma, np.uint8))
  deep = Image.fromarray(np.full((6, 6), 257 * 100, np.uint16))
  assert deep.mode.startswith("I;16")
  np.testing.assert_array_equal(sources.convert_image(deep, 6, 1), np.full((6, 6, 1), 100, np.uint8))


# ----------------------------------------------------------------------------
# folder


def test_folder_flat_unlabeled_with_grayscale_png(tmp_path):
  root = tmp_path / "imgs"
  for i in range(6):
    save(root / f"img_{i}.png", COLOURS[i % 2])
  save(root / "gray.png", 128, mode="L")
  save(root / ".hidden.png", 0)  # ignored
  (root / "notes.txt").write_text("not an image")
  cfg = make_config(tmp_path, path=str(root), heldout=2)
  train, held, info = sources.load_data(cfg)
  assert train.images.shape == (5, 8, 8, 3) and held.images.shape == (2, 8, 8, 3)
  assert train.images.dtype == np.uint8 and train.labels.dtype == np.int32
  assert train.num_classes == 1 and not train.labels.any()
  assert info["label_source"] == "none" and info["num_files"] == 7
  allimg = np.concatenate([train.images, held.images])
  grays = [im for im in allimg if (im == 128).all()]
  assert len(grays) == 1  # replicated into 3 equal channels
  json.dumps(info)  # serialisable for summary.json


def test_folder_nested_grayscale_channels_1(tmp_path):
  root = tmp_path / "ham"
  for part in ("HAM10000_images_part_1", "HAM10000_images_part_2"):
    for i in range(3):
      save(root / part / f"{part[-1]}_{i}.jpg", (255, 0, 0))
  cfg = make_config(tmp_path, path=str(root), channels=1)
  train, _, info = sources.load_data(cfg)
  assert train.images.shape == (6, 8, 8, 1)
  assert info["label_source"] == "none"
  assert np.all(np.abs(train.images.astype(int) - 76) <= 3)  # luma of red


def test_folder_split_class_layout(tmp_path):
  root = tmp_path / "ds"
  names = {"mel": 0, "nv": 1}
  for split, n in (("train", 3), ("test", 2)):
    for cls, ci in names.items():
      for i in range(n):
        save(root / split / cls / f"{split}_{cls}_{i}.png", COLOURS[ci])
  train, _, info = sources.load_data(make_config(tmp_path, path=str(root)))
  assert info["label_source"] == "folders"
  assert train.class_names == ("mel", "nv") and train.num_classes == 2
  np.testing.assert_array_equal(colour_class(train.images), train.labels)
  assert info["class_counts"] == [5, 5]


def _isic2019(tmp_path):
  root = tmp_path / "ISIC_2019_Training_Input"
  header = ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
  rows = []
  for i in range(8):
    k = i % 3
    save(root / f"ISIC_{i:07d}.jpg", COLOURS[k])
    rows.append([f"ISIC_{i:07d}"] + [f"{float(j == k):.1f}" for j in range(9)])
  return root, header, rows


def test_folder_csv_isic2019_one_hot(tmp_path):
  root, header, rows = _isic2019(tmp_path)
  save(root / "ISIC_9999999.jpg", COLOURS[0])  # no CSV row: dropped
  rows.append(["ISIC_1234567"] + ["1.0"] + ["0.0"] * 8)  # no file: warned
  csv = write_csv(tmp_path / "ISIC_2019_Training_GroundTruth.csv", header, rows)
  cfg = make_config(tmp_path, path=str(root), labels_csv=str(csv))
  with pytest.warns(UserWarning, match="ISIC_1234567"):
    train, _, info = sources.load_data(cfg)
  assert info["label_source"] == "csv:isic2019"
  assert train.class_names == tuple(header[1:]) and train.num_classes == 9
  assert len(train.labels) == 8
  np.testing.assert_array_equal(colour_class(train.images), train.labels)
  assert info["images_without_csv_row"] == 1
  assert info["num_csv_missing_images"] == 1
  assert info["csv_missing_images"] == ["ISIC_1234567"]


def test_folder_csv_isic2020_with_groups(tmp_path):
  root = tmp_path / "train"
  header = [
    "image_name",
    "patient_id",
    "sex",
    "age_approx",
    "anatom_site_general_challenge",
    "diagnosis",
    "benign_malignant",
    "target",
  ]
  sites = ["torso", "head/neck", "", "torso", "lower extremity", ""]
  rows = []
  for i, site in enumerate(sites):
    save(root / f"ISIC_{i:07d}.jpg", COLOURS[i % 2])
    rows.append([f"ISIC_{i:07d}", f"IP_{i}", "male", 45, site, "unknown", ["benign", "malignant"][i % 2], i % 2])
  csv = write_csv(tmp_path / "train.csv", header, rows)
  cfg = make_config(tmp_path, path=str(root), labels_csv=str(csv), group_column="anatom_site_general_challenge")
  train, _, info = sources.load_data(cfg)
  assert info["label_source"] == "csv:isic2020"
  assert train.class_names == ("benign", "malignant")
  np.testing.assert_array_equal(train.labels, np.arange(6) % 2)
  assert info["group_names"] == ["(missing)", "head/neck", "lower extremity", "torso"]
  np.testing.assert_array_equal(train.groups, [3, 1, 0, 3, 2, 0])


def test_folder_csv_ham10000_by_group(tmp_path):
  root = tmp_path / "HAM10000"
  header = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset"]
  dx = ["nv", "mel", "bkl", "nv", "mel", "nv", "bkl", "nv"]
  rows = []
  for i, d in enumerate(dx):
    part = "HAM10000_images_part_1" if i < 4 else "HAM10000_images_part_2"
    save(root / part / f"ISIC_{i:07d}.jpg", COLOURS[["bkl", "mel", "nv"].index(d)])
    rows.append([f"HAM_{i}", f"ISIC_{i:07d}", d, "histo", 50, "female", "back", ["vidir_modern", "rosendahl"][i % 2]])
  csv = write_csv(tmp_path / "HAM10000_metadata.csv", header, rows)
  # A relative labels_csv is also looked up under data.path.
  (root / "HAM10000_metadata.csv").write_text(csv.read_text())
  cfg = make_config(tmp_path, path=str(root), labels_csv="HAM10000_metadata.csv", group_column="dataset")
  train, _, info = sources.load_data(cfg)
  assert info["label_source"] == "csv:ham10000"
  assert train.class_names == ("bkl", "mel", "nv")
  np.testing.assert_array_equal(colour_class(train.images), train.labels)
  assert info["group_names"] == ["rosendahl", "vidir_modern"]
  clients = partition_lib.partition(train, 2, "by_group", seed=0)
  np.testing.assert_array_equal(clients.counts, [4, 4])
  with pytest.raises(ValueError, match=r"3 groups|2 groups.*num_clients=3"):
    partition_lib.partition(train, 3, "by_group", seed=0)


def test_csv_errors(tmp_path):
  root, header, rows = _isic2019(tmp_path)
  other = write_csv(tmp_path / "none.csv", header, [["OTHER_1"] + ["1.0"] + ["0.0"] * 8])
  with pytest.raises(ValueError, match="None of the 1 images named in data.labels_csv"):
    sources.load_data(make_config(tmp_path, path=str(root), labels_csv=str(other)))
  meta = write_csv(tmp_path / "meta.csv", ["img", "age"], [["ISIC_0000000", 40]])
  with pytest.raises(ValueError, match=r"data.labels_csv=.*columns \['img', 'age'\].*no known layout"):
    sources.load_data(make_config(tmp_path, path=str(root), labels_csv=str(meta)))
  good = write_csv(tmp_path / "gt.csv", header, rows)
  with pytest.raises(ValueError, match=r"data.group_column='site'.*columns found"):
    sources.load_data(make_config(tmp_path, path=str(root), labels_csv=str(good), group_column="site"))
  with pytest.raises(ValueError, match="data.group_column='site' needs data.labels_csv"):
    sources.load_data(make_config(tmp_path, path=str(root), group_column="site"))
  with pytest.raises(FileNotFoundError, match="data.labels_csv='missing.csv'"):
    sources.load_data(make_config(tmp_path, path=str(root), labels_csv="missing.csv"))


def test_folder_generic_csv(tmp_path):
  root = tmp_path / "x"
  for i in range(4):
    save(root / f"a{i}.png", COLOURS[i % 2])
  csv = write_csv(tmp_path / "labels.csv", ["filename", "label"], [[f"a{i}.png", i % 2] for i in range(4)])
  train, _, info = sources.load_data(make_config(tmp_path, path=str(root), labels_csv=str(csv)))
  assert info["label_source"] == "csv:generic" and train.num_classes == 2
  np.testing.assert_array_equal(colour_class(train.images), train.labels)


def _truncated_jpeg(path: Path) -> None:
  buf = io.BytesIO()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
  path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_folder_unreadable_files(tmp_path):
  root = tmp_path / "imgs"
  for i in range(4):
    save(root / f"ok_{i}.png", COLOURS[0])
  _truncated_jpeg(root / "broken.jpg")
  (root / "garbage.png").write_bytes(b"this is not a png")
  cfg = make_config(tmp_path, path=str(root))
  with pytest.raises(
    ValueError,
    match=r"2 image file\(s\).*broken.jpg.*garbage.png"
    r".*data.skip_unreadable=True",
  ):
    sources.load_data(cfg)
  cfg.data.skip_unreadable = True
  with pytest.warns(UserWarning, match="skipped 2 unreadable"):
    train, _, info = sources.load_data(cfg)
  assert len(train.images) == 4
  assert info["num_skipped_unreadable"] == 2
  assert info["skipped_unreadable"] == ["broken.jpg", "garbage.png"]
  # The cache remembers the skipped files: turning skipping off fails again.
  cfg.data.skip_unreadable = False
  with pytest.raises(ValueError, match="broken.jpg"):
    sources.load_data(cfg)


def test_folder_missing_or_empty(tmp_path):
  with pytest.raises(FileNotFoundError, match="data.path=.*is not a directory"):
    sources.load_data(make_config(tmp_path, path=str(tmp_path / "nope")))
  (tmp_path / "empty" / "sub").mkdir(parents=True)
  (tmp_path / "empty" / "readme.txt").write_text("x")
  with pytest.raises(FileNotFoundError, match="data.path=.*contains no"):
    sources.load_data(make_config(tmp_path, path=str(tmp_path / "empty")))
  with pytest.raises(ValueError, match="data.path is empty"):
    sources.load_data(make_config(tmp_path, path=""))


def test_folder_cache_hit_skips_decoding(tmp_path, monkeypatch):
  root = tmp_path / "imgs"
  for i in range(5):
    save(root / f"im{i}.png", COLOURS[i % 3])
  cfg = make_config(tmp_path, path=str(root), heldout=1)
  train1, held1, info1 = sources.load_data(cfg)
  assert not info1["cache_hit"] and Path(info1["cache_path"]).is_file()

  def boom(*args, **kwargs):
    raise RuntimeError("decoded despite the cache")

  monkeypatch.setattr(images_lib, "decode_image", boom)
  train2, held2, info2 = sources.load_data(cfg)
  assert info2["cache_hit"]
  np.testing.assert_array_equal(train1.images, train2.images)
  np.testing.assert_array_equal(held1.images, held2.images)
  # A changed file (new mtime) is a new key: the (patched) decoder runs again.
  os.utime(root / "im0.png", ns=(1, 1))
  with pytest.raises(RuntimeError, match="decoded despite"):
    sources.load_data(cfg)
  # So does another resolution.
  os.utime(root / "im0.png", ns=(1, 1))
  cfg.resolution = 4
  with pytest.raises(RuntimeError, match="decoded despite"):
    sources.load_data(cfg)


# ----------------------------------------------------------------------------
# npz


def test_npz_grayscale_and_rgb(tmp_path):
  rng = np.random.default_rng(0)
  gray = tmp_path / "pneumoniamnist.npz"
  np.savez(
    gray,
    train_images=rng.integers(0, 255, (10, 28, 28), dtype=np.uint8),
    train_labels=(np.arange(10) % 2).reshape(-1, 1),
    val_images=rng.integers(0, 255, (3, 28, 28), dtype=np.uint8),
    val_labels=np.zeros((3, 1)),
    test_images=rng.integers(0, 255, (5, 28, 28), dtype=np.uint8),
    test_labels=(np.arange(5) % 2).reshape(-1, 1),
  )
  cfg = make_config(tmp_path, source="npz", path=str(gray), heldout=4)
  train, held, info = sources.load_data(cfg)
  assert train.images.shape == (10, 8, 8, 3) and held.images.shape == (4, 8, 8, 3)
  np.testing.assert_array_equal(train.labels, np.arange(10) % 2)
  assert train.num_classes == 2 and info["heldout_from"] == "test"
  assert np.all(train.images[..., 0] == train.images[..., 2])  # replicated gray

  images = rng.integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
  rgb = tmp_path / "dermamnist.npz"
  np.savez(rgb, train_images=images, train_labels=np.arange(6).reshape(-1, 1))
  cfg = make_config(tmp_path, source="npz", path=str(rgb), heldout=2)
  train, held, info = sources.load_data(cfg)  # same size: no resize, exact
  assert info["heldout_from"] == "train (random)"
  assert len(train.images) == 4 and len(held.images) == 2
  for img, lab in zip(train.images, train.labels):
    np.testing.assert_array_equal(img, images[lab])
  cfg.data.channels = 1
  train, _, _ = sources.load_data(cfg)
  assert train.images.shape == (4, 8, 8, 1)


def test_npz_errors(tmp_path):
  bad = tmp_path / "bad.npz"
  np.savez(bad, x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.zeros(2))
  with pytest.raises(ValueError, match=r"no 'train_images'; keys found: \['x_train', 'y_train'\]"):
    sources.load_data(make_config(tmp_path, source="npz", path=str(bad)))
  with pytest.raises(FileNotFoundError, match="data.path=.*not a file"):
    sources.load_data(make_config(tmp_path, source="npz", path=str(tmp_path / "no.npz")))
  small = tmp_path / "small.npz"
  np.savez(small, train_images=np.zeros((4, 8, 8), np.uint8), test_images=np.zeros((2, 8, 8), np.uint8))
  with pytest.raises(ValueError, match="data.heldout=3 but 'test_images'.*only 2"):
    sources.load_data(make_config(tmp_path, source="npz", path=str(small), heldout=3))
  floats = tmp_path / "floats.npz"
  np.savez(floats, train_images=np.zeros((4, 8, 8), np.float32))
  with pytest.raises(ValueError, match="dtype float32"):
    sources.load_data(make_config(tmp_path, source="npz", path=str(floats)))


# ----------------------------------------------------------------------------
# synthetic


def test_synthetic_split(tmp_path, monkeypatch):
  fake = types.ModuleType("fedgan_jax.data.synthetic")
  calls = []

  def make_synthetic(num_images, resolution, seed, channels=3):
    calls.append((num_images, resolution, seed, channels))
    images = np.broadcast_to(
      np.arange(num_images, dtype=np.uint8)[:, None, None, None], (num_images, resolution, resolution, channels)
    ).copy()
    return images, (np.arange(num_images) % 3).astype(np.int32)

  fake.make_synthetic = make_synthetic
  fake.NUM_CLASSES = 3
  fake.CLASS_NAMES = ("a", "b", "c")
  monkeypatch.setitem(sys.modules, "fedgan_jax.data.synthetic", fake)
  cfg = make_config(tmp_path, source="synthetic", num_images=10, heldout=4, channels=1)
  cfg.seed = 7
  train, held, info = sources.load_data(cfg)
  assert calls == [(14, 8, 7, 1)]
  assert train.images.shape == (10, 8, 8, 1) and held.images.shape == (4, 8, 8, 1)
  np.testing.assert_array_equal(train.images[:, 0, 0, 0], np.arange(10))
  np.testing.assert_array_equal(held.images[:, 0, 0, 0], np.arange(10, 14))
  assert train.class_names == ("a", "b", "c") and info["num_classes"] == 3


def test_synthetic_real_module_if_present(tmp_path):
  pytest.importorskip("fedgan_jax.data.synthetic")
  cfg = make_config(tmp_path, source="synthetic", num_images=6, heldout=2)
  cfg.resolution = 32
  train, held, info = sources.load_data(cfg)
  assert train.images.shape == (6, 32, 32, 3) and held.images.shape == (2, 32, 32, 3)
  assert train.num_classes == info["num_classes"] >= 1


# ----------------------------------------------------------------------------
# tfds (a tiny ArrayRecord dataset built without TensorFlow)


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
  tfds = pytest.importorskip("tensorflow_datasets")
  data_dir = tmp_path_factory.mktemp("tfds")

  with tfds.core.registered.skip_registration():

    class FedganTinyDs(tfds.core.GeneratorBasedBuilder):  # pylint: disable=unused-variable
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict(
            {
              "image": tfds.features.Image(shape=(12, 10, 3)),
              "label": tfds.features.ClassLabel(names=["benign", "malignant"]),
            }
          ),
        )

      def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(6)}

      def _generate_examples(self, n):
        for i in range(n):
          buf = io.BytesIO()  # pre-encoded PNG: encoding arrays would need TF
          Image.fromarray(np.full((12, 10, 3), COLOURS[i % 2], np.uint8)).save(buf, "PNG")
          yield i, {"image": buf.getvalue(), "label": i % 2}

    FedganTinyDs(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_array_record(tmp_path, tiny_tfds, monkeypatch):
  cfg = make_config(tmp_path, source="tfds", tfds_name="fedgan_tiny_ds", tfds_data_dir=str(tiny_tfds), heldout=2)
  train, held, info = sources.load_data(cfg)
  assert train.images.shape == (4, 8, 8, 3) and held.images.shape == (2, 8, 8, 3)
  assert train.class_names == ("benign", "malignant")
  np.testing.assert_array_equal(colour_class(train.images), train.labels)
  assert info["file_format"] == "array_record" and not info["cache_hit"]
  monkeypatch.setattr(images_lib, "convert_image", lambda *a, **k: 1 / 0)
  _, _, info = sources.load_data(cfg)
  assert info["cache_hit"]


def test_tfds_errors(tmp_path, tiny_tfds, monkeypatch):
  cfg = make_config(tmp_path, source="tfds", tfds_name="fedgan_tiny_ds", tfds_data_dir=str(tiny_tfds), image_key="img")
  with pytest.raises(ValueError, match=r"data.image_key='img'.*features found: \['image', 'label'\]"):
    sources.load_data(cfg)
  cfg = make_config(tmp_path, source="tfds", tfds_name="fedgan_not_there_ds", tfds_data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="data.tfds_name='fedgan_not_there_ds'"):
    sources.load_data(cfg)
  # A dataset stored as TFRecord needs TensorFlow: a clear error without it.
  import shutil  # pylint: disable=g-import-not-at-top

  copy = tmp_path / "tfrec"
  shutil.copytree(tiny_tfds, copy)
  info_json = copy / "fedgan_tiny_ds" / "1.0.0" / "dataset_info.json"
  meta = json.loads(info_json.read_text())
  meta["fileFormat"] = "tfrecord"
  info_json.write_text(json.dumps(meta))
  monkeypatch.setitem(sys.modules, "tensorflow", None)
  cfg = make_config(tmp_path, source="tfds", tfds_name="fedgan_tiny_ds", tfds_data_dir=str(copy))
  with pytest.raises(RuntimeError, match=r"needs TensorFlow.*pip install -e \"\.\[tfds\]\""):
    sources.load_data(cfg)


# ----------------------------------------------------------------------------
# Common errors.


def test_common_errors(tmp_path):
  with pytest.raises(ValueError, match=r"data.source='hdf5'.*\['folder', 'npz', 'synthetic', 'tfds'\]"):
    sources.load_data(make_config(tmp_path, source="hdf5"))
  with pytest.raises(ValueError, match="data.channels=2"):
    sources.load_data(make_config(tmp_path, channels=2))
  root = tmp_path / "imgs"
  for i in range(3):
    save(root / f"{i}.png", COLOURS[0])
  with pytest.raises(ValueError, match="data.heldout=3 must be >= 0 and leave"):
    sources.load_data(make_config(tmp_path, path=str(root), heldout=3))


def test_check_enough(tmp_path):
  cfg = make_config(tmp_path)
  cfg.num_clients, cfg.train.batch_size = 4, 32
  ds = sources.Dataset(images=np.zeros((100, 8, 8, 3), np.uint8), labels=np.zeros(100, np.int32))
  with pytest.raises(
    ValueError,
    match=r"100 training images.*num_clients=4 x "
    r"train.batch_size=32 = 128",
  ):
    sources.check_enough(ds, cfg)
  cfg.train.batch_size = 25
  sources.check_enough(ds, cfg)
