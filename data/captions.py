"""Captioned digit datasets for text-to-image: MNIST with captions, and two coloured digits side by side.

Both are random-access sources with the protocol of data/sources.py ({'image': uint8 [S, S, C],
'label': int32}, `num_classes`) whose label is the index of the image's caption in a fixed caption set
(`captions`), so a text model trains like a class-conditional one over caption ids.

- 'mnist_captions': MNIST digit i with one of ~10 caption templates, chosen from (seed, i).
- 'composed_digits': 64x64 RGB canvases with a coloured MNIST digit in each half, captioned with both
  digits, colours and sides ("a red 3 on the left and a blue 7 on the right"). Image i is a pure function of
  (seed, split, i). The two colours always differ, so every caption binds two distinct colours to two sides:
  the benchmark of attribute binding in eval/binding.py.
"""

import functools
import re

import numpy as np

from data import sources
from data.errors import DataError
from data.fit import centre_crop_resize, fit_image
from data.mnist import SPLITS, load_mnist

DIGIT_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')

# MNIST caption templates: {w} the digit as a word, {n} as a numeral; {a} 'a' or 'an' for what follows it.
MNIST_TEMPLATES = (
    'a handwritten {w}',
    'the digit {n}',
    'a photo of the number {w}',
    'an image of {a} {n}',
    '{a} {n}',
    'handwritten digit {w}',
    'the number {w}',
    'a drawing of the digit {n}',
    '{w}',
    'a hand-drawn {n}',
)

# The composed dataset's palette: well-separated saturated colours, 60 degrees of hue apart.
PALETTE = {
    'red': (255, 0, 0),
    'yellow': (255, 255, 0),
    'green': (0, 255, 0),
    'cyan': (0, 255, 255),
    'blue': (0, 0, 255),
    'magenta': (255, 0, 255),
}
COLOURS = tuple(PALETTE)
SIDES = ('left', 'right')

# Composed caption templates over (left digit / colour, right digit / colour).
COMPOSED_TEMPLATES = (
    'a {lc} {ld} on the left and a {rc} {rd} on the right',
    'a {rc} {rd} on the right and a {lc} {ld} on the left',
    'left: a {lc} {ld}, right: a {rc} {rd}',
    'a {lc} {ld} to the left of a {rc} {rd}',
    'a {rc} {rd} to the right of a {lc} {ld}',
)
CANVAS = 64  # composed images are [64, 64, 3]
SCALE_RANGE = (24, 30)  # side of the resized 28x28 MNIST frame, inclusive
Y_JITTER = 8  # vertical jitter of a digit's centre, pixels either way

Object = tuple[int, str, str]  # (digit, colour, side)

_MNIST_TAG = 0x6D_6361  # seed-stream tags: captioned MNIST templates, composed canvases
_COMPOSED_TAG = 0x63_6F6D
_DEFAULT_LENGTH = {'train': 60_000, 'validation': 10_000, 'test': 10_000, 'train+validation': 60_000}


def _article(digit: int) -> str:
  return 'an' if digit == 8 else 'a'  # 'an 8', 'an eight'; every other digit takes 'a'


def _item_rng(tag: int, *keys: int) -> np.random.Generator:
  """A generator that depends only on (tag, *keys): item i's randomness, independent of any other item."""
  return np.random.default_rng(np.random.SeedSequence([tag, *keys]))


def _check_seed(seed: int) -> None:
  if seed < 0:
    raise DataError(f'the caption seed must be non-negative, got {seed}')


# ---------------------------------------------------------------------------------------- MNIST captions

def mnist_caption(digit: int, template: int) -> str:
  """The caption of `digit` under MNIST_TEMPLATES[template]."""
  return MNIST_TEMPLATES[template].format(w=DIGIT_WORDS[digit], n=digit, a=_article(digit))


@functools.lru_cache(maxsize=1)
def _mnist_captions() -> tuple[str, ...]:
  return tuple(mnist_caption(d, t) for t in range(len(MNIST_TEMPLATES)) for d in range(10))


def mnist_captions() -> list[str]:
  """The fixed caption set of 'mnist_captions': index t * 10 + digit is template t of that digit."""
  return list(_mnist_captions())


class CaptionedMnist:
  """MNIST whose label is the caption index: digit i with a template chosen from (seed, i)."""

  def __init__(self, split: str, *, image_size: int, num_channels: int, seed: int = 0, resize: bool = False):
    _check_seed(seed)
    self._base = sources.get_source('mnist', split, image_size=image_size, num_channels=num_channels,
                                    resize=resize)
    self._seed = seed
    self.captions = mnist_captions()
    self.num_classes = len(self.captions)
    self.digit_of_caption = np.tile(np.arange(10, dtype=np.int32), len(MNIST_TEMPLATES))  # [len(captions)]

  def __len__(self) -> int:
    return len(self._base)

  def template(self, index: int) -> int:
    return int(_item_rng(_MNIST_TAG, self._seed, index).integers(len(MNIST_TEMPLATES)))

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    item = self._base[index]
    label = self.template(index) * 10 + int(item['label'])
    return {'image': item['image'], 'label': np.int32(label)}


def captioned_mnist(split: str, image_size: int = 28, num_channels: int = 1, seed: int = 0,
                    resize: bool = False) -> CaptionedMnist:
  """MNIST `split` with captions (see CaptionedMnist); sizes as data.sources' 'mnist'."""
  return CaptionedMnist(split, image_size=image_size, num_channels=num_channels, seed=seed, resize=resize)


def digit_prompts(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
  """n prompts for plain MNIST cycling digits 0..9 (each digit n/10 times), random templates from seed.

  Returns (prompts, digits int32 [n]).
  """
  if n <= 0:
    raise DataError(f'the number of prompts must be positive, got {n}')
  digits = (np.arange(n) % 10).astype(np.int32)
  templates = np.random.default_rng(np.random.SeedSequence([_MNIST_TAG, seed, n])).integers(
      len(MNIST_TEMPLATES), size=n)
  return [mnist_caption(int(d), int(t)) for d, t in zip(digits, templates)], digits


# ------------------------------------------------------------------------------------- composed digits

def _other_colour_rank(left: int, right: int) -> int:
  """Rank of the right colour among the 5 colours that differ from the left one."""
  return right if right < left else right - 1


def caption_index(left_digit: int, left_colour: str, right_digit: int, right_colour: str, template: int) -> int:
  """Index of a composed caption in composed_captions(); the two colours must differ."""
  if left_colour not in PALETTE or right_colour not in PALETTE:
    raise DataError(f'colours must be among {COLOURS}, got {left_colour!r} and {right_colour!r}')
  if left_colour == right_colour:
    raise DataError(f'the two colours of a composed caption must differ, got {left_colour!r} twice')
  if not (0 <= left_digit < 10 and 0 <= right_digit < 10 and 0 <= template < len(COMPOSED_TEMPLATES)):
    raise DataError(f'digits must be in 0..9 and template in 0..{len(COMPOSED_TEMPLATES) - 1}, got '
                    f'{left_digit}, {right_digit}, {template}')
  lc, rc = COLOURS.index(left_colour), COLOURS.index(right_colour)
  k = (left_digit * len(COLOURS) + lc) * 10 + right_digit
  return (k * (len(COLOURS) - 1) + _other_colour_rank(lc, rc)) * len(COMPOSED_TEMPLATES) + template


def _decode(index: int) -> tuple[int, str, int, str, int]:
  """caption_index's inverse: (left digit, left colour, right digit, right colour, template)."""
  index, template = divmod(index, len(COMPOSED_TEMPLATES))
  index, rank = divmod(index, len(COLOURS) - 1)
  index, rd = divmod(index, 10)
  ld, lc = divmod(index, len(COLOURS))
  rc = rank if rank < lc else rank + 1
  return ld, COLOURS[lc], rd, COLOURS[rc], template


def composed_caption(left_digit: int, left_colour: str, right_digit: int, right_colour: str,
                     template: int) -> str:
  return COMPOSED_TEMPLATES[template].format(ld=left_digit, lc=left_colour, rd=right_digit, rc=right_colour)


@functools.lru_cache(maxsize=1)
def _composed_captions() -> tuple[str, ...]:
  n = 10 * len(COLOURS) * 10 * (len(COLOURS) - 1) * len(COMPOSED_TEMPLATES)
  return tuple(composed_caption(*_decode(i)) for i in range(n))


def composed_captions() -> list[str]:
  """The fixed caption set of 'composed_digits' (15,000 captions), ordered by caption_index."""
  return list(_composed_captions())


@functools.lru_cache(maxsize=1)
def _caption_lookup() -> dict[str, int]:
  return {c: i for i, c in enumerate(_composed_captions())}


def objects_of_caption(index: int) -> list[Object]:
  """[(digit, colour, 'left'), (digit, colour, 'right')] of composed caption `index`."""
  ld, lc, rd, rc, _ = _decode(index)
  return [(ld, lc, 'left'), (rd, rc, 'right')]


def parse_caption(text: str) -> list[Object]:
  """The objects a composed caption describes, left first; DataError for text outside the caption set."""
  index = _caption_lookup().get(text.strip())
  if index is None:
    raise DataError(f'not a composed_digits caption: {text!r}')
  return objects_of_caption(index)


def _parse_split(split: str) -> tuple[str, slice]:
  """'test' or 'test[100:200]' -> (the MNIST split whose digits are used, the slice of canvas indices)."""
  m = re.fullmatch(r'(.+)\[(-?\d*):(-?\d*)\]', split)
  name, part = split, slice(None)
  if m:
    name, lo, hi = m.groups()
    part = slice(int(lo) if lo else None, int(hi) if hi else None)
  if name not in SPLITS:
    raise DataError(f'unknown composed_digits split {split!r}; choose one of {", ".join(SPLITS)} (or a slice)')
  return name, part


class ComposedDigits:
  """64x64 RGB canvases, a coloured MNIST digit in each half, captioned with digits, colours and sides.

  Canvas i of a split (left / right digits drawn from that MNIST split, distinct colours, a template,
  each digit's scale in SCALE_RANGE and its position jittered inside its half) depends only on
  (seed, split, i). 'train' and 'train+validation' hold 60k canvases, 'validation' and 'test' 10k, unless
  `length` says otherwise; a slice 'test[:500]' takes those canvases of 'test'.
  """

  def __init__(self, split: str, *, image_size: int = CANVAS, num_channels: int = 3, seed: int = 0,
               length: int | None = None, resize: bool = False):
    _check_seed(seed)
    name, part = _parse_split(split)
    n = _DEFAULT_LENGTH[name] if length is None else length
    if n <= 0:
      raise DataError(f'composed_digits length must be positive, got {n}')
    self._indices = np.arange(n)[part]  # canvas indices of this (sliced) split
    if len(self._indices) == 0:
      raise DataError(f'composed_digits split {split!r} of length {n} is empty')
    self._digits, self._labels = load_mnist(name)  # [M, 28, 28, 1], [M]
    self._keys = (seed, SPLITS.index(name))
    self._fit = dict(image_size=image_size, num_channels=num_channels, resize=resize, name='composed_digits')
    fit_image(np.zeros((CANVAS, CANVAS, 3), np.uint8), **self._fit)  # fails now on a bad size / channels
    self.captions = composed_captions()
    self.num_classes = len(self.captions)

  def __len__(self) -> int:
    return len(self._indices)

  def _layout(self, index: int) -> dict:
    """Everything random about canvas `index`: MNIST indices, colours, template, scales, positions."""
    if not -len(self) <= index < len(self):
      raise IndexError(f'composed_digits index {index} out of range for length {len(self)}')
    rng = _item_rng(_COMPOSED_TAG, *self._keys, int(self._indices[index]))
    mnist = rng.integers(len(self._digits), size=2)
    lc = int(rng.integers(len(COLOURS)))
    rc = (lc + 1 + int(rng.integers(len(COLOURS) - 1))) % len(COLOURS)
    template = int(rng.integers(len(COMPOSED_TEMPLATES)))
    scales = rng.integers(SCALE_RANGE[0], SCALE_RANGE[1] + 1, size=2)
    u = rng.random((2, 2))  # [side, (x, y)] positions in [0, 1)
    return dict(mnist=mnist, colours=(COLOURS[lc], COLOURS[rc]), template=template, scales=scales, u=u)

  def _objects(self, lay: dict) -> list[Object]:
    return [(int(self._labels[m]), c, side) for m, c, side in zip(lay['mnist'], lay['colours'], SIDES)]

  def objects(self, index: int) -> list[Object]:
    """[(digit, colour, 'left'), (digit, colour, 'right')]: what canvas `index` shows."""
    return self._objects(self._layout(index))

  def render(self, index: int) -> np.ndarray:
    """Canvas `index` as uint8 [64, 64, 3] (before fitting to the configured size)."""
    return self._render(self._layout(index))

  def _render(self, lay: dict) -> np.ndarray:
    canvas = np.zeros((CANVAS, CANVAS, 3), np.uint8)
    half = CANVAS // 2
    for side, (m, colour, s, (ux, uy)) in enumerate(zip(lay['mnist'], lay['colours'], lay['scales'], lay['u'])):
      s = int(s)
      digit = centre_crop_resize(np.asarray(self._digits[m]), s)[..., 0]  # [s, s]
      left = side * half + int(ux * (half - s + 1))  # the frame stays inside its half
      top = int(round(CANVAS / 2 - s / 2 + (2 * uy - 1) * Y_JITTER))
      top = min(max(top, 0), CANVAS - s)
      rgb = np.asarray(PALETTE[colour], np.uint16)
      canvas[top:top + s, left:left + s] = (digit[..., None].astype(np.uint16) * rgb // 255).astype(np.uint8)
    return canvas

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    lay = self._layout(index)
    (ld, lc, _), (rd, rc, _) = self._objects(lay)
    label = caption_index(ld, lc, rd, rc, lay['template'])
    return {'image': fit_image(self._render(lay), **self._fit), 'label': np.int32(label)}


def composed_digits(split: str, image_size: int = CANVAS, num_channels: int = 3, seed: int = 0,
                    length: int | None = None, resize: bool = False) -> ComposedDigits:
  """The composed two-digit dataset (see ComposedDigits)."""
  return ComposedDigits(split, image_size=image_size, num_channels=num_channels, seed=seed, length=length,
                        resize=resize)


def binding_prompts(n: int, seed: int = 0) -> tuple[list[str], list[list[Object]]]:
  """n composed prompts for the binding benchmark: balanced over left digits, right digits and the 30
  ordered colour pairs (each a run of shuffled blocks, so any 30 consecutive prompts hold every colour
  pair and any 10 every digit on each side), random templates.

  Returns (prompts, objects), objects[k] = [(digit, colour, 'left'), (digit, colour, 'right')].
  """
  if n <= 0:
    raise DataError(f'the number of prompts must be positive, got {n}')
  rng = np.random.default_rng(np.random.SeedSequence([_COMPOSED_TAG, seed, n]))
  pairs = [(a, b) for a in COLOURS for b in COLOURS if a != b]  # 30 ordered colour pairs
  blocks = lambda k: np.concatenate([rng.permutation(k) for _ in range(-(-n // k))])[:n]  # [n]
  left, right, pair = blocks(10), blocks(10), blocks(len(pairs))
  templates = rng.integers(len(COMPOSED_TEMPLATES), size=n)
  prompts, objects = [], []
  for ld, rd, p, t in zip(left, right, pair, templates):
    (lc, rc), ld, rd = pairs[p], int(ld), int(rd)
    prompts.append(composed_caption(ld, lc, rd, rc, int(t)))
    objects.append([(ld, lc, 'left'), (rd, rc, 'right')])
  return prompts, objects
