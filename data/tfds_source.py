"""tfds datasets read TF-free: `tfds.data_source` over prepared array_record files.

Nothing is downloaded here (download=False): datasets are prepared once with
`tfds build <name> --data_dir=DIR --file_format=array_record` on a machine with network and
the folder is copied over. tfds is imported lazily, so the other sources do not pay for it.
"""

import os

import numpy as np

from data import fit
from data.errors import DataError


def _base_name(name: str) -> str:
  """'lsun/church_outdoor:3.1.0' -> 'lsun' (what the tfds registry knows)."""
  return name.split(':')[0].split('/')[0]


def _build_hint(name: str, data_dir: str | None) -> str:
  flag = f' --data_dir={data_dir}' if data_dir else ''
  return (
      f'prepare it on a machine with network: `tfds build {name}{flag} --file_format=array_record`, '
      'then copy that folder here'
  )


def _open_error(name: str, split: str, data_dir: str | None, error: Exception) -> DataError:
  """Explains why tfds.data_source failed: not prepared, wrong file format, or a bad split."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  where = data_dir or os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets')
  reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    prepared = builder.is_prepared()
  except Exception:  # pylint: disable=broad-except
    prepared = False
  if not prepared:
    return DataError(f'tfds dataset {name} is not prepared in {where}; {_build_hint(name, data_dir)}')
  file_format = builder.info.file_format
  if file_format is not None and file_format.value not in ('array_record', 'parquet'):
    return DataError(
        f'tfds dataset {name} in {where} is stored as {file_format.value}, which has no random '
        f'access; rebuild it with --file_format=array_record ({_build_hint(name, data_dir)})'
    )
  splits = ', '.join(sorted(builder.info.splits))
  return DataError(f'cannot open split {split!r} of tfds dataset {name} (splits: {splits}): {reason}')


class TfdsSource:
  """Random access to a prepared tfds dataset: feature 'image', and 'label' if a ClassLabel."""

  def __init__(
      self,
      name: str,
      split: str,
      *,
      image_size: int,
      num_channels: int,
      resize: bool,
      data_dir: str | None = None,
  ):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    known = _base_name(name) in tfds.list_builders(with_community_datasets=False)
    on_disk = data_dir is not None and os.path.isdir(os.path.join(data_dir, _base_name(name)))
    if not (known or on_disk):
      raise DataError(
          f"unknown dataset {name!r}: use 'mnist', 'folder' or any tfds dataset name "
          "(e.g. 'cifar10', 'celeb_a')"
      )
    try:
      self._data = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except DataError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise _open_error(name, split, data_dir, e) from e

    features = self._data.dataset_info.features
    if 'image' not in features:
      raise DataError(f"tfds dataset {name} has no 'image' feature (features: {', '.join(features)})")
    shape = tuple(features['image'].shape)  # (H, W, C); H, W may be None (variable sizes)
    fit.check_channels(shape[-1], num_channels, name)
    if None not in shape:
      fit.check_size(shape, image_size, resize, name)
    label = features['label'] if 'label' in features else None
    self._has_label = isinstance(label, tfds.features.ClassLabel)
    self.num_classes: int = label.num_classes if self._has_label else 0
    self._name, self._image_size, self._num_channels, self._resize = name, image_size, num_channels, resize

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    example = self._data[index]
    image = fit.fit_image(
        np.asarray(example['image']),
        image_size=self._image_size,
        num_channels=self._num_channels,
        resize=self._resize,
        name=self._name,
    )
    label = np.int32(example['label'] if self._has_label else 0)
    return {'image': image, 'label': label}  # [S, S, C] uint8, int32
