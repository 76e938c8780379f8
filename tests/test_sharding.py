"""One sharded path, proven equal to one device: 8 simulated CPU devices in a subprocess."""

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, env

SCRIPT = os.path.join(ROOT, 'tests', 'sharding_checks.py')


def _run(*args):
  e = env()
  e['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  proc = subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=e, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.parametrize('check', ['parallel', 'sampling', 'grad_accum', 'features'])
def test_sharded_equals_one_device(check):
  assert _run(check).strip()


def test_checkpoint_restores_onto_other_meshes(tmp_path):
  out = _run('checkpoint', str(tmp_path / 'ckpt'))
  assert out.count('restored on') == 3 and 'next loss on' in out


def test_two_processes_match_one(tmp_path):
  """Two processes on localhost (jax.distributed, gloo CPU collectives), one device each, each feeding its
  half of the batch: 3 steps give the single-process parameters, and Inception features split over both
  processes equal one device's."""
  import socket
  import numpy as np
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = str(s.getsockname()[1])
  e = env()
  workers = [subprocess.Popen([sys.executable, SCRIPT, 'multihost', str(i), port, str(tmp_path / 'multi.npz')],
                              cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
  ref = subprocess.run([sys.executable, SCRIPT, 'reference', str(tmp_path / 'one.npz')], cwd=ROOT, env=e,
                       capture_output=True, text=True, timeout=900)
  assert ref.returncode == 0, ref.stderr[-3000:]
  for w in workers:
    _, err = w.communicate(timeout=900)
    assert w.returncode == 0, err[-3000:]
  multi, one = np.load(tmp_path / 'multi.npz'), np.load(tmp_path / 'one.npz')
  assert sorted(multi.files) == sorted(one.files)
  np.testing.assert_allclose(multi['losses'], one['losses'], rtol=1e-5)
  for k in one.files:
    np.testing.assert_allclose(multi[k], one[k], rtol=1e-4, atol=1e-5)


def test_mesh_shapes_and_rules():
  from jax.sharding import PartitionSpec as P
  from train import sharding
  mesh = sharding.make_mesh((-1, 1))
  assert dict(mesh.shape) == {'data': 1, 'fsdp': 1}
  for bad in ((2, 1), (-1, -1), (0, 1)):
    with pytest.raises(ValueError, match='mesh shape'):
      sharding.make_mesh(bad)

  class FakeMesh:
    shape = {'data': 2, 'fsdp': 4}
  assert sharding.param_spec((3, 3, 64, 128), FakeMesh, 1024) == P(None, None, None, 'fsdp')
  assert sharding.param_spec((3, 3, 6, 10), FakeMesh, 1) == P()  # nothing divisible by 4
  assert sharding.param_spec((128,), FakeMesh, 1024) == P()  # below the size threshold
