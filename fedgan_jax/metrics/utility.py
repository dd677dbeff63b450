"""Downstream utility of generated images: train on synthetic, test on real (TSTR), and trigger transfer.

TSTR / TRTR (Esteban, Hyland & Rätsch, "Real-valued (Medical) Time Series
Generation with Recurrent Conditional GANs", 2017; the usual utility measure
of medical-image GANs): a small classifier is trained on N labelled images a
conditional generator made and tested on held-out real images (TSTR); the
same classifier, from the same initialisation and the same batch draws, is
trained on N real training images with the same labels and tested on the
same held-out images (TRTR). TSTR near TRTR = the synthetic set is as useful
for the downstream task as the real one.

Trigger transfer asks whether a backdoor planted in the generator reaches a
model trained on its output. The TSTR classifier (trained on the generator's
images) predicts held-out real images with and without the trigger pasted
(``data.triggers.paste``, the function the attacker's clients use):

* ``flip_rate`` -- the fraction of test images whose predicted class changes
  when the trigger is pasted (needs no target class);
* ``target_rate`` -- BadNets' attack success rate (Gu, Dolan-Gavitt & Garg,
  "BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply
  Chain", 2017): among test images whose true class is not the target class,
  the fraction predicted as the target once the trigger is pasted.

A classifier trained on clean real images gives both numbers' floor: pasting
any patch over part of an image moves some predictions by itself.

The classifier is a four-layer CNN (three 3x3 convs with average pooling, a
linear head), trained with Adam on random mini-batches for a fixed number of
steps: a few seconds on a CPU at 32 px. Training is deterministic given its
PRNG key, and each jitted function is built once per hyperparameter set and
compiled once per input shape (the evaluation of a run never recompiles it).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedgan_jax.data import triggers
from fedgan_jax.metrics.membership import auc as _mann_whitney_auc


class SmallCNN(nn.Module):
  """Three conv + ReLU + 2x2 average-pool stages and a linear head on the flattened map (no BatchNorm: pure)."""

  num_classes: int
  width: int = 16

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for mult in (1, 2, 4):
      x = nn.relu(nn.Conv(self.width * mult, (3, 3))(x))
      x = nn.avg_pool(x, (2, 2), (2, 2)) if min(x.shape[1:3]) >= 2 else x
    # Flattened, not globally pooled: a small trigger at a fixed place stays a feature of its own.
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class _Fns(NamedTuple):
  init: Any  # (key, images[1, H, W, ch]) -> (params, opt_state)
  step: Any  # (params, opt_state, images, labels, key) -> (params, opt_state, loss)
  logits: Any  # (params, images) -> f32[B, num_classes]


@functools.cache
def _fns(num_classes: int, width: int, batch_size: int, learning_rate: float) -> _Fns:
  """The jitted functions of one hyperparameter set, built once (jit then compiles once per input shape)."""
  model = SmallCNN(num_classes, width)
  tx = optax.adam(learning_rate)

  def init(key, example):
    params = model.init(key, example)["params"]
    return params, tx.init(params)

  def step(params, opt_state, images, labels, key):
    # Batches drawn by index inside jit: the training images stay on the device.
    idx = jax.random.randint(key, (batch_size,), 0, images.shape[0])
    x, y = images[idx], labels[idx]

    def loss_fn(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def logits(params, images):
    return model.apply({"params": params}, images)

  return _Fns(jax.jit(init), jax.jit(step), jax.jit(logits))


class Classifier(NamedTuple):
  """A trained classifier: ``apply(images) -> logits f32[N, num_classes]``."""

  params: Any
  num_classes: int
  apply: Any
  final_loss: float


def train_classifier(
  images,
  labels,
  num_classes: int,
  key: jax.Array,
  steps: int = 300,
  batch_size: int = 64,
  learning_rate: float = 1e-3,
  width: int = 16,
) -> Classifier:
  """Trains ``SmallCNN`` with Adam on random mini-batches of ``(images, labels)``.

  Args:
    images: float ``[N, H, W, ch]`` in [-1, 1].
    labels: int ``[N]`` in ``[0, num_classes)``.
    num_classes: classes of the head (>= 2).
    key: PRNG key: the initialisation and every batch draw (deterministic given it).
    steps: Adam steps.
    batch_size: images per step (drawn with replacement).
    learning_rate: Adam's step size.
    width: channels of the first conv (doubled at each stage).

  Returns:
    The trained ``Classifier``.

  Raises:
    ValueError: fewer than 2 classes, no images, mismatched lengths, labels
      out of range, or a non-positive ``steps`` / ``batch_size``.
  """
  x = jnp.asarray(images, jnp.float32)
  y = np.asarray(labels)
  if num_classes < 2:
    raise ValueError(f"utility: a classifier needs at least 2 classes, got num_classes={num_classes}.")
  if x.ndim != 4 or not len(x) or len(x) != len(y):
    raise ValueError(f"utility: need images [N, H, W, ch] and N labels, got {x.shape} and {y.shape}.")
  if y.min() < 0 or y.max() >= num_classes:
    raise ValueError(f"utility: labels must be in [0, {num_classes}), got [{y.min()}, {y.max()}].")
  if steps < 1 or batch_size < 1:
    raise ValueError(f"utility: steps={steps} and batch_size={batch_size} must be positive.")
  fns = _fns(int(num_classes), int(width), int(batch_size), float(learning_rate))
  k_init, k_steps = jax.random.split(key)
  params, opt_state = fns.init(k_init, x[:1])
  y_dev = jnp.asarray(y, jnp.int32)
  loss = jnp.float32(jnp.nan)
  # A Python loop of one jitted step: a conv weight gradient inside a rolled scan is XLA:CPU's slow path
  # (docs/design.md, platform notes), and the step costs a few ms at 32 px.
  for s in range(steps):
    params, opt_state, loss = fns.step(params, opt_state, x, y_dev, jax.random.fold_in(k_steps, s))
  return Classifier(params, int(num_classes), functools.partial(fns.logits, params), float(loss))


def predict_proba(classifier: Classifier, images, batch: int = 512) -> np.ndarray:
  """``f64[N, num_classes]`` softmax probabilities of ``images`` (float [-1, 1])."""
  x = jnp.asarray(images, jnp.float32)
  parts = [np.asarray(jax.nn.softmax(classifier.apply(x[i : i + batch]), -1)) for i in range(0, len(x), batch)]
  return np.concatenate(parts).astype(np.float64) if parts else np.zeros((0, classifier.num_classes))


def balanced_accuracy(labels: np.ndarray, pred: np.ndarray) -> float:
  """Mean over the classes present in ``labels`` of each class's recall (scikit-learn's ``balanced_accuracy_score``)."""
  labels, pred = np.asarray(labels), np.asarray(pred)
  recalls = [np.mean(pred[labels == c] == c) for c in np.unique(labels)]
  return float(np.mean(recalls))


def roc_auc(labels: np.ndarray, probs: np.ndarray) -> float:
  """ROC AUC of class scores ``probs [N, K]``.

  Binary (``K = 2``): the AUC of the positive class's score, class 1 positive
  (scikit-learn's ``roc_auc_score(labels, probs[:, 1])``). Multi-class: the
  unweighted mean over the classes present in ``labels`` of each class's
  one-vs-rest AUC (``roc_auc_score(..., multi_class='ovr', average='macro')``).
  Ties count one half (Mann-Whitney). NaN when ``labels`` hold a single class.
  """
  labels, probs = np.asarray(labels), np.asarray(probs, np.float64)
  present = np.unique(labels)
  if len(present) < 2:
    return float("nan")
  if probs.shape[1] == 2:
    return _mann_whitney_auc(probs[labels == 1, 1], probs[labels != 1, 1])
  return float(np.mean([_mann_whitney_auc(probs[labels == c, c], probs[labels != c, c]) for c in present]))


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
  """``{'acc', 'bacc', 'auc'}`` of class scores ``probs [N, K]`` (prediction = argmax) against ``labels [N]``."""
  labels = np.asarray(labels)
  pred = np.argmax(probs, axis=-1)
  return {
    "acc": float(np.mean(pred == labels)),
    "bacc": balanced_accuracy(labels, pred),
    "auc": roc_auc(labels, probs),
  }


def evaluate(classifier: Classifier, images, labels) -> dict[str, float]:
  """Accuracy, balanced accuracy and ROC AUC of ``classifier`` on ``(images, labels)``."""
  return classification_metrics(labels, predict_proba(classifier, images))


def train_and_test(
  train_images, train_labels, test_images, test_labels, num_classes: int, key: jax.Array, **train_kwargs
) -> tuple[dict[str, float], Classifier]:
  """A classifier trained on ``train_*``, tested on ``test_*``: TSTR with synthetic training images, TRTR with real.

  Args:
    train_images, train_labels: the training set (float [-1, 1], int labels).
    test_images, test_labels: held-out real images and labels.
    num_classes: classes.
    key: the classifier's key: TSTR and TRTR pass the same one, so only the
      training images differ.
    **train_kwargs: ``steps``, ``batch_size``, ``learning_rate``, ``width``
      of ``train_classifier``.

  Returns:
    ``({'acc', 'bacc', 'auc'}, classifier)``.
  """
  clf = train_classifier(train_images, train_labels, num_classes, key, **train_kwargs)
  return evaluate(clf, test_images, test_labels), clf


def trigger_transfer(
  classifier: Classifier,
  images,
  labels,
  trigger,
  location,
  target_class: int | None = None,
  downsample_to: int = 0,
) -> dict[str, float]:
  """How a classifier's predictions on real images move when the trigger is pasted (module docstring).

  Args:
    classifier: e.g. the TSTR classifier (trained on a generator's images).
    images: float ``[N, H, W, ch]`` real test images in [-1, 1], at the run's resolution.
    labels: int ``[N]`` their true classes.
    trigger: float ``[s, s, ch]``, pasted as the attacker's clients paste it.
    location: ``(top, left)`` or int ``[N, 2]`` per image.
    target_class: the class the backdoor is read toward; None = no target rate.
    downsample_to: the classifier's input side (``downsample``; 0 = as given).

  Returns:
    ``{'flip_rate'}``, plus ``'target_rate'`` when ``target_class`` is given
    and some test image is of another class (NaN otherwise).
  """
  x = jnp.asarray(images, jnp.float32)
  pasted = triggers.paste(x, jnp.asarray(trigger, jnp.float32), jnp.asarray(location), jnp.ones(len(x), bool))
  clean_pred = np.argmax(predict_proba(classifier, downsample(x, downsample_to)), -1)
  trig_pred = np.argmax(predict_proba(classifier, downsample(pasted, downsample_to)), -1)
  out = {"flip_rate": float(np.mean(clean_pred != trig_pred))}
  if target_class is not None:
    other = np.asarray(labels) != target_class
    out["target_rate"] = float(np.mean(trig_pred[other] == target_class)) if other.any() else float("nan")
  return out


def downsample(images, side: int):
  """Images average-pooled to ``side x side`` (a power-of-two factor); unchanged when ``side`` is 0 or not smaller.

  The classifier's cost is then the same at every run resolution.
  """
  n, h, w, ch = np.shape(images)
  if not side or side >= h:
    return images
  if h % side or w % side:
    raise ValueError(f"utility: cannot pool {h}x{w} images to {side} px (not a divisor).")
  f = h // side
  x = jnp.asarray(images, jnp.float32).reshape(n, side, f, w // f, f, ch)
  return x.mean(axis=(2, 4))
