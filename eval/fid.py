"""Inception features of uint8 images — generated batches or a dataset split — for FID / KID / IS / PR.

Images enter as uint8 [B, H, W, C] (C = 1 is repeated to RGB, as FID tools do for grayscale data) and are
scaled to [0, 1] on the device; every call is padded to one batch size so the network compiles once. With a
mesh, each batch is split over its data-like axes and the features come back replicated, so every host of a
multi-host run (each holding the same images) gets all of them in order.
"""

from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from data import pipeline
from data.sources import ImageSource
from eval import inception, inception_weights
from train import sharding


class FeatureExtractor:
  """uint8 images -> (pool3 features [N, 2048] float32, logits [N, 1008] or None) as numpy arrays."""

  def __init__(self, weights: str | None = None, batch_size: int = 250, *, cache_dir: str | None = None,
               model: inception.InceptionV3 | None = None, mesh: jax.sharding.Mesh | None = None,
               per_image: bool | None = None):
    """per_image: run the network image by image inside the compiled batch (lax.map); None chooses it on a
    single CPU device, where a batch's activations at 299x299 outgrow the caches (100 images' first 147x147x64
    maps alone are 553 MB): on 2 cores 10.0 s against 16.5 s per 100 images (bench/RESULTS.md)."""
    self.model = model if model is not None else inception_weights.load_inception(weights, cache_dir=cache_dir)
    self.batch_size = batch_size
    self.has_logits = self.model.fc is not None
    blocks = ('pool3', 'logits') if self.has_logits else ('pool3',)
    graphdef, state = nnx.split(self.model)
    self.per_image = per_image if per_image is not None else mesh is None and jax.default_backend() == 'cpu'

    def run(state, u8):  # uint8 -> [0, 1] fused into the program
      net = lambda u8: nnx.merge(graphdef, state)(u8.astype(jnp.float32) / 255.0, blocks)
      if self.per_image:  # a loop over the batch's images, one per iteration, their outputs stacked
        return jax.lax.map(lambda x: jax.tree.map(lambda v: v[0], net(x[None])), u8)
      return net(u8)

    self._images_sharding = None
    if mesh is None:
      self._state, self._run = state, jax.jit(run)
    else:
      if batch_size % sharding.batch_parallelism(mesh):
        raise ValueError(f'eval batch size {batch_size} does not divide over the mesh {dict(mesh.shape)}')
      self._images_sharding = sharding.batch_sharding(mesh)
      self._state = jax.device_put(state, sharding.replicated(mesh))
      self._run = jax.jit(run, in_shardings=(sharding.replicated(mesh), self._images_sharding),
                          out_shardings=sharding.replicated(mesh))

  def _put(self, chunk: np.ndarray) -> jax.Array:
    if self._images_sharding is None:
      return jnp.asarray(chunk, jnp.uint8)
    # every host holds the whole chunk and contributes the rows of its own devices
    return jax.make_array_from_callback(chunk.shape, self._images_sharding, lambda idx: chunk[idx])

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f'expected uint8 images [N, H, W, 1 or 3], got shape {images.shape}')
    if images.shape[-1] == 1:
      images = np.repeat(images, 3, axis=-1)
    feats, logits = [], []
    for i in range(0, len(images), self.batch_size):
      chunk = images[i:i + self.batch_size]
      n = len(chunk)
      if n < self.batch_size:  # pad: one compiled shape
        chunk = np.concatenate([chunk, np.zeros((self.batch_size - n, *chunk.shape[1:]), chunk.dtype)])
      out = self._run(self._state, self._put(chunk.astype(np.uint8)))
      feats.append(np.asarray(out['pool3'])[:n])
      if self.has_logits:
        logits.append(np.asarray(out['logits'])[:n])
    return np.concatenate(feats), (np.concatenate(logits) if logits else None)


def _batches(source: ImageSource, n: int, batch_size: int) -> Iterator[np.ndarray]:
  seen = 0
  for batch in pipeline.iterate_once(source, batch_size):
    images = batch['image'][:n - seen]
    seen += len(images)
    yield images
    if seen >= n:
      return


def source_features(extractor: FeatureExtractor, source: ImageSource, n: int, batch_size: int,
                    desc: str = 'features') -> tuple[np.ndarray, np.ndarray | None]:
  """Features (and logits) of the first n images of a data source, with a progress bar."""
  feats, logits = [], []
  for images in tqdm(_batches(source, n, batch_size), total=-(-n // batch_size), desc=desc, unit='batch',
                     dynamic_ncols=True):
    f, lg = extractor(images)
    feats.append(f)
    if lg is not None:
      logits.append(lg)
  return np.concatenate(feats), (np.concatenate(logits) if logits else None)
