"""Unpickling of numpy arrays without executing code from the file.

A pickle can call any importable function on load (`os.system`, ...). Data shipped in
packages is read through `NumpyUnpickler`, whose allow-list holds only the globals numpy
needs to rebuild arrays; any other global is refused before it is imported.
"""

import pickle
from typing import Any, BinaryIO

import numpy as np
from numpy._core import multiarray

# (module, name) as written in the pickle -> the object it may resolve to. numpy 1 pickles
# say `numpy.core.multiarray`, numpy 2 pickles `numpy._core.multiarray`.
_ALLOWED_GLOBALS = {
    ('numpy.core.multiarray', '_reconstruct'): multiarray._reconstruct,
    ('numpy._core.multiarray', '_reconstruct'): multiarray._reconstruct,
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
}


class NumpyUnpickler(pickle.Unpickler):
  """An Unpickler that can only rebuild numpy arrays, dtypes and plain containers."""

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
          f'refusing to load global {module}.{name}: only numpy array globals are allowed'
      ) from None


def load(file: BinaryIO, *, encoding: str = 'ASCII') -> Any:
  """Reads one pickle from `file` with `NumpyUnpickler` (encoding='latin1' for Python 2 pickles)."""
  return NumpyUnpickler(file, encoding=encoding).load()
