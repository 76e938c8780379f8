"""The trainer: config in, a trained model, checkpoints, logs and sample grids out.

Besides main.py this is the only module that reads the ConfigDict; it turns each section into the typed
arguments of the modules it builds (`build_*`). Read it top to bottom: set-up, resume, the loop.
"""

import copy
import json
import os
import re
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

import models
import samplers
from samplers import step_schedule
from data import images as image_io
from data import pipeline, scaler, sources
from diffusion import losses, processes
from models import vae
from train import autoencoder, checkpoint, generate, latent, posthoc_ema, sharding, step as step_lib
from train.logger import Logger
from train.optimizer import make_optimizer
from train.state import TrainState


class TrainingDiverged(RuntimeError):
  """The loss or the gradient became NaN or infinite."""


# ---------------------------------------------------------------------------- config -> typed objects
def build_process(config: ml_collections.ConfigDict) -> processes.Process:
  p = config.process
  process = processes.get_process(p.name, schedule=p.schedule, beta_min=p.beta_min, beta_max=p.beta_max,
                                  cosine_s=p.cosine_s, num_timesteps=p.num_timesteps, sigma_min=p.sigma_min,
                                  sigma_max=p.sigma_max, t_eps=p.t_eps, zero_terminal_snr=p.zero_terminal_snr)
  if (p.zero_terminal_snr or p.name == 'flow') and config.model.prediction in ('eps', 'score'):
    # (the cosine DDPM schedule also ends at alpha(T) = 5e-5, but eps-networks are its usual pairing)
    name = "process.name='flow'" if p.name == 'flow' else 'process.zero_terminal_snr'
    raise ValueError(f'{name} ends the process in pure noise (alpha(T) = {float(process.alpha(process.T)):.1e}), '
                     f'where a model.prediction={config.model.prediction} network cannot give '
                     "x0 = (x - sigma eps) / alpha; set model.prediction='v' (Lin et al. 2024), 'flow', 'x0' or 'edm'")
  return process


def is_autoencoder(config: ml_collections.ConfigDict) -> bool:
  return config.model.name == 'vae'


def build_vae_config(config: ml_collections.ConfigDict) -> vae.VAETrainerConfig:
  m, a = config.model, config.autoencoder
  cfg = vae.VAEConfig(in_channels=config.data.num_channels, block_out_channels=tuple(m.nf * k for k in m.ch_mult),
                      layers_per_block=m.num_res_blocks, latent_channels=m.z_channels, norm_num_groups=m.num_groups,
                      dropout=m.dropout, dtype=m.dtype)
  return vae.VAETrainerConfig(vae=cfg, disc_nf=a.disc_nf, disc_layers=a.disc_layers if a.disc_start >= 0 else 0)


def build_codec(config: ml_collections.ConfigDict) -> latent.LatentCodec | None:
  """The frozen VAE of latent diffusion (latent.vae), or None for pixel-space diffusion."""
  if not config.latent.vae:
    return None
  if is_autoencoder(config):
    raise ValueError('latent.vae is set but model.name is vae: an autoencoder is trained on pixels')
  codec = latent.LatentCodec.load(config.latent.vae, config.latent.scale_factor)
  if codec.cfg.in_channels != config.data.num_channels:
    raise ValueError(f'the VAE at {codec.source} encodes {codec.cfg.in_channels}-channel images but '
                     f'data.num_channels={config.data.num_channels}')
  return codec


def build_text(config: ml_collections.ConfigDict, workdir: str | None = None):
  """The text conditioner of config.text (train/text.py), or None for models without text."""
  x = config.text
  if not x.encoder:
    return None
  if config.model.num_classes > 0:
    raise ValueError('text.encoder and model.num_classes are exclusive: a text model is conditioned on captions')
  from models import text as text_models
  from train import text as text_lib
  small = text_models.SmallTextConfig(vocab_size=0, width=x.small_width, layers=x.small_layers,
                                      heads=x.small_heads, max_length=x.max_length)
  cache_dir = x.cache_dir or (os.path.join(workdir, 'text') if workdir else None)
  return text_lib.TextConditioner(text_lib.TextSettings(
      encoder=x.encoder, path=x.path, max_length=x.max_length, mode=x.mode, use_pooled=x.use_pooled,
      small=small if x.encoder == 'small' else None, cache_dir=cache_dir))


def dataset_captions(config: ml_collections.ConfigDict, source=None) -> list[str]:
  """The caption set of a text model's dataset (caption ids index it)."""
  source = source if source is not None else build_source(config, config.data.split)
  captions = getattr(source, 'captions', None)
  if not captions:
    raise ValueError(f'text.encoder={config.text.encoder!r} needs captions, and {config.data.dataset} has none; '
                     "use a captioned dataset (e.g. data.dataset='mnist_captions' or 'composed_digits')")
  return list(captions)


def model_input_shape(config: ml_collections.ConfigDict, codec: latent.LatentCodec | None) -> tuple[int, int, int]:
  """[H, W, C] the diffusion model sees: pixels, or the codec's latents."""
  d = config.data
  return codec.latent_shape(d.image_size) if codec else (d.image_size, d.image_size, d.num_channels)


def build_model(config: ml_collections.ConfigDict, rng: jax.Array, codec=None, text=None) -> nnx.Module:
  m = config.model
  if is_autoencoder(config):
    return vae.VAEWithDiscriminator(build_vae_config(config), rngs=nnx.Rngs(params=rng))
  if config.latent.vae and codec is None:
    raise ValueError('latent.vae is set: build the model with its codec (build_codec) for the latent shape')
  size, _, channels = model_input_shape(config, codec)
  options = {k: m[k] for k in m.keys() if k not in ('name', 'prediction', 'sigma_data', 'z_channels', 'init_from')}
  options.update(image_size=size, in_channels=channels, ch_mult=tuple(m.ch_mult),
                 attn_resolutions=tuple(m.attn_resolutions))
  if config.text.encoder and text is None:
    raise ValueError('text.encoder is set: build the model with its text conditioner (build_text)')
  if text is not None:
    options.update(text.unet_options())
  return models.build_model(m.name, options, rngs=nnx.Rngs(params=rng))


def build_loss(config: ml_collections.ConfigDict) -> losses.LossSettings:
  t = config.training
  return losses.LossSettings(weighting=t.loss_weighting, time_sampling=t.time_sampling, reduce=t.reduce,
                             P_mean=t.P_mean, P_std=t.P_std, sigma_data=config.model.sigma_data,
                             min_snr_gamma=t.min_snr_gamma, time_shift=t.time_shift)


def build_sampler(config: ml_collections.ConfigDict):
  """(settings, sample_fn) from config.sample; x0 is clipped to the data range when sample.clip_x0 (never in
  latent space)."""
  s = config.sample
  if s.num_samples < 1 or s.batch_size < 1:
    raise ValueError(f'sample.num_samples={s.num_samples} and sample.batch_size={s.batch_size} must be at least 1')
  options = dict(s.items())
  clip = s.clip_x0 and not config.latent.vae
  options['clip_range'] = scaler.data_range(config.data.centered) if clip else None
  return samplers.get_sampler(s.sampler, **options)


def with_sampler(config: ml_collections.ConfigDict, name: str, num_steps: int) -> ml_collections.ConfigDict:
  """A copy of config sampling with `name` and num_steps; sample.timesteps carry over only if they have
  num_steps points (a tuned grid belongs to one step count)."""
  c = copy.deepcopy(config)
  c.sample.sampler, c.sample.num_steps = name, num_steps
  if len(c.sample.timesteps) != num_steps:
    c.sample.timesteps = ()
  return c


def build_mesh(config: ml_collections.ConfigDict) -> Mesh:
  p = config.parallel
  return sharding.make_mesh(tuple(p.mesh_shape), tuple(p.mesh_axes))


def build_source(config: ml_collections.ConfigDict, split: str) -> sources.ImageSource:
  d = config.data
  return sources.get_source(d.dataset, split, image_size=d.image_size, num_channels=d.num_channels,
                            data_dir=d.data_dir, resize=d.resize)


_INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def init_state(config: ml_collections.ConfigDict, codec: latent.LatentCodec | None = None, text=None):
  """(graphdef, fresh TrainState, optimizer, lr schedule)."""
  graphdefs = []

  def init(rng):
    # Values that do not depend on the key (flax's RNG counters, zero biases) are computed while tracing: a
    # traced counter makes every draw build jax's error message for `.sharding` on a tracer, which walks the
    # whole trace, so tracing took time quadratic in the number of parameters (NCSN++: 6.5 s, now 1.8 s).
    with jax.ensure_compile_time_eval():
      graphdef, params, buffers = nnx.split(build_model(config, rng, codec, text), nnx.Param, ...)
    graphdefs.append(graphdef)  # static structure, no tracers: one trace gives both
    return params, buffers

  o = config.optim  # the optimizer first: its settings check their values before the model is initialized
  tx, schedule = make_optimizer(o.optimizer, lr=o.lr, beta1=o.beta1, beta2=o.beta2, eps=o.eps,
                                weight_decay=o.weight_decay, warmup_steps=o.warmup_steps, grad_clip=o.grad_clip)
  rng_init = jax.random.fold_in(jax.random.key(config.seed), 0)
  # One compiled program instead of op-by-op initialization, traced once. It runs once, so it is compiled for
  # compile time: a threefry draw per kernel keeps XLA's optimizing backend busy (a tiny U-Net's init: 5.0 s
  # optimized, 1.7 s unoptimized on 2 CPU cores), and the unoptimized program still initializes 36 M parameters
  # in under a second.
  params, buffers = jax.jit(init).lower(rng_init).compile(_INIT_COMPILER_OPTIONS)(rng_init)
  graphdef = graphdefs[0]
  num_profiles = 0 if is_autoencoder(config) else len(config.training.ema_profiles)
  return graphdef, TrainState.create(params, buffers, tx, num_profiles), tx, schedule


def restore_state(config: ml_collections.ConfigDict, workdir: str, ckpt: checkpoint.Checkpointer, state_like,
                  step: int | None = None) -> TrainState:
  """The checkpoint at `step` (None: the latest) for sampling; with sample.ema_sigma_rel set, its EMA parameters
  are the post-hoc EMA of that width at the checkpoint's step, reconstructed from the EMA profile snapshots.
  The EMA profiles the run tracked are restored whatever training.ema_profiles says now (sampling needs no
  training settings)."""
  n = ckpt.num_profiles(ckpt.latest_step() if step is None else step)
  if n != len(state_like.ema_profiles):
    state_like = state_like.replace(ema_profiles=tuple(state_like.params for _ in range(n)))
  state = ckpt.restore(state_like, step)
  sigma_rel = config.sample.ema_sigma_rel
  if sigma_rel is None:
    return state
  params, _ = posthoc_ema.reconstruct(workdir, int(state.step), sigma_rel, state.ema_params)
  shardings = jax.tree.map(lambda a: a.sharding, state.ema_params)
  return state.replace(ema_params=jax.device_put(params, shardings))


def sampling_mesh(config: ml_collections.ConfigDict, batch_size: int) -> Mesh | None:
  """The mesh to split sampling batches over, or None (one device) when the batch does not divide."""
  mesh = build_mesh(config)
  return mesh if batch_size % sharding.batch_parallelism(mesh) == 0 and mesh.size > 1 else None


def make_generate_fn(config: ml_collections.ConfigDict, graphdef, process, codec, batch_size: int, text=None,
                     table=None):
  """The generator of config.sample's sampler for batches of batch_size (decoding latents with the codec;
  a text model's labels are row ids of the caption table)."""
  settings, sample_fn = build_sampler(config)
  d, s = config.data, config.sample
  return generate.make_generate_fn(graphdef, process, prediction=config.model.prediction,
                                   sigma_data=config.model.sigma_data, sample_fn=sample_fn, settings=settings,
                                   shape=(batch_size, *model_input_shape(config, codec)), centered=d.centered,
                                   guidance_scale=s.guidance_scale, guidance_rescale=s.guidance_rescale,
                                   null_label=config.model.num_classes, mesh=sampling_mesh(config, batch_size),
                                   codec=codec, text=text, table=table)


def sample_conditions(config: ml_collections.ConfigDict, text=None, captions: list[str] | None = None):
  """(caption table or None, number of labels to cycle through) of the samples: the classes of a
  class-conditional model; sample.prompt alone, or else the dataset's captions, for a text model."""
  if text is None:
    if config.sample.prompt:
      raise ValueError('sample.prompt needs a text model (text.encoder)')
    return None, config.model.num_classes
  prompts = [config.sample.prompt] if config.sample.prompt else captions
  return text.table(prompts), len(prompts)


def make_snapshot_fn(config: ml_collections.ConfigDict, graphdef, process, codec=None, text=None,
                     captions: list[str] | None = None):
  """fn(state, path) writing a grid of EMA samples; returns (images, labels, nfe)."""
  s = config.sample
  table, num_labels = sample_conditions(config, text, captions)
  gen = make_generate_fn(config, graphdef, process, codec, s.batch_size, text, table)
  rng = jax.random.fold_in(jax.random.key(config.seed), 2)
  ncol = num_labels if 0 < num_labels <= 10 else (10 if num_labels % 10 == 0 else None)

  def snapshot(state: TrainState, path: str):
    imgs, labels, nfe = generate.generate_images(gen, state.ema_params, state.buffers, rng, s.num_samples,
                                                 s.batch_size, num_labels, s.class_label)
    if jax.process_index() == 0:
      image_io.save_grid(path, imgs, ncol=ncol)  # one column per class (per digit of a caption set)
    return imgs, labels, nfe

  return snapshot


def make_reconstruction_snapshot(config: ml_collections.ConfigDict, graphdef):
  """Autoencoders: fn(state, path) writing originals and EMA reconstructions of the first sample.num_samples
  evaluation images (alternate rows) and returning their mean PSNR (dB)."""
  source = build_source(config, config.data.eval_split)
  n = min(config.sample.num_samples, len(source))
  images = np.stack([source[i]['image'] for i in range(n)])
  reconstruct = autoencoder.make_reconstruct_fn(graphdef, config.data.centered)

  def snapshot(state: TrainState, path: str) -> float:
    recons, _ = reconstruct(state.ema_params, state.buffers, images, jax.random.key(0))
    recons = generate.to_host(recons)
    if jax.process_index() == 0:
      image_io.save_grid(path, autoencoder.reconstruction_grid(images, recons, ncol=8), ncol=8)
    return float(np.mean(np.asarray(vae.psnr(recons, images))))

  return snapshot, reconstruct


def _check_intervals(t: ml_collections.ConfigDict) -> None:
  k = t.steps_per_call
  if k < 1 or t.grad_accum < 1:
    raise ValueError(f'training.steps_per_call={k} and training.grad_accum={t.grad_accum} must be at least 1')
  for name in ('log_every', 'snapshot_every', 'checkpoint_every') + (('ema_profile_every',) if t.ema_profiles else ()):
    if t[name] < 1:
      raise ValueError(f'training.{name}={t[name]} must be a positive number of steps')
    if t[name] % k:
      raise ValueError(f'training.{name}={t[name]} is not a multiple of training.steps_per_call={k}')


def _training_source(config: ml_collections.ConfigDict, codec: latent.LatentCodec | None, workdir: str):
  """(the training split, or with latent.cache its cached VAE posterior moments; the caption set or None)."""
  source = build_source(config, config.data.split)  # fails early on missing data or a size mismatch
  captions = dataset_captions(config, source) if config.text.encoder else None
  if codec is None or not config.latent.cache:
    return source, captions
  if config.data.random_flip or config.data.uniform_dequantization:
    raise ValueError('latent.cache stores the latents of the unaugmented images: it cannot be combined with '
                     'data.random_flip or data.uniform_dequantization')
  cache_dir = config.latent.cache_dir or os.path.join(workdir, 'latents')
  d = config.data
  name = re.sub(r'[^A-Za-z0-9+.-]+', '_', f'{d.dataset}_{d.split}_{d.image_size}px')
  return latent.cache_moments(codec, source, centered=d.centered, batch_size=config.eval.batch_size,
                              cache_dir=cache_dir, name=name), captions


# ---------------------------------------------------------------------------- the loop
def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  t = config.training
  _check_intervals(t)
  n_proc = jax.process_count()
  mesh = build_mesh(config)
  n_batch = sharding.batch_parallelism(mesh)
  if t.batch_size % (n_batch * t.grad_accum):
    raise ValueError(f'training.batch_size={t.batch_size} is not divisible by the {n_batch}-way batch '
                     f'parallelism times training.grad_accum={t.grad_accum}')
  process = build_process(config)
  codec = build_codec(config)
  text = build_text(config, workdir)
  source, captions = _training_source(config, codec, workdir)
  if config.model.num_classes > 0 and source.num_classes == 0:
    raise ValueError(f'model.num_classes={config.model.num_classes} but {config.data.dataset} has no labels')
  table = text.table(captions) if text is not None else None  # row len(captions): the empty caption

  if t.ema_profiles and is_autoencoder(config):
    raise ValueError('training.ema_profiles (post-hoc EMA) is for diffusion models, not autoencoders (model.name=vae)')
  profile_gammas = posthoc_ema.profile_gammas(t.ema_profiles)
  d = config.data
  # The settings check their values: built before the model is initialized, a bad value stops the run at once.
  if is_autoencoder(config):
    a = config.autoencoder
    if t.grad_accum != 1:
      raise ValueError('training.grad_accum is not supported for autoencoders (model.name=vae)')
    settings = autoencoder.AutoencoderSettings(
        recon_loss=a.recon_loss, kl_weight=a.kl_weight, disc_start=a.disc_start, disc_weight=a.disc_weight,
        ema_decay=t.ema_decay, centered=d.centered, random_flip=d.random_flip)
  else:
    settings = step_lib.StepSettings(
        prediction=config.model.prediction, loss=build_loss(config), ema_decay=t.ema_decay,
        ema_profile_gammas=profile_gammas, centered=d.centered,
        dequantize=d.uniform_dequantization, random_flip=d.random_flip,
        num_classes=len(captions) if text is not None else config.model.num_classes,
        label_dropout=t.label_dropout, grad_accum=t.grad_accum, cached_latents=codec is not None and config.latent.cache)
    build_sampler(config)  # the snapshots' sampler
  graphdef, state, tx, schedule = init_state(config, codec, text)
  # The state lives on the mesh before a restore, so a checkpoint written on any other mesh is resharded
  # onto this one.
  state_sharding = sharding.state_shardings(state, mesh, config.parallel.fsdp_min_size)
  state = jax.device_put(state, state_sharding)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), t.keep_checkpoints)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(state)
  start = int(state.step)
  batch_sharding = sharding.batch_sharding(mesh, leading=1)  # [k, B, ...]
  rng_train = jax.random.fold_in(jax.random.key(config.seed), 1)
  if is_autoencoder(config):
    one_step = autoencoder.make_autoencoder_step(graphdef, tx, schedule, settings, rng_train,
                                                  param_sharding=state_sharding.params)
    snapshot, reconstruct = make_reconstruction_snapshot(config, graphdef)
  else:
    one_step = step_lib.make_train_step(graphdef, process, tx, schedule, settings, rng_train, codec, text,
                                        param_sharding=state_sharding.params)
    snapshot = make_snapshot_fn(config, graphdef, process, codec, text, captions)
  frozen = jax.device_put({'vae': codec.frozen if codec is not None else None, 'text': table},
                          sharding.replicated(mesh))
  train_fn = jax.jit(step_lib.multi_step(one_step, t.steps_per_call),
                     in_shardings=(state_sharding, batch_sharding, sharding.replicated(mesh)),
                     out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)

  def save_checkpoint(state: TrainState, step: int) -> TrainState:
    if is_autoencoder(config):  # the latent scale factor travels with the weights, then the diffusers export
      scale, _ = autoencoder.latent_scale(reconstruct, state.ema_params, state.buffers, source,
                                          config.autoencoder.scale_images, config.eval.batch_size,
                                          jax.random.fold_in(jax.random.key(config.seed), 5))
      state = autoencoder.with_scale(state, scale, state_sharding.buffers)
    ckpt.save(step, state)
    if is_autoencoder(config) and jax.process_index() == 0:
      autoencoder.export(os.path.join(workdir, 'vae'), build_vae_config(config), state)
    return state

  def save_profiles(state: TrainState, step: int) -> None:
    """The EMA profiles at `step` for post-hoc EMA; every process takes part in the gather, process 0 writes."""
    profiles = multihost_utils.process_allgather(state.ema_profiles, tiled=True)
    if jax.process_index() == 0:
      posthoc_ema.save_snapshot(workdir, step, tuple(t.ema_profiles), profiles)

  k = t.steps_per_call
  batches = pipeline.make_batches(source, batch_size=t.batch_size // n_proc, seed=config.seed,
                                  start_step=start, shard_index=jax.process_index(), shard_count=n_proc,
                                  num_threads=config.data.num_threads, prefetch=config.data.prefetch)

  def next_device_batch():
    local = [next(batches) for _ in range(k)]
    stacked = {key: np.stack([b[key] for b in local]) for key in local[0]}
    return {key: jax.make_array_from_process_local_data(batch_sharding, v) for key, v in stacked.items()}

  stop = {'signal': None}
  previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
  logger = Logger(workdir, t.num_steps, start, t.progress_bar)
  where = f' latents of {codec.source} (scale {codec.scale:.4g})' if codec is not None else ''
  if text is not None:
    where += f', {len(captions):,} captions ({config.text.encoder} text encoder, {text.mode})'
  logger.info(f'training {config.model.name} on {config.data.dataset}{where}: {_param_count(state.params):,} '
              f'parameters, mesh {dict(mesh.shape)}, steps {start} -> {t.num_steps}')

  def check_finite():
    bad = int(state.bad_step)
    if bad >= 0:
      raise TrainingDiverged(f'loss or gradient is not finite at step {bad}; training stopped. The last good '
                             f'checkpoint is step {ckpt.latest_step()} in {ckpt.directory}')

  pending, step = [], start
  try:
    device_batch = next_device_batch() if step < t.num_steps else None
    while step < t.num_steps:
      state, metrics = train_fn(state, device_batch, frozen)
      step += k
      pending.append(metrics)
      if step < t.num_steps:
        device_batch = next_device_batch()  # host work overlaps the device step
      logger.advance(k)
      stopping = stop['signal'] is not None  # read once: a signal arriving later is seen next iteration
      done = step >= t.num_steps or stopping
      if step % t.log_every == 0 or done:
        values = jax.device_get(pending)
        pending = []
        check_finite()
        logger.scalars(step, {name: float(np.mean([v[name] for v in values])) for name in values[0]})
      checkpointing = step % t.checkpoint_every == 0 or done
      if checkpointing:
        check_finite()
        state = save_checkpoint(state, step)
      if t.ema_profiles and (checkpointing or step % t.ema_profile_every == 0):
        save_profiles(state, step)
      if step % t.snapshot_every == 0 or step >= t.num_steps:
        path = os.path.join(workdir, 'samples', f'step_{step:08d}.png')
        out = snapshot(state, path)
        extra = f' (reconstruction PSNR {out:.2f} dB)' if is_autoencoder(config) else ''
        logger.info(f'step {step}: {"reconstructions" if extra else "sample grid"} {path}{extra}')
      if stopping:
        logger.info(f'SIGTERM received: checkpoint saved at step {step}, exiting')
        break
  finally:
    ckpt.close()
    logger.close()
    signal.signal(signal.SIGTERM, previous_handler)
  return state


def import_weights(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """--mode=import: the released U-Net at model.init_from (models/unet_weights.py) as the step-0 checkpoint of
  workdir, parameters and EMA alike; sample, eval and train (fine-tuning) then start from it. The config must
  describe that network: every option it needs that the config sets otherwise is named in one error."""
  from models import unet_weights
  if not config.model.init_from:
    raise ValueError('--mode=import needs --config.model.init_from=<diffusers UNet2DModel folder>')
  released = unet_weights.read(config.model.init_from)
  # every config value the network needs, by config key (the data's shape for the network's input and output)
  data_keys = {'image_size': 'data.image_size', 'in_channels': 'data.num_channels',
               'out_channels': 'data.num_channels'}
  needs = {data_keys.get(k, f'model.{k}'): v for k, v in released.options.items()}
  needs.update({'model.name': 'ddpmpp', 'model.prediction': 'eps', 'latent.vae': None, 'text.encoder': None,
                'model.num_classes': 0, 'process.name': 'ddpm' if released.layout == 'ddpm' else 've'})
  value = lambda key: config[key.split('.')[0]][key.split('.')[1]]
  want = {k: v for k, v in needs.items() if _normal(value(k)) != _normal(v)}
  if want:
    raise ValueError(f'{released.source} is a {released.layout} network; set ' +
                     ' '.join(f'--config.{k}={v!r}' for k, v in sorted(want.items())))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), config.training.keep_checkpoints)
  if ckpt.latest_step() is not None:
    raise ValueError(f'{workdir} already has checkpoints (latest step {ckpt.latest_step()}); import into a new '
                     'workdir')
  _, state, _, _ = init_state(config)
  flat = nnx.to_flat_state(state.params)
  values = unet_weights.to_params(released, [(path, v.shape) for path, v in flat])
  params = nnx.from_flat_state([(path, v.replace(jnp.asarray(values[path]))) for path, v in flat])
  buffers = nnx.from_flat_state([(path, v.replace(jnp.asarray(values[path])) if path in values else v)
                                 for path, v in nnx.to_flat_state(state.buffers)])
  state = state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params), buffers=buffers)
  ckpt.save(0, state)
  ckpt.close()
  return {'source': released.source, 'layout': released.layout, 'num_params': _param_count(params)}


def _normal(value):
  """A config value comparable with a released option (tuples and lists alike)."""
  return tuple(value) if isinstance(value, (list, tuple)) else value


def _param_count(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _restore_for_sampling(config: ml_collections.ConfigDict, workdir: str):
  """(process, codec, text, captions, graphdef, state) of sample.checkpoint_step (None: the latest)."""
  process, codec, text = build_process(config), build_codec(config), build_text(config, workdir)
  captions = dataset_captions(config) if text is not None and not config.sample.prompt else None
  graphdef, state, _, _ = init_state(config, codec, text)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
  state = restore_state(config, workdir, ckpt, state, config.sample.checkpoint_step)
  ckpt.close()
  return process, codec, text, captions, graphdef, state


def sample(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """--mode=sample: EMA samples from a checkpoint as a PNG grid and an .npz of uint8 images and labels."""
  if is_autoencoder(config):
    raise ValueError('--mode=sample draws from diffusion models; an autoencoder (model.name=vae) is evaluated '
                     'with --mode=eval (reconstruction PSNR / rFID)')
  process, codec, text, captions, graphdef, state = _restore_for_sampling(config, workdir)
  step = int(state.step)
  s = config.sample
  snapshot = make_snapshot_fn(config, graphdef, process, codec, text, captions)
  name = f'{s.sampler}_{s.num_steps}steps_step{step:08d}' + (f'_ema{s.ema_sigma_rel:.3f}' if s.ema_sigma_rel else '')
  if s.prompt:
    name += '_' + re.sub(r'[^a-z0-9]+', '_', s.prompt.lower()).strip('_')[:60]
  png = os.path.join(workdir, 'samples', f'{name}.png')
  t0 = time.perf_counter()
  imgs, labels, nfe = snapshot(state, png)
  seconds = time.perf_counter() - t0
  npz = os.path.join(workdir, 'samples', f'{name}.npz')
  np.savez_compressed(npz, images=imgs, labels=labels)
  info = {'png': png, 'npz': npz, 'step': step, 'sampler': s.sampler, 'nfe': nfe, 'num_samples': len(imgs),
          'seconds': round(seconds, 2), **({'prompt': s.prompt} if s.prompt else {}),
          'ema': f'post-hoc EMA sigma_rel {s.ema_sigma_rel:g}' if s.ema_sigma_rel else "the checkpoint's EMA"}
  with open(os.path.join(workdir, 'samples', f'{name}.json'), 'w') as f:
    json.dump(info, f, indent=2)
  return info


def tune_steps(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """--mode=tune_steps: the time grid of sample.sampler with sample.num_steps, fitted on a checkpoint's EMA
  model to tune.teacher from the same noise (samplers/step_schedule.py). Writes
  <workdir>/timesteps/<sampler>_<K>steps_step<N>.json with the grid and the --config flag that uses it."""
  if is_autoencoder(config):
    raise ValueError('--mode=tune_steps tunes a diffusion sampler; model.name=vae has none')
  process, codec, text, captions, graphdef, state = _restore_for_sampling(config, workdir)
  s, t = config.sample, config.tune
  settings, sample_fn = build_sampler(config)
  name, _, steps = t.teacher.partition(':')
  if not steps.isdigit():
    raise ValueError(f"tune.teacher={t.teacher!r} is not 'sampler:num_steps' (e.g. 'dpm_solver:200')")
  teacher_config = with_sampler(config, name, int(steps))
  teacher_settings, teacher_fn = build_sampler(teacher_config)
  table, num_labels = sample_conditions(config, text, captions)
  labels = None
  if num_labels > 0:
    labels = jnp.asarray(np.full(t.batch_size, s.class_label) if s.class_label is not None
                         else np.arange(t.batch_size) % num_labels, jnp.int32)

  def make_model_fn(args):
    params, buffers, table = args
    return generate.guided_model_fn(nnx.merge(graphdef, params, buffers), process,
                                    prediction=config.model.prediction, sigma_data=config.model.sigma_data,
                                    guidance_scale=s.guidance_scale, guidance_rescale=s.guidance_rescale,
                                    null_label=config.model.num_classes, text=text, table=table)

  cond = jax.jit(lambda table, y: generate.condition(text, table, y))(table, labels)  # encoded once
  t0 = time.perf_counter()
  # The bar's first tick comes after the teacher's samples and the first compilation.
  bar = tqdm(total=t.num_iters, desc=f'tuning {s.sampler} {s.num_steps} steps (teacher {t.teacher} first)',
             unit='iter', dynamic_ncols=True, disable=jax.process_index() != 0)
  on_iter = lambda i, loss: (bar.update(1), bar.set_postfix(mse=f'{loss:.4g}'))
  try:
    result = step_schedule.tune_timesteps(
        jax.random.fold_in(jax.random.key(config.seed), 5), make_model_fn, process,
        (t.batch_size, *model_input_shape(config, codec)), sample_fn, settings, teacher_fn, teacher_settings,
        step_schedule.TuneSettings(num_iters=t.num_iters, lr=t.lr, t_min=t.t_min), cond=cond,
        model_args=(state.ema_params, state.buffers, table), on_iter=on_iter)
  finally:
    bar.close()
  grid = ', '.join(f'{x:.6g}' for x in result.timesteps)
  info = {'sampler': s.sampler, 'num_steps': len(result.timesteps), 'step': int(state.step),
          'teacher': t.teacher, 'timesteps': list(result.timesteps), 'initial_mse': result.initial_loss,
          'mse': result.loss, 'seconds': round(time.perf_counter() - t0, 1),
          'flag': f'--config.sample.timesteps="({grid})"'}
  out = os.path.join(workdir, 'timesteps', f'{s.sampler}_{info["num_steps"]}steps_step{info["step"]:08d}.json')
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, 'w') as f:
      json.dump(info, f, indent=1)
  return {**info, 'json': out}
