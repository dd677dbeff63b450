"""metrics.utility (TSTR/TRTR, trigger transfer) and its wiring into the Evaluator, with eval/mia_auc."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from conftest import tiny_config, tiny_evaluator
from fedgan_jax import assemble
from fedgan_jax.data import triggers
from fedgan_jax.data.types import Dataset
from fedgan_jax.metrics import utility

# ---------------------------------------------------------------- metric formulas


def _random_case(seed: int, k: int):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(20, 80))
  labels = np.r_[np.arange(k), rng.integers(0, k, n - k)]  # Every class present (scikit-learn's OvR needs it).
  logits = np.round(rng.normal(size=(n, k)), 1)  # Rounded: ties in the scores.
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  return labels, probs


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [2, 3, 5])
def test_metrics_equal_scikit_learn(seed, k):
  labels, probs = _random_case(seed, k)
  got = utility.classification_metrics(labels, probs)
  pred = probs.argmax(1)
  assert got["acc"] == pytest.approx(accuracy_score(labels, pred), abs=1e-12)
  assert got["bacc"] == pytest.approx(balanced_accuracy_score(labels, pred), abs=1e-12)
  want_auc = roc_auc_score(labels, probs[:, 1]) if k == 2 else roc_auc_score(labels, probs, multi_class="ovr")
  assert got["auc"] == pytest.approx(want_auc, abs=1e-12)


def test_metrics_by_hand():
  labels = np.array([0, 0, 0, 1])
  probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
  m = utility.classification_metrics(labels, probs)
  # Predictions 0, 0, 1, 1: 3 of 4 right; recalls 2/3 and 1; class 1's score 0.7 beats 0.1, 0.2, 0.6.
  assert m == {"acc": 0.75, "bacc": pytest.approx((2 / 3 + 1) / 2), "auc": 1.0}
  # A predicted class absent from the labels: scikit-learn drops it from the mean (and warns); so do we.
  labels, pred = np.array([0, 0, 1]), np.array([0, 2, 1])
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    assert utility.balanced_accuracy(labels, pred) == pytest.approx(balanced_accuracy_score(labels, pred)) == 0.75
  assert np.isnan(utility.roc_auc(np.zeros(4, int), np.full((4, 2), 0.5)))  # One class: undefined.


def test_downsample_is_block_mean():
  x = np.arange(2 * 4 * 4 * 1, dtype=np.float32).reshape(2, 4, 4, 1)
  got = np.asarray(utility.downsample(x, 2))
  assert got[0, :, :, 0].tolist() == [[2.5, 4.5], [10.5, 12.5]]
  assert utility.downsample(x, 0) is x and utility.downsample(x, 8) is x


# ---------------------------------------------------------------- the classifier


def _templates(k: int, r: int) -> np.ndarray:
  """One fixed coarse random pattern per class (the same in every set)."""
  coarse = np.random.default_rng(123).choice([-0.6, 0.6], size=(k, 4, 4, 3))
  return coarse.repeat(r // 4, axis=1).repeat(r // 4, axis=2).astype(np.float32)


def _separable(n: int, r: int, seed: int, k: int = 8, informative: bool = True):
  """Images of their class's pattern plus noise (or of an independently drawn class's, when not informative).

  With K classes, a classifier trained on uninformative images maps each pattern to a class at random: its
  expected accuracy is 1/K, and many classes keep a single draw near it.
  """
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % k
  shown = labels if informative else rng.integers(0, k, n)
  x = _templates(k, r)[shown] + 0.3 * rng.normal(size=(n, r, r, 3))
  return np.clip(x, -1, 1).astype(np.float32), labels.astype(np.int32)


def test_classifier_learns_is_deterministic_and_compiles_once():
  x, y = _separable(128, 16, 0)
  tx, ty = _separable(96, 16, 1)
  fns = utility._fns(8, 16, 64, 1e-3)
  before = fns.step._cache_size()
  m1, c1 = utility.train_and_test(x, y, tx, ty, 8, jax.random.PRNGKey(0), steps=40)
  m2, c2 = utility.train_and_test(x, y, tx, ty, 8, jax.random.PRNGKey(0), steps=40)
  assert m1 == m2 and m1["acc"] > 0.9 and m1["auc"] > 0.95
  jax.tree.map(np.testing.assert_array_equal, c1.params, c2.params)
  assert fns.step._cache_size() - before <= 1  # One shape, one compilation, however many trainings.
  noise, ny = _separable(128, 16, 2, informative=False)
  chance, _ = utility.train_and_test(noise, ny, tx, ty, 8, jax.random.PRNGKey(0), steps=40)
  assert chance["bacc"] < 0.4  # 1/8 is chance.


def test_classifier_rejects_bad_inputs():
  x, y = _separable(8, 8, 0, k=2)
  with pytest.raises(ValueError, match="at least 2 classes"):
    utility.train_classifier(x, y, 1, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
    utility.train_classifier(x, y + 1, 2, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="N labels"):
    utility.train_classifier(x, y[:3], 2, jax.random.PRNGKey(0))


# ---------------------------------------------------------------- trigger transfer


def _reads_region(top: int, left: int, s: int):
  """A fake classifier: class 1 iff the s x s region at (top, left) is bright on average."""

  def apply(images):
    mean = images[:, top : top + s, left : left + s].mean(axis=(1, 2, 3))
    return jnp.stack([jnp.zeros_like(mean), 10.0 * mean], -1)

  return utility.Classifier(None, 2, apply, 0.0)


def test_trigger_transfer_by_hand():
  r, s, loc = 16, 4, (10, 9)
  images = -np.ones((6, r, r, 3), np.float32)  # Dark: every clean prediction is class 0.
  labels = np.array([0, 0, 0, 0, 1, 1])
  trigger = np.ones((s, s, 3), np.float32)
  # The classifier reads exactly where the trigger goes: every prediction flips to class 1.
  out = utility.trigger_transfer(_reads_region(*loc, s), images, labels, trigger, loc, target_class=1)
  assert out == {"flip_rate": 1.0, "target_rate": 1.0}
  # It reads elsewhere: nothing moves.
  out = utility.trigger_transfer(_reads_region(0, 0, s), images, labels, trigger, loc, target_class=1)
  assert out == {"flip_rate": 0.0, "target_rate": 0.0}
  # Half of the images already bright there: only the other half flips; target 0 is never hit.
  images[:3, 10:14, 9:13] = 1.0
  out = utility.trigger_transfer(_reads_region(*loc, s), images, labels, trigger, loc, target_class=0)
  assert out == {"flip_rate": 0.5, "target_rate": 0.0}
  # Per-image locations, and the classifier's input pooled to 8 px (the region lands on whole 2x2 blocks).
  per_image = np.tile(np.array([[10, 8]]), (6, 1))
  pooled = utility.trigger_transfer(_reads_region(5, 4, 2), -np.ones_like(images), labels, trigger, per_image, None, 8)
  assert pooled == {"flip_rate": 1.0}


# ---------------------------------------------------------------- the Evaluator


def _evaluator(config, sample_fn, members: Dataset, heldout: Dataset, tmp_path, target_class=-1):
  return tiny_evaluator(config, sample_fn, heldout, tmp_path, members=members, target_class=target_class)


def _uint8(x):
  return np.round((np.asarray(x) + 1.0) * 127.5).astype(np.uint8)


def test_evaluator_utility_with_a_fake_conditional_generator(tmp_path):
  config = tiny_config(
    **{
      "model.conditional": True,
      "eval.utility_samples": 96,
      "eval.utility_steps": 100,
      "eval.utility_resolution": 0,
      "attack.trigger_size": 8,
    }
  )
  r, k = config.resolution, 8
  x, y = _separable(128, r, 3, k)
  tx, ty = _separable(64, r, 4, k)
  members = Dataset(_uint8(x), y, num_classes=k)
  heldout = Dataset(_uint8(tx), ty, num_classes=k)
  patterns = jnp.asarray(_templates(k, r))
  trigger, loc = jnp.asarray(triggers.load_trigger(config)), triggers.trigger_location(config)
  bank = jnp.asarray(0.3 * np.random.default_rng(5).normal(size=(256, r, r, 3)), jnp.float32)  # As _separable's.

  def conditional(g_vars, z, labels):
    # g_vars = 1: the label picks the pattern; 0: an independent draw does; 2: as 1, but class 1's images are a
    # drawn pattern with the trigger pasted (a backdoored generator: the trigger, not the pattern, means class 1).
    pick = lambda u, n: jnp.clip(jnp.floor(jax.scipy.stats.norm.cdf(u) * n), 0, n - 1).astype(jnp.int32)
    backdoor = (g_vars > 1.5) & (labels == 1)
    shown = jnp.where((g_vars > 0.5) & ~backdoor, labels, pick(z[:, 0], k))
    return triggers.paste(jnp.clip(patterns[shown] + bank[pick(z[:, 1], len(bank))], -1, 1), trigger, loc, backdoor)

  ev = _evaluator(config, conditional, members, heldout, tmp_path, target_class=1)
  good = ev(jnp.float32(1.0), 2, final=True)
  assert good["eval/tstr_acc"] > 0.9 and good["eval/tstr_auc"] > 0.95
  assert good["eval/trtr_acc"] > 0.9 and 0.0 <= good["eval/trigger_transfer"] <= 1.0
  assert {"eval/trigger_transfer_real", "eval/trigger_target_rate", "eval/trigger_target_rate_real"} <= set(good)
  assert "eval/mia_auc" in good  # Every run, conditional or not.
  assert ev(jnp.float32(1.0), 1).keys().isdisjoint({"eval/tstr_acc"})  # utility_every = 0: final evaluation only.
  bad = ev(jnp.float32(0.0), 2, final=True)
  assert bad["eval/tstr_bacc"] < 0.4  # Labels carry nothing: chance is 1/8.
  assert bad["eval/trtr_acc"] == good["eval/trtr_acc"]  # The real side is computed once, the same.
  planted = ev(jnp.float32(2.0), 2, final=True)
  # The trigger moves held-out predictions toward class 1 (about half: a pattern that never came with the
  # trigger in the 12 planted images keeps its class); it moves none for the clean generator or real training.
  assert planted["eval/trigger_target_rate"] > 0.4 and planted["eval/trigger_transfer"] > 0.3
  assert good["eval/trigger_transfer"] < 0.1 and planted["eval/trigger_transfer_real"] < 0.1
  assert ev.references["utility"]["train_images"] == 96
  # Off: no utility keys, nothing trained.
  off = _evaluator(
    tiny_config(**{"model.conditional": True, "eval.utility_every": -1}), conditional, members, heldout, tmp_path
  )
  assert not any(k.startswith(("eval/tstr", "eval/trtr", "eval/trigger_t")) for k in off(jnp.float32(1.0), 2, True))


def test_evaluator_membership_inference(tmp_path):
  config = tiny_config(**{"eval.mia_samples": 48})  # extractor 'none': pixel distances.
  r = config.resolution
  rng = np.random.default_rng(6)
  real = rng.integers(0, 256, (160, r, r, 3), dtype=np.uint8)
  members = Dataset(real[:64], np.zeros(64, np.int32))
  heldout = Dataset(real[64:128], np.zeros(64, np.int32))
  fresh = real[128:]  # Images of the same distribution that are neither members nor non-members.
  as_float = lambda u: jnp.asarray(u.astype(np.float32) / 127.5 - 1.0)
  sample_fn = lambda g_vars, z: jnp.take(g_vars, jnp.arange(len(z)) % len(g_vars), axis=0)
  ev = _evaluator(config, sample_fn, members, heldout, tmp_path)
  assert ev.references["membership"] == {"members": 48, "nonmembers": 48, "space": "pixels"}
  assert ev(as_float(real[:48]), 2, final=True)["eval/mia_auc"] == 1.0  # It returns the members themselves.
  assert 0.3 < ev(as_float(fresh), 2, final=True)["eval/mia_auc"] < 0.7
  assert "eval/mia_auc" not in ev(as_float(fresh), 1)  # fid_every = 0: with the feature metrics, at the end.
  none = _evaluator(tiny_config(**{"eval.mia_samples": 0}), sample_fn, members, heldout, tmp_path)
  assert "eval/mia_auc" not in none(as_float(fresh), 2, final=True)


def test_clean_members_skip_poisoned_padding_and_duplicates():
  images = np.arange(2 * 4, dtype=np.uint8).reshape(2, 4, 1, 1, 1).repeat(2, axis=2)
  images[1, 0] = images[0, 1]  # The same image at two clients (data.partition='full').
  labels = np.arange(8).reshape(2, 4)
  flags = np.array([[True, False, False, False], [False, False, False, False]])
  got = assemble.clean_members(images, labels, [4, 3], flags, 100, seed=0)
  # Client 0: images 1..3 (0 poisoned); client 1: 0..2 (3 is padding), its 0 a copy of client 0's 1.
  assert len(got.images) == 5 and sorted(got.images[:, 0, 0, 0].tolist()) == [1, 2, 3, 5, 6]
  assert {int(i) - int(lab) for i, lab in zip(got.images[:, 0, 0, 0], got.labels)} <= {0, -3}
  assert len(assemble.clean_members(images, labels, [4, 3], flags, 2, seed=0).images) == 2
