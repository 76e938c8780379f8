"""Per-image fitting to the configured shape: channel conversion, size check, crop and resize.

Every source ends with `fit_image`, so all datasets follow the same rules: grayscale <-> RGB is
converted, any other channel mismatch is an error, and a size mismatch is an error unless
resizing was asked for (then: centre-crop to a square, bicubic antialiased resize with PIL).
"""

import numpy as np
from PIL import Image

from data.errors import DataError

_PIL_MODES = {1: 'L', 3: 'RGB'}


def check_channels(channels: int, num_channels: int, name: str) -> None:
  """Raises DataError unless `channels` equals `num_channels` or one is 1 and the other 3."""
  if channels != num_channels and {channels, num_channels} != {1, 3}:
    raise DataError(
        f'{name} images have {channels} channels but data.num_channels={num_channels}; '
        'only grayscale <-> RGB conversion is supported'
    )


def check_size(shape: tuple[int, int, int], image_size: int, resize: bool, name: str) -> None:
  """Raises DataError if an [H, W, C] image is not image_size x image_size and resize is off."""
  h, w, c = shape
  if (h, w) != (image_size, image_size) and not resize:
    raise DataError(
        f'{name} images are {h}x{w}x{c} but data.image_size={image_size}; '
        'set data.resize=True to centre-crop and resize'
    )


def to_pil(image: np.ndarray) -> Image.Image:
  """uint8 [H, W, 1 | 3] -> PIL image in mode 'L' or 'RGB'."""
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image, _PIL_MODES[image.shape[-1]])


def from_pil(image: Image.Image) -> np.ndarray:
  """PIL image in mode 'L' or 'RGB' -> uint8 [H, W, 1 | 3]."""
  a = np.asarray(image, dtype=np.uint8)
  return a[..., None] if a.ndim == 2 else a


def convert_channels(image: np.ndarray, num_channels: int, name: str) -> np.ndarray:
  """[H, W, C] -> [H, W, num_channels]: replicate gray to RGB, RGB to gray by PIL's 'L' luma."""
  c = image.shape[-1]
  if c == num_channels:
    return image
  check_channels(c, num_channels, name)
  if num_channels == 3:  # 1 -> 3
    return np.repeat(image, 3, axis=-1)
  return from_pil(to_pil(image).convert('L'))  # 3 -> 1: ITU-R 601-2 luma, as for image files.


def centre_crop_resize(image: np.ndarray, image_size: int) -> np.ndarray:
  """[H, W, C] uint8 -> [image_size, image_size, C]: central square crop, bicubic resize."""
  h, w, c = image.shape
  if c not in _PIL_MODES:
    raise DataError(f'resizing supports 1 or 3 channels, got images of shape {h}x{w}x{c}')
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  image = image[top : top + s, left : left + s]
  if s == image_size:
    return np.ascontiguousarray(image)
  # PIL's bicubic filter widens its support when downscaling, i.e. it antialiases.
  return from_pil(to_pil(image).resize((image_size, image_size), Image.Resampling.BICUBIC))


def fit_image(
    image: np.ndarray, *, image_size: int, num_channels: int, resize: bool, name: str
) -> np.ndarray:
  """Any uint8 [H, W, C] image -> uint8 [image_size, image_size, num_channels], or DataError."""
  if image.dtype != np.uint8 or image.ndim != 3:
    raise DataError(f'{name} images must be uint8 [H, W, C], got {image.dtype} {image.shape}')
  check_size(image.shape, image_size, resize, name)
  image = convert_channels(image, num_channels, name)
  if image.shape[:2] != (image_size, image_size):
    image = centre_crop_resize(image, image_size)
  return image
