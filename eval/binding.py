"""Prompt adherence of generated digits: does the image show the digit (and colour, and side) prompted?

- score_digits: plain digit images against the prompted digits (eval/digits.py's classifier).
- score_composed: two-object canvases of data/captions.py's 'composed_digits' against the prompted
  objects. Each half is analysed on its own: its object is the bright pixels (max over channels >= BRIGHT,
  specks dropped), its colour the palette colour most of its saturated pixels are nearest to by hue
  ('none' for an empty half or a colourless object), its digit the classifier's reading of a square box
  around it, resized to 28x28 with the digit's larger side at 20 px as in MNIST (-1 for an empty half).
- plot_vs_guidance: these metrics against the classifier-free guidance scale.
"""

import colorsys
import math
import os
from typing import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from data.captions import COLOURS, PALETTE, SIDES, Object
from eval import digits as digits_lib

BRIGHT = 100  # a pixel belongs to an object if its largest channel is at least this (of 255)
MIN_PIXELS = 8  # fewer bright pixels than this: the half is empty
MIN_SATURATION = 0.35  # pixels less saturated than this do not vote on the colour
SPECK_FRACTION = 0.1  # connected pieces smaller than this fraction of the largest piece are noise
DIGIT_BOX = 20  # MNIST fits a digit's larger side into 20 px of its 28 px frame

_HUES = np.array([colorsys.rgb_to_hsv(*(np.array(PALETTE[c]) / 255))[0] * 360 for c in COLOURS])  # [6] degrees


def score_digits(images: np.ndarray, digits: Sequence[int], model=None) -> dict:
  """Digit images uint8 [N, H, W, C] against the prompted digits [N].

  Returns digit_accuracy, per_digit_accuracy ([10], NaN for digits never prompted) and num_images.
  """
  digits = np.asarray(digits, np.int64)
  if len(images) != len(digits) or len(digits) == 0:
    raise ValueError(f'score_digits needs as many digits as images (> 0), got {len(digits)} and {len(images)}')
  correct = digits_lib.classify(images, model) == digits  # [N]
  per = [float(correct[digits == d].mean()) if np.any(digits == d) else math.nan for d in range(10)]
  return {'digit_accuracy': float(correct.mean()), 'per_digit_accuracy': per, 'num_images': int(len(digits))}


def _hue(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """rgb float [P, 3] in [0, 1] -> (hue in degrees [P], saturation [P]), as colorsys.rgb_to_hsv."""
  mx, mn = rgb.max(-1), rgb.min(-1)
  delta = np.where(mx > mn, mx - mn, 1.0)
  r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
  h = np.where(mx == r, (g - b) / delta, np.where(mx == g, 2.0 + (b - r) / delta, 4.0 + (r - g) / delta))
  return (h * 60.0) % 360.0, np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-12), 0.0)


def _object_mask(bright: np.ndarray) -> np.ndarray | None:
  """The object's pixels in one half (bool [H, W]), or None if the half is empty."""
  mask = bright >= BRIGHT
  if mask.sum() < MIN_PIXELS:
    return None
  labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
  sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]  # [n]
  keep = np.flatnonzero(sizes >= SPECK_FRACTION * sizes.max()) + 1
  return np.isin(labels, keep)


def _colour(half: np.ndarray, mask: np.ndarray) -> str:
  """The palette colour most of the object's saturated pixels are nearest to by hue; 'none' if none are."""
  hue, sat = _hue(half[mask].astype(np.float64) / 255.0)
  hue = hue[sat >= MIN_SATURATION]
  if len(hue) == 0:
    return 'none'
  dist = np.abs((hue[:, None] - _HUES[None, :] + 180.0) % 360.0 - 180.0)  # [P, 6] circular distance
  return COLOURS[int(np.argmax(np.bincount(dist.argmin(-1), minlength=len(COLOURS))))]


def _crop(bright: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """The object re-framed as MNIST: a square box around it (larger side -> 20 of 28 px), uint8 [28, 28]."""
  ys, xs = np.nonzero(mask)
  y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
  side = max(int(math.ceil(max(y1 - y0, x1 - x0) * digits_lib.SIZE / DIGIT_BOX)), 1)
  top, left = (y0 + y1 - side) // 2, (x0 + x1 - side) // 2
  box = np.zeros((side, side), np.uint8)  # outside the half: black
  h, w = bright.shape
  sy, sx = slice(max(top, 0), min(top + side, h)), slice(max(left, 0), min(left + side, w))
  box[sy.start - top:sy.stop - top, sx.start - left:sx.stop - left] = bright[sy, sx]
  size = (digits_lib.SIZE, digits_lib.SIZE)
  return np.asarray(Image.fromarray(box, 'L').resize(size, Image.Resampling.BILINEAR))  # antialiased shrink


def detect_objects(images: np.ndarray, model=None) -> list[list[Object]]:
  """What each canvas shows: [(digit, colour, 'left'), (digit, colour, 'right')] per image.

  images uint8 [N, H, W, 3]; an empty half reads (-1, 'none', side).
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'score_composed takes uint8 [N, H, W, 3] canvases, got {images.dtype} {images.shape}')
  w = images.shape[2] // 2
  colours, crops, found = [], [], []
  for image in images:
    for s in range(2):
      half = image[:, s * w:(s + 1) * w]  # [H, W/2, 3]
      bright = half.max(-1)
      mask = _object_mask(bright)
      found.append(mask is not None)
      colours.append('none' if mask is None else _colour(half, mask))
      crops.append(np.zeros((digits_lib.SIZE,) * 2, np.uint8) if mask is None else _crop(bright, mask))
  read = digits_lib.classify(np.stack(crops)[..., None], model) if crops else np.zeros(0, np.int32)  # [2N]
  read = np.where(found, read, -1)
  return [[(int(read[2 * i + s]), colours[2 * i + s], SIDES[s]) for s in range(2)] for i in range(len(images))]


def _by_side(objects: Sequence[Object]) -> tuple[Object, Object]:
  """(left object, right object) of one prompt."""
  sides = {o[2]: o for o in objects}
  if len(objects) != 2 or set(sides) != set(SIDES):
    raise ValueError(f'a composed prompt has one object on each side, got {list(objects)}')
  return sides['left'], sides['right']


def score_composed(images: np.ndarray, objects: Sequence[Sequence[Object]], model=None) -> dict:
  """Composed canvases uint8 [N, 64, 64, 3] against the prompted objects (per image, one per side).

  Per object (2N of them): digit_accuracy and colour_accuracy are the fractions read as prompted.
  Bleed is binding gone wrong: an object shows the attribute prompted for the OTHER object instead of its own.
  colour_bleed_rate = objects whose colour reads as the other object's prompted colour / objects whose two
  prompted colours differ; digit_bleed_rate likewise for digits (prompts with the same digit twice don't count);
  bleed_rate = objects with a colour or a digit bleed / all objects. both_correct = images whose two objects
  both read as prompted (digit and colour); empty_rate = halves with no object.
  """
  if len(images) != len(objects) or len(objects) == 0:
    raise ValueError(f'score_composed needs one object list per image (> 0), got {len(objects)} and {len(images)}')
  prompted = [_by_side(o) for o in objects]  # [N] x (left, right)
  seen = detect_objects(images, model)
  digit_ok, colour_ok, colour_bleed, digit_bleed, any_bleed, empty = [], [], [], [], [], []
  for want, got in zip(prompted, seen):
    for s in range(2):
      (d, c, _), (od, oc, _), (gd, gc, _) = want[s], want[1 - s], got[s]
      digit_ok.append(gd == d)
      colour_ok.append(gc == c)
      cb = c != oc and gc == oc
      db = d != od and gd == od
      if c != oc:
        colour_bleed.append(cb)
      if d != od:
        digit_bleed.append(db)
      any_bleed.append(cb or db)
      empty.append(gd < 0)
  both = np.array(digit_ok) & np.array(colour_ok)  # [2N]
  mean = lambda v: float(np.mean(v)) if len(v) else math.nan
  return {
      'digit_accuracy': mean(digit_ok),
      'colour_accuracy': mean(colour_ok),
      'bleed_rate': mean(any_bleed),
      'colour_bleed_rate': mean(colour_bleed),
      'digit_bleed_rate': mean(digit_bleed),
      'both_correct': mean(both.reshape(-1, 2).all(-1)),
      'empty_rate': mean(empty),
      'num_objects': len(digit_ok),
      'num_images': len(prompted),
  }


def plot_vs_guidance(rows: Sequence[dict], path: str, keys: Sequence[str], x: str = 'guidance',
                     series: str | None = None) -> None:
  """A PNG with one panel per metric in `keys` against rows[i][x] (the guidance scale).

  `series` names a row field that splits the rows into lines (e.g. 'sampler'); rows are sorted by x.
  """
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  if not rows or not keys:
    raise ValueError('plot_vs_guidance needs rows and keys')
  missing = [k for k in (x, *keys) if any(k not in r for r in rows)]
  if missing:
    raise ValueError(f'plot_vs_guidance: rows lack {missing}')
  groups: dict[str, list[dict]] = {}
  for r in rows:
    groups.setdefault(str(r[series]) if series else '', []).append(r)
  fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False)
  for ax, key in zip(axes[0], keys):
    for name, group in groups.items():
      group = sorted(group, key=lambda r: r[x])
      ax.plot([r[x] for r in group], [r[key] for r in group], marker='o', label=name or None)
    ax.set_xlabel(x)
    ax.set_title(key)
    ax.grid(alpha=0.3)
    if series:
      ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
