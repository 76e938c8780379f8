"""grain pipelines: shuffled, sharded, prefetched uint8 batches, deterministic by step.

Training order is a pure function of the seed: the source is shuffled and repeated into one
endless element stream (a new permutation every epoch), and global batch k is stream elements
[k * G, (k + 1) * G) with G = batch_size * shard_count. Host `shard_index` takes every
shard_count-th element of the stream, so its per-host batch k holds stream elements
k * G + shard_index + j * shard_count, j < batch_size: hosts are disjoint, together they cover
the global batch, and the global batch does not depend on the number of hosts. Everything is
random access (grain MapDataset), so starting at step k is O(1) and yields exactly what an
uninterrupted iterator yields from step k on.

Scaling to [-1, 1], flips and dequantization happen on device in the jitted step; batches are
shipped as uint8.
"""

from typing import Iterator

import grain
import numpy as np

from data.errors import DataError
from data.sources import ImageSource

# Separates the data-order seed from other uses of the same root seed.
_DATA_ORDER_TAG = 0x6461_7461  # 'data'


def _shuffle_seed(seed: int) -> int:
  """A 32-bit shuffle seed hashed from `seed`.

  grain shuffles epoch e with seed + e; hashing keeps the epochs of seeds s and s + 1 from
  being the same permutations shifted by one epoch.
  """
  if seed < 0:
    raise DataError(f'the data seed must be non-negative, got {seed}')
  return int(np.random.SeedSequence([seed, _DATA_ORDER_TAG]).generate_state(1, np.uint32)[0])


def _read_options(num_threads: int, prefetch: int) -> grain.ReadOptions:
  """num_threads threads each assemble whole batches; up to `prefetch` batches wait ready."""
  return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)


def make_batches(
    source: ImageSource,
    *,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    num_threads: int = 4,
    prefetch: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
  """Endless training batches {'image': uint8 [B, H, W, C], 'label': int32 [B]} from start_step.

  batch_size is the per-host batch B; the batch of step k depends only on (seed, k, shard).
  """
  if batch_size <= 0:
    raise DataError(f'batch_size must be positive, got {batch_size}')
  if not 0 <= shard_index < shard_count:
    raise DataError(f'shard_index must be in [0, {shard_count}), got {shard_index}')
  if start_step < 0:
    raise DataError(f'start_step must be non-negative, got {start_step}')
  if len(source) == 0:
    raise DataError('cannot make batches from an empty dataset')
  ds = grain.MapDataset.source(source).shuffle(seed=_shuffle_seed(seed))
  ds = ds.repeat()  # endless; reseeds the shuffle every epoch
  ds = ds[shard_index::shard_count]  # this host's elements of every global batch
  ds = ds.batch(batch_size, drop_remainder=True)  # batch k: host elements [kB, (k + 1)B)
  ds = ds[start_step:]  # resume: random access, nothing is read for the skipped steps
  return iter(ds.to_iter_dataset(_read_options(num_threads, prefetch)))


def iterate_once(
    source: ImageSource,
    batch_size: int,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
    num_threads: int = 4,
    prefetch: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
  """Every element once, in order, in batches of batch_size (the last may be smaller).

  For evaluation. With shard_count > 1 this host gets elements shard_index::shard_count.
  """
  if batch_size <= 0:
    raise DataError(f'batch_size must be positive, got {batch_size}')
  if not 0 <= shard_index < shard_count:
    raise DataError(f'shard_index must be in [0, {shard_count}), got {shard_index}')
  ds = grain.MapDataset.source(source)[shard_index::shard_count].batch(batch_size)
  return iter(ds.to_iter_dataset(_read_options(num_threads, prefetch)))
