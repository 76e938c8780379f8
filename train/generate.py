"""Generating images with a model and a sampler, in batches, as uint8 — for snapshots and --mode=sample."""

import functools
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data import scaler
from diffusion.parameterization import make_model_fn
from diffusion.processes import Process
from models import layers
from samplers.guidance import classifier_free_guidance
from train import sharding
from train.latent import LatentCodec

if TYPE_CHECKING:
  from train.text import Table, TextConditioner


def condition(text: 'TextConditioner | None', table: 'Table | None', labels: jax.Array | None):
  """The network's condition for `labels`: a text model's caption ids looked up in the caption table (running a
  frozen encoder), other models' labels (class ids or None) as they are. Samplers get it once, before their
  loop: the loop carries the encoded condition, not the encoder (so its hoisting is not left to XLA)."""
  return labels if text is None or labels is None else text.lookup(table, labels)


def guided_model_fn(model: nnx.Module, process: Process, *, prediction: str, sigma_data: float,
                    guidance_scale: float = 1.0, guidance_rescale: float = 0.0, null_label: int = 0,
                    text: 'TextConditioner | None' = None, table: 'Table | None' = None):
  """The model_fn(x, t, cond) -> (x0, eps) a sampler calls, for cond = condition(text, table, labels): the
  network's output in its parameterization, with classifier-free guidance against null_label (a text model's is
  the table's last row, the empty caption). The model's layers get their parameters in their compute dtype once,
  here, not in each call (layers.cast_params_once)."""
  null = jnp.int32(null_label)
  if text is not None:
    last = jnp.array([table['mask'].shape[0] - 1], jnp.int32)
    null = jax.tree.map(lambda v: v[0], condition(text, table, last))
  model_fn = make_model_fn(layers.cast_params_once(model), process, prediction, sigma_data)
  return classifier_free_guidance(model_fn, guidance_scale, null, guidance_rescale, process)


def make_generate_fn(graphdef: nnx.GraphDef, process: Process, *, prediction: str, sigma_data: float,
                     sample_fn: Callable, settings: Any, shape: tuple[int, ...], centered: bool,
                     guidance_scale: float = 1.0, guidance_rescale: float = 0.0, null_label: int = 0, mesh=None,
                     codec: LatentCodec | None = None, text: 'TextConditioner | None' = None,
                     table: 'Table | None' = None) -> Callable:
  """A jitted fn(params, buffers, rng, labels | None) -> (uint8 images [B, H, W, C], nfe).

  `shape` is what the model sees; with a codec (latent diffusion) the sampled latents are decoded by its frozen
  VAE. With labels and guidance_scale != 1, classifier-free guidance against `null_label` (NFE counts the
  sampler's network evaluations; a guided one is one call on the doubled batch and counts once). A text model's
  labels are row ids of the caption `table` (its last row, the empty caption, is the null label). With a mesh,
  the batch is split over its data-like axes (the samples are the same as on one device: the noise is drawn for
  the global batch).
  """
  def generate(params, buffers, rng, labels, frozen):
    model_fn = guided_model_fn(nnx.merge(graphdef, params, buffers), process, prediction=prediction,
                               sigma_data=sigma_data, guidance_scale=guidance_scale,
                               guidance_rescale=guidance_rescale, null_label=null_label, text=text,
                               table=frozen['text'])
    x, nfe = sample_fn(rng, model_fn, process, shape, settings, condition(text, frozen['text'], labels))
    if codec is not None:
      x = codec.decode(frozen['vae'], x)
    return scaler.to_uint8(x, centered=centered), nfe

  if mesh is None:
    jitted = jax.jit(generate)
  else:
    jitted = jax.jit(generate, out_shardings=(sharding.batch_sharding(mesh), sharding.replicated(mesh)))
  frozen = {'vae': codec.frozen if codec is not None else None, 'text': table}
  frozen = jax.device_put(frozen, sharding.replicated(mesh) if mesh is not None else None)  # once, not per call
  return functools.partial(jitted, frozen=frozen)  # .func and .keywords: the program, e.g. to compile for a GPU


def to_host(x: jax.Array) -> np.ndarray:
  """A (possibly sharded) global array as numpy on every host, in order."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def generate_images(generate_fn: Callable, params, buffers, rng: jax.Array, num_samples: int, batch_size: int,
                    num_classes: int = 0, class_label: int | None = None,
                    first_index: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
  """num_samples images [N, H, W, C] uint8, their labels [N] (-1: unconditional) and the NFE per sample.

  Batch i uses fold_in(rng, i), so the same seed gives the same images whatever else changes.
  Class-conditional models cycle through the classes (image k of the run, counted from first_index, gets
  class k mod num_classes) unless class_label is set.
  """
  images, all_labels, nfe = [], [], 0
  for i in range(-(-num_samples // batch_size)):
    idx = first_index + np.arange(i * batch_size, (i + 1) * batch_size)
    if num_classes > 0:
      labels = np.full(batch_size, class_label, np.int32) if class_label is not None else (idx % num_classes)
      labels = jnp.asarray(labels, jnp.int32)
    else:
      labels = None
    x, nfe = generate_fn(params, buffers, jax.random.fold_in(rng, i), labels)
    images.append(to_host(x))
    all_labels.append(np.asarray(labels) if labels is not None else np.full(batch_size, -1, np.int32))
  return np.concatenate(images)[:num_samples], np.concatenate(all_labels)[:num_samples], int(nfe)
