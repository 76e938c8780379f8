"""Images from a local folder tree (png / jpg / jpeg / bmp / webp), optionally with classes.

Layout rules: if every image lies inside a first-level subfolder and there are at least two
such subfolders, each subfolder is a class (label = index of its name in sorted order), like
torchvision's ImageFolder. Otherwise the images are unlabelled (label 0, num_classes 0).
Files and folders whose names start with '.' are ignored (.ipynb_checkpoints, ...).
"""

import os

import numpy as np
from PIL import Image, ImageOps

from data import fit
from data.errors import DataError

EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')


def list_images(root: str) -> list[str]:
  """Sorted paths, relative to root, of all image files under root (recursive)."""
  paths = []
  for folder, dirs, files in os.walk(root, followlinks=True):
    dirs[:] = [d for d in dirs if not d.startswith('.')]
    rel = os.path.relpath(folder, root)
    for f in files:
      if not f.startswith('.') and f.lower().endswith(EXTENSIONS):
        paths.append(os.path.normpath(os.path.join(rel, f)))
  return sorted(paths)


class FolderSource:
  """Random access to the images under `root`, decoded with PIL and fitted to the shape."""

  def __init__(self, root: str | None, *, image_size: int, num_channels: int, resize: bool):
    if not root:
      raise DataError("dataset 'folder' needs data.data_dir, the folder that holds the images")
    if not os.path.isdir(root):
      raise DataError(f'image folder {root} does not exist')
    if num_channels not in (1, 3):
      raise DataError(f"dataset 'folder' supports data.num_channels 1 or 3, got {num_channels}")
    self._root = root
    self._paths = list_images(root)
    if not self._paths:
      raise DataError(f'no {"/".join(e[1:] for e in EXTENSIONS)} images found under {root}')
    self._image_size, self._num_channels, self._resize = image_size, num_channels, resize
    self._name = f'folder {root}'

    top = [p.split(os.sep)[0] if os.sep in p else None for p in self._paths]
    self.class_names: list[str] = sorted(set(top)) if None not in top else []
    if len(self.class_names) < 2:
      self.class_names = []
    self.num_classes: int = len(self.class_names)
    index = {n: i for i, n in enumerate(self.class_names)}
    self._labels = np.array([index.get(t, 0) for t in top], np.int32)  # [N]

    # Fail now, not in a loader thread, if the images do not fit (checks the first one).
    with Image.open(os.path.join(root, self._paths[0])) as im:
      w, h = im.size
      fit.check_size((h, w, len(im.getbands())), image_size, resize, self._name)

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    path = os.path.join(self._root, self._paths[index])
    with Image.open(path) as im:
      im = ImageOps.exif_transpose(im)  # camera JPEGs: honour the orientation tag.
      image = fit.from_pil(im.convert('L' if self._num_channels == 1 else 'RGB'))
    image = fit.fit_image(
        image,
        image_size=self._image_size,
        num_channels=self._num_channels,
        resize=self._resize,
        name=self._name,
    )
    return {'image': image, 'label': self._labels[index]}  # [S, S, C] uint8, int32
