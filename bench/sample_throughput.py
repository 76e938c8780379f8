"""Sampling throughput: denoiser forward, DDIM-50 and DPM-Solver++(2M)-20, end to end, through the same
generate function as --mode=sample (train/trainer.make_generate_fn).

Two networks, random weights:
- ddpm_cifar10: the DDPM CIFAR-10 U-Net (35.7 M parameters), 32x32x3, unconditional.
- ldm_text: the latent text-to-image configuration (configs/composed/ldm_text_minilm.py): a frozen MiniLM-L6
  encoder of the captions (once per batch), the cross-attention U-Net on 16x16x4 latents with classifier-free
  guidance 3 (one network call on the doubled batch per step), and the f=4 VAE decoder to 64x64x3
  (configs/composed/vae_f4.py).
End to end: prior noise -> jitted sampler loop (lax.fori_loop, no host sync per step) -> uint8 images on the
device, at batch 256. Prints one JSON line per (network, what, dtype): img_per_s (median over timed calls, each
waited for), ms per call, compile_s, and the parameter counts of the parts; the forward also ms_back_to_back
(calls queued without a wait, as peer_pytorch.py times its forward). Two forward rows: `denoiser_forward` casts the
float32 parameters to the compute dtype in each call, as the peer's autocast does (the comparable row);
`denoiser_forward_cast_once` is the network as the samplers run it, parameters cast once per sampling call. The
PyTorch peer is bench/peer_sampling.py (diffusers, torch.compile + bf16 autocast, the same architectures), run in
the same device call.

  python bench/sample_throughput.py [--network ddpm_cifar10 ldm_text] [--batch 256] [--dtype bfloat16 float32]
      [--calls 10] [--nf 128] [--dump_hlo DIR]

--dump_hlo writes the forward rows' compiled programs to DIR/<network>_<dtype>_<row>.hlo.txt.gz (for
bench/kernel_times.py and bench/gpu_program.py's kernel counts).
"""

import argparse
import gzip
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs.cifar10 import ddpm  # noqa: E402
from configs.composed import ldm_text_minilm, vae_f4  # noqa: E402
from models import layers  # noqa: E402
from models import text as text_models  # noqa: E402
from models.vae import AutoencoderKL  # noqa: E402
from train import generate, latent, trainer  # noqa: E402
from train import text as text_lib  # noqa: E402


def emit(**kw):
  print(json.dumps(kw), flush=True)


def timed(fn, args, calls: int) -> tuple[float, float]:
  """(compile + first call seconds, median seconds of the following calls)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(calls):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return first, statistics.median(times)


def back_to_back(fn, args, calls: int) -> float:
  """Mean seconds per call of `calls` calls dispatched without waiting in between (the PyTorch peer's forward
  method in peer_pytorch.py): the host's dispatch overlaps the device's work."""
  t = time.perf_counter()
  for _ in range(calls):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / calls


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def ddpm_cifar10(dtype: str, nf: int):
  """(config, codec, text, table, labels_of(batch), parameter counts)."""
  config = ddpm.get_config()
  config.model.dtype, config.model.nf, config.model.dropout = dtype, nf, 0.0
  return config, None, None, None, lambda batch: None, {}


def ldm_text(dtype: str, nf: int):
  """The composed text LDM with random weights: the VAE and the MiniLM-L6 architecture are built, not loaded."""
  vae_config = vae_f4.get_config()
  vae_config.model.dtype = dtype
  vae_cfg = trainer.build_vae_config(vae_config).vae
  _, vae_params, vae_buffers = nnx.split(AutoencoderKL(vae_cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
  codec = latent.LatentCodec(vae_cfg, (vae_params, vae_buffers), scale_factor=1.0, source='random weights')

  config = ldm_text_minilm.get_config()
  config.model.dtype, config.model.dropout = dtype, 0.0
  x = config.text
  encoder = text_models.BertEncoder(text_models.BertConfig(), rngs=nnx.Rngs(1))  # all-MiniLM-L6-v2's shape
  text = text_lib.TextConditioner(
      text_lib.TextSettings(encoder=x.encoder, max_length=x.max_length, mode='frozen', use_pooled=x.use_pooled),
      prebuilt=(encoder, None, encoder.cfg.hidden_size))
  n, length = 1000, x.max_length  # caption ids of random tokens; each caption has 8 to max_length tokens
  rng = np.random.default_rng(0)
  ids = rng.integers(1000, 30000, (n + 1, length)).astype(np.int32)
  mask = (np.arange(length)[None] < rng.integers(8, length + 1, (n + 1, 1))).astype(np.int32)
  mask[-1] = 0
  mask[-1, :2] = 1  # the empty caption: [CLS] [SEP]
  table = {'ids': ids * mask, 'mask': mask, 'encoder': nnx.state(encoder)}
  parts = {'vae_decoder': count(vae_params['decoder']) + count(vae_params.get('post_quant_conv', {})),
           'text_encoder': count(nnx.state(encoder))}
  return config, codec, text, table, lambda batch: jnp.arange(batch, dtype=jnp.int32) % n, parts


NETWORKS = {'ddpm_cifar10': ddpm_cifar10, 'ldm_text': ldm_text}


def programs(network: str, dtype: str, batch: int, nf: int = 128) -> tuple[dict, dict, float | None]:
  """({'denoiser_forward' and each sampler's label: (callable, args)}, parameter counts, guidance scale or None)
  of `network` at `batch`: what run() times, and what bench/gpu_program.py --preflight compiles for a GPU."""
  config, codec, text, table, labels_of, parts = NETWORKS[network](dtype, nf)
  graphdef, state, _, _ = trainer.init_state(config, codec, text)
  process = trainer.build_process(config)
  parts['unet'] = count(state.ema_params)
  shape = (batch, *trainer.model_input_shape(config, codec))
  labels = labels_of(batch)

  cond = jax.jit(lambda tb, y: generate.condition(text, tb, y))(table, labels)  # the network alone is timed
  forward = jax.jit(lambda p, b, x, t, c: nnx.merge(graphdef, p, b)(x, t, c))
  x = jax.random.normal(jax.random.key(0), shape)
  t = jax.random.uniform(jax.random.key(1), (batch,)) * 999.0
  out = {'denoiser_forward': (forward, (state.ema_params, state.buffers, x, t, cond))}
  # The network as a sampler's loop runs it: conv / dense parameters cast to the compute dtype once per sampling
  # call (layers.cast_params_once in train/generate), here once before the timed calls; the row above casts in
  # every call, as the peer's autocast does.
  cast_graphdef, cast_params, cast_buffers = nnx.split(
      layers.cast_params_once(nnx.merge(graphdef, state.ema_params, state.buffers)), nnx.Param, ...)
  forward_cast = jax.jit(lambda p, b, x, t, c: nnx.merge(cast_graphdef, p, b)(x, t, c))
  out['denoiser_forward_cast_once'] = (forward_cast, (cast_params, cast_buffers, x, t, cond))
  ddim_spacing = 'leading' if config.process.name == 'ddpm' else 'linspace'  # diffusers' DDIM default / continuous t
  for label, overrides in (('ddim50', dict(sampler='ddim', num_steps=50, eta=0.0, spacing=ddim_spacing)),
                           ('dpm_solver++2m_20', dict(sampler='dpm_solver', num_steps=20, order=2,
                                                      spacing='logsnr'))):
    for k, v in overrides.items():
      config.sample[k] = v
    gen = trainer.make_generate_fn(config, graphdef, process, codec, batch, text, table)
    out[label] = (gen, (state.ema_params, state.buffers, jax.random.key(2), labels))
  return out, parts, config.sample.guidance_scale if text else None


def row_name(network: str, dtype: str, what: str) -> str:
  """A forward row's --dump_hlo file name, e.g. ddpm_cifar10_bfloat16_denoiser_forward."""
  return f'{network}_{dtype}_{what}'


def run(network: str, dtype: str, batch: int, calls: int, nf: int, hlo_dir: str | None = None) -> None:
  progs, parts, guidance = programs(network, dtype, batch, nf)
  common = dict(network=network, impl=f'ours jax {dtype}', batch=batch)
  for what in ('denoiser_forward', 'denoiser_forward_cast_once'):
    forward, args = progs.pop(what)
    first, s = timed(forward, args, calls * 4)
    if hlo_dir:  # the program just timed (its compilation comes from the caches)
      os.makedirs(hlo_dir, exist_ok=True)
      with gzip.open(os.path.join(hlo_dir, f'{row_name(network, dtype, what)}.hlo.txt.gz'), 'wt') as f:
        f.write(forward.lower(*args).compile().as_text())
    emit(what=what, **common, img_per_s=round(batch / s, 1), ms=round(s * 1e3, 2),
         ms_back_to_back=round(back_to_back(forward, args, calls * 4) * 1e3, 2), compile_s=round(first, 1),
         params=parts)
  for label, (gen, args) in progs.items():
    first, s = timed(gen, args, calls)
    images, nfe = gen(*args)
    emit(what='sample', sampler=label, **common, nfe=int(nfe), guidance=guidance, out_shape=list(images.shape),
         img_per_s=round(batch / s, 1), ms=round(s * 1e3, 1), compile_s=round(first, 1))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--network', nargs='+', default=list(NETWORKS), choices=list(NETWORKS))
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--dtype', nargs='+', default=['bfloat16', 'float32'])
  parser.add_argument('--calls', type=int, default=10, help='timed sampler calls (median); forward: 4x')
  parser.add_argument('--nf', type=int, default=128,
                      help='ddpm_cifar10: 128 is the DDPM network; smaller for smoke tests')
  parser.add_argument('--dump_hlo', default=None, help="write the forward rows' compiled HLO (gzipped) here")
  args = parser.parse_args()
  emit(what='device', device=str(jax.devices()[0]), jax=jax.__version__)
  for network in args.network:
    for dtype in args.dtype:
      try:
        run(network, dtype, args.batch, args.calls, args.nf, args.dump_hlo)
      except Exception as e:  # one failed configuration must not lose the others
        emit(what='sample_failed', network=network, impl=f'ours jax {dtype}', err=repr(e)[:300])


if __name__ == '__main__':
  main()
