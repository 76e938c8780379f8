"""--mode=fid_stats and --mode=eval: reference statistics, then FID / KID / IS (and bits/dim) of checkpoints.

Like the trainer, this module reads the ConfigDict and hands typed arguments to eval/. Results go to
<workdir>/eval/: one JSON per (checkpoint, sampler) — written last, so a preempted run redoes only the
unfinished pair, and named with a hash of the settings it depends on, so a rerun with other settings (guidance,
time grid, number of samples...) computes a new result instead of returning the old one — plus, per checkpoint,
a table (JSON + markdown) and a plot of FID against NFE, and TensorBoard scalars under <workdir>/tb. On several
hosts every host computes (generation and features are split over the global mesh), process 0 alone writes, and
whether a result already exists is decided by process 0 for all, so every host makes the same collective calls.
"""

import hashlib
import json
import os
import time

import jax
import jax.experimental.multihost_utils as multihost_utils
import ml_collections
import numpy as np
from tensorboardX import SummaryWriter
from flax import nnx
from tqdm import tqdm

from data import pipeline
from diffusion.parameterization import make_model_fn
from eval import fid, inception_weights, likelihood, metrics
from models import vae
from train import autoencoder, checkpoint, generate, trainer


def _cache_dir(config: ml_collections.ConfigDict) -> str:
  """eval.cache_dir, else the folder that also caches the converted Inception weights."""
  return os.path.dirname(inception_weights.cache_path(config.eval.cache_dir))


def _extractor(config: ml_collections.ConfigDict) -> fid.FeatureExtractor:
  """The Inception feature extractor, its batches split over the mesh when they divide over it."""
  return fid.FeatureExtractor(config.eval.inception_weights, config.eval.batch_size, cache_dir=config.eval.cache_dir,
                              mesh=trainer.sampling_mesh(config, config.eval.batch_size))


def _exists(*paths: str) -> bool:
  """Whether all paths exist, as process 0 sees them (shared by every host, so all take the same branch)."""
  found = all(os.path.exists(p) for p in paths)
  if jax.process_count() > 1:
    found = bool(multihost_utils.broadcast_one_to_all(np.asarray(found)))
  return found


# Config keys that do not change a result of --mode=eval (which checkpoints and samplers are run is in the name).
_NOT_IN_RESULT = {'sample': ('num_samples', 'batch_size', 'checkpoint_step', 'sampler', 'num_steps'),
                  'eval': ('checkpoints', 'samplers', 'cache_dir')}


def _result_path(eval_dir: str, stem: str, config: ml_collections.ConfigDict) -> tuple[str, dict]:
  """(<eval_dir>/<stem>_<hash>.json, the settings hashed): the seed, data, model, process, latent, text, sample
  and eval sections, less the keys of _NOT_IN_RESULT."""
  settings = {'seed': config.seed}
  for section in ('data', 'model', 'process', 'latent', 'text', 'sample', 'eval'):
    skip = _NOT_IN_RESULT.get(section, ())
    settings[section] = {k: v for k, v in config[section].to_dict().items() if k not in skip}
  digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
  return os.path.join(eval_dir, f'{stem}_{digest}.json'), settings


def _read_result(path: str):
  """A result written before (a row, or a list of rows), without the settings it was stored with."""
  with open(path) as f:
    obj = json.load(f)
  strip = lambda row: {k: v for k, v in row.items() if k != 'settings'}
  return [strip(r) for r in obj] if isinstance(obj, list) else strip(obj)


def _write_json(path: str, obj) -> None:
  """Process 0 writes `obj` to path atomically (a result file is the marker that its work is done)."""
  if jax.process_index() == 0:
    with open(path + '.tmp', 'w') as f:
      json.dump(obj, f, indent=1)
    os.replace(path + '.tmp', path)


def reference_paths(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(statistics .npz, features .npz) of the reference set: per dataset, split, resolution and size."""
  d, e = config.data, config.eval
  split = e.ref_split or d.eval_split
  name = f'{d.dataset}_{split}_{d.image_size}px_{d.num_channels}ch_n{e.ref_max_images}'
  if d.dataset == 'folder':  # a folder is identified by its path
    digest = hashlib.sha1(os.path.abspath(d.data_dir or '').encode()).hexdigest()[:10]
    name = f'folder_{digest}_{name[len("folder_"):]}'
  base = os.path.join(_cache_dir(config), 'fid_stats', name)
  return base + '.npz', base + '_features.npz'


def fid_stats(config: ml_collections.ConfigDict, extractor: fid.FeatureExtractor | None = None) -> dict:
  """--mode=fid_stats: Inception statistics of the reference split, cached (pytorch-fid .npz format).

  The features themselves are cached too: KID and precision / recall need them, not only (mu, sigma).
  """
  stats_path, feats_path = reference_paths(config)
  if _exists(stats_path, feats_path):
    return {'stats': stats_path, 'features': feats_path, 'cached': True}
  split = config.eval.ref_split or config.data.eval_split
  source = trainer.build_source(config, split)
  extractor = extractor or _extractor(config)
  n = min(len(source), config.eval.ref_max_images)
  feats, logits = fid.source_features(extractor, source, n, config.eval.batch_size,
                                      desc=f'reference features ({config.data.dataset}/{split})')
  mu, sigma = metrics.mu_sigma(feats)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(stats_path), exist_ok=True)
    np.savez(feats_path + '.tmp.npz', features=feats, **({'logits': logits} if logits is not None else {}))
    os.replace(feats_path + '.tmp.npz', feats_path)
    metrics.save_stats(stats_path, mu, sigma, num_images=n)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('fid_stats written')  # the other hosts read them next
  return {'stats': stats_path, 'features': feats_path, 'cached': False, 'num_images': n}


def _parse_samplers(config: ml_collections.ConfigDict) -> list[tuple[str, int]]:
  if not config.eval.samplers:
    return [(config.sample.sampler, config.sample.num_steps)]
  out = []
  for entry in config.eval.samplers:
    name, _, steps = str(entry).partition(':')
    if not steps.strip().isdigit():
      raise ValueError(f"eval.samplers entry {entry!r} is not 'sampler:num_steps' (e.g. 'ddim:50')")
    out.append((name.strip(), int(steps)))
  return out


def _select_steps(available: list[int], spec: str) -> list[int]:
  if not available:
    raise checkpoint.CheckpointError('no checkpoint to evaluate: train first (--mode=train)')
  if spec == 'latest':
    return [max(available)]
  if spec == 'all':
    return sorted(available)
  lo, sep, hi = spec.partition(':')
  try:
    lo_i, hi_i = int(lo) if lo else 0, int(hi) if hi else max(available)
  except ValueError:
    lo_i = None
  if not sep or lo_i is None:
    raise ValueError(f"eval.checkpoints must be 'latest', 'all' or 'A:B', got {spec!r}")
  chosen = [s for s in sorted(available) if lo_i <= s <= hi_i]
  if not chosen:
    raise checkpoint.CheckpointError(f'no checkpoint with step in [{lo_i}, {hi_i}]; have {sorted(available)}')
  return chosen


def _sample_metrics(config, feats, logits, ref_mu, ref_sigma, ref_feats) -> dict:
  wanted, out = set(config.eval.metrics), {}
  unknown = wanted - {'fid', 'kid', 'is', 'pr'}
  if unknown:
    raise ValueError(f'unknown eval.metrics {sorted(unknown)}; choose from fid, kid, is, pr')
  if 'fid' in wanted:
    out['fid'] = metrics.frechet_distance(*metrics.mu_sigma(feats), ref_mu, ref_sigma)
  if 'kid' in wanted and ref_feats is not None:
    out['kid'], out['kid_std'] = metrics.kid(feats, ref_feats)
  if 'is' in wanted:
    if logits is not None:
      out['is'], out['is_std'] = metrics.inception_score(logits)
    else:
      out['is_note'] = 'no Inception Score: these Inception weights have no 1008-way classifier'
  if 'pr' in wanted and ref_feats is not None:
    out['precision'], out['recall'] = metrics.precision_recall(ref_feats, feats)
  return out


def _write_table(eval_dir: str, step: int, rows: list[dict], ema_sigma_rel: float | None = None) -> None:
  """FID (and friends) against NFE for one checkpoint (and post-hoc EMA width): JSON, markdown and a PNG plot
  (process 0)."""
  if jax.process_index() != 0:
    return
  base = os.path.join(eval_dir, f'table_step{step:08d}' + (f'_ema{ema_sigma_rel:.3f}' if ema_sigma_rel else ''))
  with open(base + '.json', 'w') as f:
    json.dump(rows, f, indent=1)
  keys = [k for k in ('fid', 'kid', 'is', 'precision', 'recall', 'bpd') if any(k in r for r in rows)]
  lines = ['| sampler | steps | NFE | ' + ' | '.join(keys) + ' |', '|---|---|---|' + '---|' * len(keys)]
  for r in rows:
    cells = [f'{r[k]:.4g}' if k in r else '' for k in keys]
    sampler = r['sampler'] + (' (explicit grid)' if r.get('timesteps') else '')
    lines.append(f"| {sampler} | {r['num_steps']} | {r['nfe']} | " + ' | '.join(cells) + ' |')
  with open(base + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')
  if any('fid' in r for r in rows):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r['sampler'] for r in rows):
      pts = sorted((r['nfe'], r['fid']) for r in rows if r['sampler'] == name and 'fid' in r)
      ax.plot(*zip(*pts), marker='o', label=name)
    ax.set(xscale='log', xlabel='NFE', ylabel='FID',
           title=f'step {step}' + (f', post-hoc EMA sigma_rel {ema_sigma_rel:g}' if ema_sigma_rel else ''))
    ax.legend()
    fig.tight_layout()
    fig.savefig(base + '.png', dpi=110)
    plt.close(fig)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """--mode=eval: every selected checkpoint x sampler -> metrics JSON; skips pairs already evaluated."""
  e = config.eval
  eval_dir = os.path.join(workdir, 'eval')
  os.makedirs(eval_dir, exist_ok=True)
  if trainer.is_autoencoder(config):
    return evaluate_autoencoder(config, workdir)
  if e.bpd and config.latent.vae:
    raise ValueError('eval.bpd is the likelihood of pixels; a latent diffusion model has none of its own '
                     '(set eval.bpd=False)')
  plan = _parse_samplers(config)
  for name, _ in plan:
    trainer.build_sampler(trainer.with_sampler(config, name, 2))  # an unknown sampler fails before any work
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
  steps = _select_steps(ckpt.all_steps(), e.checkpoints)

  # eval.metrics=() with eval.binding: only the binding evaluation, no Inception network or sampler rows
  if not e.metrics and e.binding and not e.bpd:
    plan_rows = []
  else:
    plan_rows = plan
    extractor = _extractor(config)
    ref_feats = None
    if e.ref_stats:
      ref_mu, ref_sigma = metrics.load_stats(e.ref_stats)
      if {'kid', 'pr'} & set(e.metrics):
        raise ValueError('eval.ref_stats holds only (mu, sigma): KID and precision/recall need the reference '
                         "features; drop them from eval.metrics or leave eval.ref_stats unset")
    else:
      paths = fid_stats(config, extractor)
      ref_mu, ref_sigma = metrics.load_stats(paths['stats'])
      with np.load(paths['features'], allow_pickle=False) as f:
        ref_feats = f['features']

  process = trainer.build_process(config)
  codec = trainer.build_codec(config)
  text = trainer.build_text(config, workdir)
  if text is not None and e.bpd:
    raise ValueError('eval.bpd is not supported for text-conditioned models (set eval.bpd=False)')
  captions = trainer.dataset_captions(config) if text is not None else None
  table, num_labels = trainer.sample_conditions(config, text, captions)
  graphdef, state_like, _, _ = trainer.init_state(config, codec, text)
  bpd_fn, gens = None, {}
  writer = SummaryWriter(os.path.join(workdir, 'tb')) if jax.process_index() == 0 else None
  results = []
  for step in steps:
    state = bpd_row = None
    rows = []
    for name, num_steps in plan_rows:
      label = f'{name}_{num_steps}'
      pair_config = trainer.with_sampler(config, name, num_steps)
      path, settings = _result_path(eval_dir, f'step{step:08d}_{label}', pair_config)
      if _exists(path):
        rows.append(_read_result(path))
        continue
      if state is None:
        state = trainer.restore_state(config, workdir, ckpt, state_like, step)
      if label not in gens:  # traced once, used for every checkpoint
        gens[label] = trainer.make_generate_fn(pair_config, graphdef, process, codec, e.batch_size, text, table)
      gen = gens[label]
      rng = jax.random.fold_in(jax.random.key(config.seed), 3)
      t0 = time.perf_counter()
      feats, logits, nfe = _generated_features(gen, state, rng, extractor, config, num_labels,
                                               desc=f'step {step} {label}')
      row = {'step': step, 'sampler': name, 'num_steps': num_steps, 'nfe': nfe, 'num_samples': e.num_samples,
             **({'ema_sigma_rel': config.sample.ema_sigma_rel} if config.sample.ema_sigma_rel is not None else {}),
             'timesteps': list(pair_config.sample.timesteps),
             'reference': e.ref_stats or reference_paths(config)[0],
             **_sample_metrics(config, feats, logits, ref_mu, ref_sigma, ref_feats),
             'seconds': round(time.perf_counter() - t0, 1)}
      if e.bpd:
        bpd_fn = bpd_fn or _make_bpd_fn(config, graphdef, process)
        bpd_row = bpd_row or bpd_fn(state)  # the model's likelihood: once per checkpoint, not per sampler
        row.update(bpd_row)
      if writer is not None:
        for k in ('fid', 'kid', 'is', 'precision', 'recall', 'bpd'):
          if k in row:
            writer.add_scalar(f'eval/{label}/{k}', row[k], step)
        writer.flush()
      _write_json(path, {**row, 'settings': settings})  # the marker that this pair is done
      rows.append(row)
    if rows:
      _write_table(eval_dir, step, rows, config.sample.ema_sigma_rel)
    results.extend(rows)
    if e.binding:
      state = state if state is not None else trainer.restore_state(config, workdir, ckpt, state_like, step)
      results.extend(_binding(config, eval_dir, step, state, graphdef, process, codec, text, plan[0]))
  ckpt.close()
  if writer is not None:
    writer.close()
  return results


def evaluate_autoencoder(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """--mode=eval of a VAE: per checkpoint, PSNR of EMA reconstructions (posterior mean) of the first
  eval.num_samples evaluation images, the std of their scaled latents (~1 with the stored scale factor), and
  with 'fid' / 'kid' in eval.metrics the reconstructions' FID / KID against the reference statistics."""
  e, d = config.eval, config.data
  if config.sample.ema_sigma_rel is not None:
    raise ValueError('sample.ema_sigma_rel (post-hoc EMA) is for diffusion models, not autoencoders (model.name=vae)')
  eval_dir = os.path.join(workdir, 'eval')
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
  steps = _select_steps(ckpt.all_steps(), e.checkpoints)
  graphdef, state_like, _, _ = trainer.init_state(config)
  reconstruct = autoencoder.make_reconstruct_fn(graphdef, d.centered)
  source = trainer.build_source(config, d.eval_split)
  n = min(len(source), e.num_samples)
  wanted = set(e.metrics) & {'fid', 'kid'}
  extractor = _extractor(config) if wanted else None
  if wanted:
    paths = fid_stats(config, extractor)
    ref_mu, ref_sigma = metrics.load_stats(paths['stats'])
    with np.load(paths['features'], allow_pickle=False) as f:
      ref_feats = f['features']
  results = []
  for step in steps:
    path, settings = _result_path(eval_dir, f'step{step:08d}_reconstruction', config)
    if _exists(path):
      results.append(_read_result(path))
      continue
    state = ckpt.restore(state_like, step)
    t0 = time.perf_counter()
    psnrs, feats, total, total_sq, count = [], [], 0.0, 0.0, 0
    scale = state.buffers['vae']['scaling_factor'].value
    batches = pipeline.iterate_once(source, e.batch_size)
    for i, batch in enumerate(tqdm(batches, total=-(-n // e.batch_size), desc=f'step {step} reconstructions')):
      images = batch['image'][:n - len(psnrs)]
      recons, z = reconstruct(state.ema_params, state.buffers, images, jax.random.fold_in(jax.random.key(0), i))
      recons, z = np.asarray(recons), np.asarray(z, np.float64) * float(scale)
      psnrs.extend(np.asarray(vae.psnr(recons, images)).tolist())
      total, total_sq, count = total + z.sum(), total_sq + np.square(z).sum(), count + z.size
      if extractor is not None:
        feats.append(extractor(recons)[0])
      if len(psnrs) >= n:
        break
    mean_z = total / count
    row = {'step': step, 'kind': 'reconstruction', 'num_images': n, 'psnr': float(np.mean(psnrs)),
           'psnr_std': float(np.std(psnrs)), 'scale_factor': float(scale),
           'latent_std': float(np.sqrt(total_sq / count - mean_z ** 2)), 'latent_mean': float(mean_z)}
    if feats:
      feats = np.concatenate(feats)
      if 'fid' in wanted:
        row['fid'] = metrics.frechet_distance(*metrics.mu_sigma(feats), ref_mu, ref_sigma)
      if 'kid' in wanted:
        row['kid'], row['kid_std'] = metrics.kid(feats, ref_feats)
    row['seconds'] = round(time.perf_counter() - t0, 1)
    os.makedirs(eval_dir, exist_ok=True)
    _write_json(path, {**row, 'settings': settings})
    results.append(row)
  ckpt.close()
  return results


def _binding(config, eval_dir: str, step: int, state, graphdef, process, codec, text, sampler) -> list[dict]:
  """Prompt binding of a text model against guidance scale: generated images are scored by the project's
  digit classifier (and colour check) for what their prompt asked; JSON rows, a plot, and a grid per scale."""
  from data import captions
  from eval import binding
  from data import images as image_io
  e = config.eval
  name, num_steps = sampler
  path, settings = _result_path(eval_dir, f'step{step:08d}_binding', trainer.with_sampler(config, name, num_steps))
  if _exists(path):
    return _read_result(path)
  if text is None:
    raise ValueError('eval.binding scores prompts: it needs a text model (text.encoder)')
  n, dataset = e.binding_num_images, config.data.dataset
  if dataset == 'mnist_captions':
    prompts, digits = captions.digit_prompts(n, config.seed)
    score, keys = (lambda imgs: binding.score_digits(imgs, digits)), ('digit_accuracy',)
  elif dataset == 'composed_digits':
    prompts, objects = captions.binding_prompts(n, config.seed)
    score = lambda imgs: binding.score_composed(imgs, objects)
    keys = ('digit_accuracy', 'colour_accuracy', 'bleed_rate', 'both_correct')
  else:
    raise ValueError(f"eval.binding needs data.dataset 'mnist_captions' or 'composed_digits', not {dataset!r}")
  table = text.table(prompts)
  rng = jax.random.fold_in(jax.random.key(config.seed), 6)
  rows = []
  for scale in e.guidance_scales:
    c = trainer.with_sampler(config, name, num_steps)
    c.sample.guidance_scale = float(scale)
    gen = trainer.make_generate_fn(c, graphdef, process, codec, e.batch_size, text, table)
    t0 = time.perf_counter()
    imgs, _, nfe = generate.generate_images(gen, state.ema_params, state.buffers, rng, n, e.batch_size, n)
    rows.append({'step': step, 'kind': 'binding', 'dataset': dataset, 'guidance': float(scale),
                 'guidance_rescale': config.sample.guidance_rescale, 'sampler': name, 'num_steps': num_steps,
                 'nfe': nfe, **score(imgs), 'seconds': round(time.perf_counter() - t0, 1)})
    if jax.process_index() == 0:
      image_io.save_grid(os.path.join(eval_dir, f'step{step:08d}_binding_g{scale:g}.png'), imgs[:100], ncol=10)
  if jax.process_index() == 0:
    binding.plot_vs_guidance(rows, os.path.join(eval_dir, f'step{step:08d}_binding.png'), keys)
  _write_json(path, [{**row, 'settings': settings} for row in rows])
  return rows


def describe(row: dict) -> str:
  """One line per evaluated (checkpoint, sampler), per checkpoint of an autoencoder, or per guidance scale
  of a binding evaluation."""
  if row.get('kind') == 'binding':
    scores = ', '.join(f'{k} {row[k]:.4f}' for k in ('digit_accuracy', 'colour_accuracy', 'bleed_rate',
                                                      'both_correct') if k in row)
    return (f"step {row['step']} binding ({row['dataset']}), guidance {row['guidance']:g}, {row['sampler']} "
            f"{row['num_steps']} steps: {scores}")
  if row.get('kind') == 'reconstruction':
    scores = ', '.join(f'{k} {row[k]:.4g}' for k in ('fid', 'kid') if k in row)
    return (f"step {row['step']} reconstructions of {row['num_images']} images: PSNR {row['psnr']:.2f} dB, "
            f"scaled latent std {row['latent_std']:.3f} (scale factor {row['scale_factor']:.4g})"
            + (f', {scores}' if scores else ''))
  scores = ', '.join(f'{k} {row[k]:.4g}' for k in ('fid', 'kid', 'is', 'precision', 'recall', 'bpd') if k in row)
  ema = f", post-hoc EMA sigma_rel {row['ema_sigma_rel']:g}" if 'ema_sigma_rel' in row else ''
  return (f"step {row['step']} {row['sampler']} {row['num_steps']} steps ({row['nfe']} NFE){ema}, "
          f"{row['num_samples']} samples: {scores}")


def _generated_features(gen, state, rng, extractor, config, num_labels: int, desc: str):
  """Generates eval.num_samples images batch by batch (cycling through num_labels classes or captions) and
  returns their Inception features and logits."""
  e = config.eval
  feats, logits, nfe = [], [], 0
  for i in tqdm(range(-(-e.num_samples // e.batch_size)), desc=desc, unit='batch', dynamic_ncols=True):
    imgs, _, nfe = generate.generate_images(gen, state.ema_params, state.buffers, jax.random.fold_in(rng, i),
                                            e.batch_size, e.batch_size, num_labels, config.sample.class_label,
                                            first_index=i * e.batch_size)
    f, lg = extractor(imgs)
    feats.append(f)
    if lg is not None:
      logits.append(lg)
  n = e.num_samples
  return np.concatenate(feats)[:n], (np.concatenate(logits)[:n] if logits else None), nfe


def _make_bpd_fn(config, graphdef, process):
  """fn(state) -> test-set bits/dim of the EMA model through the probability-flow ODE (class-conditional
  models: the likelihood given each image's label). The solve is traced and compiled once for all
  checkpoints (tracing the adaptive solver alone takes seconds)."""
  e, d = config.eval, config.data
  settings = likelihood.LikelihoodSettings(estimator=e.bpd_estimator, rtol=e.bpd_rtol, atol=e.bpd_atol,
                                           centered=d.centered, dequantize='uniform')
  source = trainer.build_source(config, d.eval_split)
  n = min(len(source), e.bpd_num_images)
  num_classes = config.model.num_classes

  @jax.jit
  def batch_bpd(params, buffers, rng, images, labels):
    model = nnx.merge(graphdef, params, buffers)
    model_fn = make_model_fn(lambda x, c, y: model(x, c, y), process, config.model.prediction,
                             config.model.sigma_data)
    return likelihood.nll_bpd(rng, model_fn, process, images, settings, labels if num_classes else None)

  def bpd_of(state) -> dict:
    rng = jax.random.fold_in(jax.random.key(config.seed), 4)
    values, nfes = [], []
    batches = pipeline.iterate_once(source, e.batch_size)
    for i, batch in enumerate(tqdm(batches, total=-(-n // e.batch_size), desc='bits/dim', unit='batch')):
      images, labels = batch['image'][:n - len(values)], batch['label'][:n - len(values)]
      bpd, nfe = batch_bpd(state.ema_params, state.buffers, jax.random.fold_in(rng, i), images, labels)
      values.extend(np.asarray(bpd).tolist())
      nfes.append(int(nfe))
      if len(values) >= n:
        break
    values = np.asarray(values)
    if not np.isfinite(values).all():
      raise ValueError(f'{int((~np.isfinite(values)).sum())} of {n} likelihood solves failed (NaN): raise '
                       'eval.bpd_rtol / bpd_atol or check the model')
    return {'bpd': float(values.mean()), 'bpd_stderr': float(values.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0,
            'bpd_num_images': n, 'bpd_mean_nfe': float(np.mean(nfes))}

  return bpd_of
