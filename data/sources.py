"""Dataset registry: a name -> a random-access `ImageSource` of fitted uint8 images.

Names: 'mnist' (packaged, offline), 'mnist_captions' and 'composed_digits' (captioned digits, labels are
caption ids: data/captions.py), 'folder' (images under data_dir), anything else is a tfds dataset name read
TF-free from data_dir. Every source yields the shape the model is built for,
{'image': uint8 [image_size, image_size, num_channels], 'label': int32}, or fails at
construction with a DataError.
"""

from typing import Callable, Protocol

import numpy as np

from data.errors import DataError
from data.fit import centre_crop_resize, check_channels, check_size, convert_channels
from data.folder import FolderSource
from data.mnist import load_mnist
from data.tfds_source import TfdsSource


class ImageSource(Protocol):
  """What the pipeline needs: length, random access, and the number of classes (0: none)."""

  num_classes: int

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...


class ArraySource:
  """In-memory images [N, H, W, C] and labels [N], with a per-image transform applied on read."""

  def __init__(
      self,
      images: np.ndarray,
      labels: np.ndarray,
      *,
      num_classes: int,
      transform: Callable[[np.ndarray], np.ndarray] = lambda x: x,
  ):
    self._images, self._labels, self._transform = images, labels, transform
    self.num_classes = num_classes

  def __len__(self) -> int:
    return len(self._images)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {'image': self._transform(self._images[index]), 'label': np.int32(self._labels[index])}


def _mnist(split: str, *, image_size: int, num_channels: int, resize: bool) -> ArraySource:
  """MNIST 28x28 digits; image_size 32 zero-pads 2 pixels on each side (the DDPM convention)."""
  check_channels(1, num_channels, 'mnist')
  if image_size not in (28, 32):
    check_size((28, 28, 1), image_size, resize, 'mnist')

  def transform(image: np.ndarray) -> np.ndarray:  # [28, 28, 1] -> [S, S, C]
    if image_size == 32:
      image = np.pad(image, ((2, 2), (2, 2), (0, 0)))
    elif image_size != 28:
      image = centre_crop_resize(image, image_size)
    return convert_channels(image, num_channels, 'mnist')

  x, y = load_mnist(split)
  return ArraySource(x, y, num_classes=10, transform=transform)


def get_source(
    dataset: str,
    split: str,
    *,
    image_size: int,
    num_channels: int,
    data_dir: str | None = None,
    resize: bool = False,
) -> ImageSource:
  """The `split` of `dataset`, fitted to uint8 [image_size, image_size, num_channels].

  resize=False makes any size mismatch a DataError; resize=True centre-crops to a square and
  resizes (bicubic, antialiased). Grayscale <-> RGB is converted; other channel counts fail.
  For 'folder', `split` is ignored: data_dir is the split.
  """
  if image_size <= 0:
    raise DataError(f'data.image_size must be positive, got {image_size}')
  if dataset == 'mnist':
    return _mnist(split, image_size=image_size, num_channels=num_channels, resize=resize)
  if dataset in ('mnist_captions', 'composed_digits'):
    from data import captions  # imported here: data.captions builds on this module
    make = captions.captioned_mnist if dataset == 'mnist_captions' else captions.composed_digits
    return make(split, image_size=image_size, num_channels=num_channels, resize=resize)
  if dataset == 'folder':
    return FolderSource(data_dir, image_size=image_size, num_channels=num_channels, resize=resize)
  return TfdsSource(
      dataset, split, image_size=image_size, num_channels=num_channels, resize=resize, data_dir=data_dir
  )
