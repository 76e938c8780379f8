"""Training the KL autoencoder (model.name = 'vae'): the step, the latent scale factor, reconstructions, export.

The loss is LDM's without the perceptual term: per-example reconstruction (L1 or L2, summed over pixels)
+ kl_weight * KL(q(z|x) || N(0, I)) + an optional patch-GAN hinge loss that switches on at disc_start, weighted
adaptively by |grad rec| / |grad adv| at the decoder's last layer (Esser et al. 2021). The discriminator is
trained in the same step on its own hinge loss; both halves share one optimizer state (Adam is per parameter).
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from data import pipeline, scaler
from models import vae_weights
from models.vae import kl_to_standard_normal, psnr, sample_posterior
from train.state import TrainState
from train.step import Batch, apply_gradients, check_ema_decay


@dataclasses.dataclass(frozen=True)
class AutoencoderSettings:
  recon_loss: str = 'l1'  # l1 | l2
  kl_weight: float = 1e-6
  disc_start: int = -1  # < 0: no adversarial loss
  disc_weight: float = 0.5
  ema_decay: float = 0.999
  centered: bool = True
  random_flip: bool = False

  def __post_init__(self):
    check_ema_decay(self.ema_decay)


def _recon(x: jax.Array, y: jax.Array, kind: str) -> jax.Array:
  """Per-example reconstruction loss [B], summed over pixels."""
  d = jnp.abs(x - y) if kind == 'l1' else jnp.square(x - y)
  return d.reshape(d.shape[0], -1).sum(-1)


def make_autoencoder_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                          settings: AutoencoderSettings, rng: jax.Array,
                          param_sharding=None) -> Callable[..., tuple[TrainState, dict]]:
  """fn(state, batch, frozen=None) -> (state, metrics): one step of the autoencoder and its discriminator.

  param_sharding: the parameters' shardings on the mesh (see train.step.apply_gradients)."""
  if settings.recon_loss not in ('l1', 'l2'):
    raise ValueError(f"unknown autoencoder.recon_loss {settings.recon_loss!r}; choose 'l1' or 'l2'")

  def step(state: TrainState, batch: Batch, frozen: Any = None):
    del frozen
    key = jax.random.fold_in(rng, state.step)
    k_flip, k_z, k_drop = jax.random.split(key, 3)
    x = scaler.to_model(batch['image'], centered=settings.centered)
    if settings.random_flip:
      x = scaler.random_flip(x, k_flip)
    gan_on = (settings.disc_start >= 0) & (state.step >= settings.disc_start)

    def generator_loss(params):
      model = nnx.merge(graphdef, params, state.buffers)
      vae = model.vae
      mean, logvar = vae.encode(x, train=True, rngs=nnx.Rngs(dropout=k_drop))
      z = sample_posterior(k_z, mean, logvar)
      if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z.astype(vae.post_quant_conv.kernel.dtype))
      h = vae.decoder.features(z, train=True, rngs=nnx.Rngs(dropout=jax.random.fold_in(k_drop, 1)))
      head = vae.decoder.conv_out

      def out(kernel, features):  # conv_out as a function of its kernel, for the adaptive weight
        y = jax.lax.conv_general_dilated(features, kernel.astype(features.dtype), (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        return (y + head.bias[...].astype(y.dtype)).astype(jnp.float32)

      x_rec = out(head.kernel[...], h)
      rec = _recon(x, x_rec, settings.recon_loss).mean()
      kl = kl_to_standard_normal(mean, logvar).mean()
      to_uint8 = lambda v: scaler.to_uint8(v, centered=settings.centered)
      metrics = {'rec_loss': rec, 'kl': kl, 'psnr': psnr(to_uint8(x_rec), to_uint8(x)).mean()}
      loss = rec + settings.kl_weight * kl
      if model.disc is not None:
        def adversarial(_):
          g_loss = -model.disc(x_rec).mean()
          h_fixed = jax.lax.stop_gradient(h)
          g_rec = jax.grad(lambda k: _recon(x, out(k, h_fixed), settings.recon_loss).mean())(head.kernel[...])
          g_adv = jax.grad(lambda k: -model.disc(out(k, h_fixed)).mean())(head.kernel[...])
          w = jnp.linalg.norm(g_rec) / (jnp.linalg.norm(g_adv) + 1e-4)
          return g_loss, jax.lax.stop_gradient(jnp.clip(w, 0.0, 1e4) * settings.disc_weight)
        g_loss, d_weight = jax.lax.cond(gan_on, adversarial, lambda _: (jnp.zeros(()), jnp.zeros(())), None)
        loss = loss + d_weight * g_loss
        metrics.update(g_loss=g_loss, d_weight=d_weight)
      return loss, (metrics, jax.lax.stop_gradient(x_rec))

    (loss, (metrics, x_rec)), grads = jax.value_and_grad(generator_loss, has_aux=True)(state.params)
    if 'disc' in grads:
      def discriminator_loss(disc_params):
        params = nnx.State({**state.params, 'disc': disc_params})
        disc = nnx.merge(graphdef, params, state.buffers).disc
        real, fake = disc(x), disc(x_rec)
        return 0.5 * (jax.nn.relu(1.0 - real).mean() + jax.nn.relu(1.0 + fake).mean())
      d_loss, d_grads = jax.lax.cond(
          gan_on, jax.value_and_grad(discriminator_loss),
          lambda p: (jnp.zeros(()), jax.tree.map(jnp.zeros_like, p)), state.params['disc'])
      grads['disc'] = d_grads  # the generator loss has no business moving the discriminator
      metrics['d_loss'] = d_loss
    new, grad_norm = apply_gradients(state, loss, grads, tx, settings.ema_decay, param_sharding)
    return new, {'loss': loss, **metrics, 'grad_norm': grad_norm,
                 'lr': jnp.asarray(schedule(state.step), jnp.float32)}

  return step


def make_reconstruct_fn(graphdef: nnx.GraphDef, centered: bool) -> Callable:
  """jitted fn(params, buffers, uint8 images) -> (uint8 reconstructions from the posterior mean, z samples)."""

  @jax.jit
  def reconstruct(params, buffers, images, rng):
    vae = nnx.merge(graphdef, params, buffers).vae
    mean, logvar = vae.encode(scaler.to_model(images, centered=centered))
    return scaler.to_uint8(vae.decode(mean), centered=centered), sample_posterior(rng, mean, logvar)

  return reconstruct


def latent_scale(reconstruct: Callable, params, buffers, source, num_images: int, batch_size: int,
                 rng: jax.Array) -> tuple[float, float]:
  """(1 / std, mean) of posterior samples z over the first num_images of source (the LDM scale factor)."""
  total, total_sq, count, seen = 0.0, 0.0, 0, 0
  for i, batch in enumerate(pipeline.iterate_once(source, batch_size)):
    _, z = reconstruct(params, buffers, batch['image'], jax.random.fold_in(rng, i))
    z = np.asarray(z, np.float64)[:num_images - seen]
    total, total_sq, count, seen = total + z.sum(), total_sq + np.square(z).sum(), count + z.size, seen + len(z)
    if seen >= num_images:
      break
  mean = total / count
  std = float(np.sqrt(max(total_sq / count - mean ** 2, 1e-20)))
  return 1.0 / std, float(mean)


def with_scale(state: TrainState, scale: float, buffer_sharding) -> TrainState:
  buffers = jax.tree.map(lambda v: v, state.buffers)
  buffers['vae'].replace_by_pure_dict({'scaling_factor': jnp.float32(scale),
                                       'shift_factor': buffers['vae']['shift_factor'].value})
  return state.replace(buffers=jax.device_put(buffers, buffer_sharding))


def export(folder: str, model_cfg, state: TrainState) -> str:
  """The EMA autoencoder in diffusers' AutoencoderKL layout (config.json + safetensors), scale factor included."""
  b = state.buffers['vae']
  return vae_weights.save(folder, model_cfg.vae, state.ema_params['vae'], float(b['scaling_factor'].value),
                          float(b['shift_factor'].value))


def reconstruction_grid(images: np.ndarray, recons: np.ndarray, ncol: int = 8) -> np.ndarray:
  """Rows of originals interleaved with rows of their reconstructions [2 N, H, W, C]."""
  n = len(images) // ncol * ncol
  rows = []
  for i in range(0, n, ncol):
    rows.extend([images[i:i + ncol], recons[i:i + ncol]])
  return np.concatenate(rows)

