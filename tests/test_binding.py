"""Tests of eval/digits.py (the committed digit classifier) and eval/binding.py (prompt-binding scores)."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from data import captions as C
from data.mnist import load_mnist
from eval import binding, digits

N_COMPOSED = 300  # ground-truth canvases scored per test: seconds on 2 CPU cores


@pytest.fixture(scope='module')
def mnist_test():
  x, y = load_mnist('test[:1000]')
  return np.asarray(x), np.asarray(y)


@pytest.fixture(scope='module')
def composed():
  src = C.composed_digits('test', seed=0)
  images = np.stack([src[i]['image'] for i in range(N_COMPOSED)])  # [N, 64, 64, 3]
  return images, [src.objects(i) for i in range(N_COMPOSED)]


def test_committed_weights_are_small():
  assert os.path.getsize(digits.WEIGHTS) < 1_000_000
  model = digits.load_digit_classifier()
  assert model is digits.load_digit_classifier()  # cached
  assert sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))) <= 200_000


def test_classifier_accuracy_on_mnist(mnist_test):
  x, y = mnist_test
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))  # [N, 32, 32, 1]
  assert np.mean(digits.classify(x) == y) >= 0.98
  assert np.mean(digits.classify(padded) == y) >= 0.98
  assert np.mean(digits.classify(np.repeat(padded, 3, axis=-1)) == y) >= 0.98  # RGB: max over channels
  big = np.repeat(np.repeat(x[:200], 2, axis=1), 2, axis=2)  # [200, 56, 56, 1]: resized to 28
  assert np.mean(digits.classify(big) == y[:200]) >= 0.97
  assert digits.classify(x[:3], batch_size=2).shape == (3,)


def test_classifier_rejects_bad_input():
  with pytest.raises(ValueError, match='uint8'):
    digits.classify(np.zeros((2, 28, 28, 1), np.float32))
  with pytest.raises(FileNotFoundError, match='weights not found'):
    digits.load_digit_classifier('/nonexistent/weights.safetensors')


def test_score_digits(mnist_test):
  x, y = mnist_test
  right = binding.score_digits(x, y)
  assert right['digit_accuracy'] >= 0.98 and right['num_images'] == 1000
  assert len(right['per_digit_accuracy']) == 10 and min(right['per_digit_accuracy']) >= 0.9
  wrong = binding.score_digits(x, (y + 1) % 10)
  assert wrong['digit_accuracy'] <= 0.02
  few = binding.score_digits(x[:5], y[:5])
  assert sum(np.isnan(few['per_digit_accuracy'])) == 10 - len(set(y[:5].tolist()))


def test_captioned_mnist_images_show_their_caption(mnist_test):
  src = C.captioned_mnist('test[:300]', image_size=32, num_channels=1, seed=0)
  images = np.stack([src[i]['image'] for i in range(300)])
  caption_digits = src.digit_of_caption[[src[i]['label'] for i in range(300)]]
  assert binding.score_digits(images, caption_digits)['digit_accuracy'] >= 0.98


def test_score_composed_on_ground_truth(composed):
  images, objects = composed
  s = binding.score_composed(images, objects)
  print('score_composed on ground truth:', json.dumps(s))
  assert s['num_objects'] == 2 * N_COMPOSED and s['num_images'] == N_COMPOSED
  assert s['colour_accuracy'] >= 0.99 and s['digit_accuracy'] >= 0.95 and s['empty_rate'] == 0
  assert s['bleed_rate'] <= 0.01 and s['colour_bleed_rate'] <= 0.01 and s['digit_bleed_rate'] <= 0.01
  assert s['both_correct'] >= 0.9
  # Prompted objects in another order give the same scores: objects are matched by side.
  assert binding.score_composed(images, [o[::-1] for o in objects]) == s


def test_score_composed_detects_bleed(composed):
  images, objects = composed
  colours_swapped = [[(l[0], r[1], 'left'), (r[0], l[1], 'right')] for l, r in objects]
  s = binding.score_composed(images, colours_swapped)
  assert s['colour_bleed_rate'] >= 0.99 and s['colour_accuracy'] <= 0.01 and s['bleed_rate'] >= 0.99
  assert s['digit_accuracy'] >= 0.95 and s['digit_bleed_rate'] <= 0.01
  digits_swapped = [[(r[0], l[1], 'left'), (l[0], r[1], 'right')] for l, r in objects]
  s = binding.score_composed(images, digits_swapped)
  assert s['digit_bleed_rate'] >= 0.95 and s['colour_bleed_rate'] == 0 and s['colour_accuracy'] >= 0.99


def test_score_composed_empty_and_single_object(composed):
  images, objects = composed
  blank = np.zeros((2, 64, 64, 3), np.uint8)
  s = binding.score_composed(blank, objects[:2])
  assert s['empty_rate'] == 1 and s['colour_accuracy'] == 0 and s['digit_accuracy'] == 0 and s['bleed_rate'] == 0
  left_only = images[:4].copy()
  left_only[:, :, 32:] = 0
  seen = binding.detect_objects(left_only)
  assert all(o[1] == (-1, 'none', 'right') for o in seen)
  assert binding.score_composed(left_only, objects[:4])['empty_rate'] == 0.5
  white = np.repeat(images[:2].max(-1, keepdims=True), 3, axis=-1)  # colourless digits
  assert [o[1] for o in binding.detect_objects(white)[0]] == ['none', 'none']
  with pytest.raises(ValueError, match='one object on each side'):
    binding.score_composed(images[:1], [[(1, 'red', 'left'), (2, 'blue', 'left')]])
  with pytest.raises(ValueError, match='one object list per image'):
    binding.score_composed(images[:2], objects[:1])


def test_plot_vs_guidance(tmp_path):
  rows = [{'guidance': g, 'sampler': s, 'digit_accuracy': 0.5 + g / 20, 'colour_accuracy': 0.9}
          for g in (1.0, 3.0, 2.0) for s in ('ddim', 'heun')]
  path = str(tmp_path / 'plots' / 'binding.png')
  binding.plot_vs_guidance(rows, path, ['digit_accuracy', 'colour_accuracy'], series='sampler')
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with pytest.raises(ValueError, match='rows lack'):
    binding.plot_vs_guidance(rows, path, ['bleed_rate'])
