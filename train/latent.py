"""A frozen VAE between pixels and the latents a diffusion model runs on (latent diffusion, Rombach et al. 2022).

Diffusion latents are z_d = (z - shift) * scale with z ~ q(z | x), so that they have roughly unit variance; the
scale is the one stored with the VAE unless overridden. All methods are pure functions of `frozen` (the VAE's
parameters and buffers), which the jitted steps take as an argument rather than as compile-time constants.
"""

import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data import sources
from data.errors import DataError
from models import vae_weights
from models.vae import AutoencoderKL, VAEConfig, sample_posterior

Frozen = tuple[nnx.State, nnx.State]  # (params, buffers) of the AutoencoderKL


class LatentCodec:

  def __init__(self, cfg: VAEConfig, frozen: Frozen, scale_factor: float | None = None, source: str = ''):
    self.cfg, self.source = cfg, source
    params, buffers = frozen
    if scale_factor is not None:
      buffers = jax.tree.map(lambda v: v, buffers)  # a copy: the caller's buffers stay as they were
      buffers.replace_by_pure_dict({'scaling_factor': jnp.float32(scale_factor),
                                    'shift_factor': buffers['shift_factor'].value})
    self.frozen = (params, buffers)
    self.graphdef = nnx.graphdef(nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0))))

  @classmethod
  def load(cls, path: str, scale_factor: float | None = None) -> 'LatentCodec':
    cfg, params, buffers = vae_weights.load(path)
    return cls(cfg, (params, buffers), scale_factor, source=vae_weights.resolve(path))

  @property
  def factor(self) -> int:
    return self.cfg.factor

  @property
  def channels(self) -> int:
    return self.cfg.latent_channels

  @property
  def scale(self) -> float:
    return float(self.frozen[1]['scaling_factor'].value)

  def latent_shape(self, image_size: int) -> tuple[int, int, int]:
    if image_size % self.factor:
      raise ValueError(f'data.image_size={image_size} is not divisible by the VAE factor {self.factor}')
    return image_size // self.factor, image_size // self.factor, self.channels

  def _vae(self, frozen: Frozen) -> AutoencoderKL:
    return nnx.merge(self.graphdef, *frozen)

  def moments(self, frozen: Frozen, x: jax.Array) -> jax.Array:
    """Model-range images [B, H, W, C] -> posterior (mean, logvar) stacked on channels [B, h, w, 2 z]."""
    mean, logvar = self._vae(frozen).encode(x)
    return jax.lax.stop_gradient(jnp.concatenate([mean, logvar], -1))

  def sample(self, frozen: Frozen, moments: jax.Array, rng: jax.Array) -> jax.Array:
    """A posterior sample as diffusion latents [B, h, w, z]."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return self._vae(frozen).to_latent(sample_posterior(rng, mean, logvar))

  def decode(self, frozen: Frozen, z: jax.Array) -> jax.Array:
    """Diffusion latents [B, h, w, z] -> model-range images [B, H, W, C]."""
    vae = self._vae(frozen)
    return vae.decode(vae.from_latent(z))

  def fingerprint(self) -> str:
    """A short hash of the weights and scale: cached latents are reused only with the same VAE."""
    h = hashlib.sha1(repr(self.cfg).encode())
    for leaf in jax.tree.leaves(self.frozen):
      h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()[:12]


def cache_moments(codec: LatentCodec, source: sources.ImageSource, *, centered: bool, batch_size: int,
                  cache_dir: str, name: str) -> sources.ArraySource:
  """Posterior moments of every image of `source` (float16 [N, h, w, 2 z]) cached in cache_dir, as a source.

  The file name carries the VAE's fingerprint, so a different VAE never reads stale latents; a partly written
  cache is never read (written to a temporary file, then renamed).
  """
  from data import pipeline, scaler  # noqa: the data package imports nothing from train
  path = os.path.join(cache_dir, f'{name}_n{len(source)}_{codec.fingerprint()}.npz')
  if not os.path.exists(path):
    encode = jax.jit(lambda frozen, images: codec.moments(frozen, scaler.to_model(images, centered=centered)))
    moments, labels = [], []
    for batch in pipeline.iterate_once(source, batch_size):
      moments.append(np.asarray(encode(codec.frozen, batch['image'])).astype(np.float16))
      labels.append(batch['label'])
    os.makedirs(cache_dir, exist_ok=True)
    np.savez(path + '.tmp.npz', moments=np.concatenate(moments), labels=np.concatenate(labels))
    os.replace(path + '.tmp.npz', path)
  try:
    with np.load(path, allow_pickle=False) as f:
      moments, labels = f['moments'], f['labels']
  except Exception as e:
    raise DataError(f'latent cache {path} is unreadable ({type(e).__name__}); delete it to recompute') from None
  return sources.ArraySource(moments, labels, num_classes=source.num_classes)
