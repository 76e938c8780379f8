"""Tests of data/captions.py: captioned MNIST, the composed two-digit dataset, benchmark prompts."""

import re

import numpy as np
import pytest

from data import DataError
from data import captions as C
from data.mnist import load_mnist


def _mentions(caption: str, digit: int) -> bool:
  return bool(re.search(rf'\b({digit}|{C.DIGIT_WORDS[digit]})\b', caption))


# ------------------------------------------------------------------------------------ MNIST captions


def test_mnist_caption_set():
  caps = C.mnist_captions()
  assert 80 <= len(caps) <= 120 and len(set(caps)) == len(caps)
  assert caps == C.mnist_captions()  # fixed
  src = C.captioned_mnist('test[:10]')
  assert src.captions == caps and src.num_classes == len(caps)
  assert src.digit_of_caption.shape == (len(caps),)
  for caption, digit in zip(caps, src.digit_of_caption):
    assert _mentions(caption, digit) and sum(_mentions(caption, d) for d in range(10)) == 1, caption
  assert 'an image of an 8' in caps and 'a handwritten eight' in caps


def test_captioned_mnist_items():
  x, y = load_mnist('test[:200]')
  src = C.captioned_mnist('test[:200]', image_size=28, num_channels=1, seed=3)
  assert len(src) == 200
  labels = np.array([src[i]['label'] for i in range(200)])
  assert labels.dtype == np.int32
  np.testing.assert_array_equal(src.digit_of_caption[labels], y)  # the caption names the drawn digit
  np.testing.assert_array_equal(src[7]['image'], x[7])
  assert len(np.unique(labels // 10)) == len(C.MNIST_TEMPLATES)  # templates vary
  again = C.captioned_mnist('test[:200]', seed=3)
  np.testing.assert_array_equal([again[i]['label'] for i in range(200)], labels)
  other = C.captioned_mnist('test[:200]', seed=4)
  assert not np.array_equal([other[i]['label'] for i in range(200)], labels)
  padded = C.captioned_mnist('test[:5]', image_size=32, num_channels=3)[0]['image']
  assert padded.shape == (32, 32, 3) and padded.dtype == np.uint8


def test_digit_prompts():
  prompts, digits = C.digit_prompts(50, seed=1)
  assert len(prompts) == 50 and np.array_equal(np.bincount(digits, minlength=10), np.full(10, 5))
  assert set(prompts) <= set(C.mnist_captions())
  assert all(_mentions(p, d) for p, d in zip(prompts, digits))
  assert C.digit_prompts(50, seed=1)[0] == prompts and C.digit_prompts(50, seed=2)[0] != prompts


# ------------------------------------------------------------------------------------ composed digits


def test_composed_caption_set():
  caps = C.composed_captions()
  assert len(caps) <= 20_000 and len(set(caps)) == len(caps)
  for i in range(0, len(caps), 997):
    ld, lc, rd, rc, t = C._decode(i)
    assert C.caption_index(ld, lc, rd, rc, t) == i
    assert C.parse_caption(caps[i]) == [(ld, lc, 'left'), (rd, rc, 'right')]
  assert C.parse_caption('a red 3 on the left and a blue 7 on the right') == [(3, 'red', 'left'), (7, 'blue', 'right')]
  assert C.parse_caption('a blue 7 on the right and a red 3 on the left') == [(3, 'red', 'left'), (7, 'blue', 'right')]
  assert C.parse_caption('left: a red 3, right: a blue 7') == [(3, 'red', 'left'), (7, 'blue', 'right')]
  with pytest.raises(DataError, match='not a composed_digits caption'):
    C.parse_caption('a purple 3 on the left and a blue 7 on the right')
  with pytest.raises(DataError, match='must differ'):
    C.caption_index(1, 'red', 2, 'red', 0)


def _half_colours(image: np.ndarray, side: int) -> set[tuple[int, int, int]]:
  """The colours of the lit pixels of one half, each normalised by its brightest channel."""
  half = image[:, side * 32:(side + 1) * 32].reshape(-1, 3).astype(np.int64)
  lit = half[half.max(-1) >= 128]
  return {tuple((p * 255 // p.max()) // 128 * 255) for p in lit}


def test_composed_items_match_captions():
  src = C.composed_digits('test', seed=0)
  assert len(src) == 10_000 and src.num_classes == len(src.captions) == len(C.composed_captions())
  for i in range(40):
    item = src[i]
    image, label = item['image'], int(item['label'])
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and item['label'].dtype == np.int32
    objects = src.objects(i)
    assert C.parse_caption(src.captions[label]) == objects
    (ld, lc, _), (rd, rc, _) = objects
    caption = src.captions[label]
    assert lc != rc and f'{lc} {ld}' in caption and f'{rc} {rd}' in caption
    # Each half is lit only in its own colour.
    assert _half_colours(image, 0) == {C.PALETTE[lc]} and _half_colours(image, 1) == {C.PALETTE[rc]}
  templates = {C._decode(int(src[i]['label']))[-1] for i in range(40)}
  assert len(templates) == len(C.COMPOSED_TEMPLATES)


def test_composed_is_deterministic():
  a, b = C.composed_digits('test', seed=5), C.composed_digits('test', seed=5)
  for i in (0, 17, 9_999):
    np.testing.assert_array_equal(a[i]['image'], b[i]['image'])
    assert a[i]['label'] == b[i]['label'] and a.objects(i) == b.objects(i)
  c = C.composed_digits('test', seed=6)
  assert not np.array_equal(np.stack([a[i]['image'] for i in range(5)]), np.stack([c[i]['image'] for i in range(5)]))
  train = C.composed_digits('train', seed=5)
  assert len(train) == 60_000 and not np.array_equal(train[0]['image'], a[0]['image'])
  part = C.composed_digits('test[100:110]', seed=5)
  assert len(part) == 10
  np.testing.assert_array_equal(part[3]['image'], a[103]['image'])
  short = C.composed_digits('test', seed=5, length=50)
  assert len(short) == 50 and short.objects(49) == a.objects(49)  # canvas i does not depend on the length


def test_composed_sizes_and_errors():
  assert C.composed_digits('test[:2]', image_size=32, num_channels=1, resize=True)[0]['image'].shape == (32, 32, 1)
  with pytest.raises(DataError, match='image_size=32'):
    C.composed_digits('test', image_size=32)
  with pytest.raises(DataError, match='unknown composed_digits split'):
    C.composed_digits('tset')
  with pytest.raises(DataError, match='non-negative'):
    C.composed_digits('test', seed=-1)
  with pytest.raises(DataError, match='empty'):
    C.composed_digits('test[20000:]')


def test_binding_prompts_cover_digits_and_colour_pairs():
  prompts, objects = C.binding_prompts(60, seed=0)
  assert len(prompts) == len(objects) == 60
  assert all(C.parse_caption(p) == o for p, o in zip(prompts, objects))
  pairs = {(l[1], r[1]) for l, r in objects}
  assert len(pairs) == 30 and all(a != b for a, b in pairs)
  for side in range(2):
    assert np.array_equal(np.bincount([o[side][0] for o in objects], minlength=10), np.full(10, 6))
  first = {(l[1], r[1]) for l, r in objects[:30]}
  assert len(first) == 30  # every block of 30 holds every colour pair
  assert C.binding_prompts(60, seed=0)[0] == prompts and C.binding_prompts(60, seed=1)[0] != prompts
