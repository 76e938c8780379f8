"""Image grids written as PNG."""

import math
import os

import numpy as np
from PIL import Image


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2) -> np.ndarray:
  """uint8 [N, H, W, C] -> one uint8 image [rows * (H + pad) + pad, ...] with a black border."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  ncol = ncol or int(math.ceil(math.sqrt(n)))
  nrow = int(math.ceil(n / ncol))
  grid = np.zeros((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), np.uint8)
  for i, img in enumerate(images):
    r, q = divmod(i, ncol)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = img
  return grid


def save_grid(path: str, images: np.ndarray, ncol: int | None = None) -> str:
  """Writes uint8 images [N, H, W, C] (C = 1 or 3) as one PNG grid; returns the path."""
  grid = make_grid(images, ncol)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
  return path
