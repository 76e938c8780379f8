"""PyTorch peer of bench/sample_throughput.py, the same networks in diffusers with torch.compile + bf16 autocast,
sampled with diffusers' DDIMScheduler (50 steps) and DPMSolverMultistepScheduler (2M, 20 steps) at batch 256, the
scheduler loop in Python as diffusers' pipelines run it. Random weights. Prints one JSON line per measurement.
- ddpm_cifar10: UNet2DModel in the DDPM CIFAR-10 configuration (as ../shared/bench/peer_pytorch.py), 32x32x3.
- ldm_text: the configuration of configs/composed/ldm_text_minilm.py as diffusers builds Stable Diffusion: a
  BertModel of all-MiniLM-L6-v2's shape encodes the prompts and the empty prompt once (mean pooling), a
  UNet2DConditionModel (linear-projection transformers, the pooled text projected onto the time embedding) runs
  on the doubled batch for classifier-free guidance 3, and an AutoencoderKL (f=4) decodes 16x16x4 -> 64x64x3.
  `--params` prints the parameter counts and the DDPM network's training FLOPs per image (torch's FlopCounterMode
  over a forward and backward pass, attention by its math kernel) only, on the CPU: tests/test_bench_tools.py checks
  ours against them (regenerate: python bench/peer_sampling.py --params > tests/fixtures/peer_params.json).
Needs torch, diffusers and transformers (the GPU machine's wheels).

  python bench/peer_sampling.py [--network ddpm_cifar10 ldm_text] [--batch 256] [--calls 5] [--eager] [--params]
"""
import argparse
import json
import statistics
import time

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel,
                       UNet2DModel)
from transformers import BertConfig, BertModel

torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
torch.backends.cudnn.benchmark = True
DEV = 'cuda' if torch.cuda.is_available() else 'cpu'  # the CPU only for a smoke test (--eager --batch 2)
TEXT_LENGTH, GUIDANCE = 24, 3.0  # text.max_length and sample.guidance_scale of configs/composed/ldm_text_minilm.py


def emit(**kw):
  print(json.dumps(kw), flush=True)


def count(module) -> int:
  return sum(p.numel() for p in module.parameters())


def train_flops_per_img(model, batch: int = 2) -> float:
  """FlopCounterMode's count of a forward and backward pass per image, as ../shared/bench/peer_pytorch.py counts
  for its MFU, with attention by the math kernel (explicit matrix products, which the CPU's fused kernel leaves
  uncounted; on a GPU the flash kernel's backward also counts its recomputed scores)."""
  from torch.nn.attention import SDPBackend, sdpa_kernel
  from torch.utils.flop_counter import FlopCounterMode
  x, t = torch.randn(batch, 3, 32, 32), torch.randint(0, 1000, (batch,))
  with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
    model(x, t).sample.sum().backward()
  return counter.get_total_flops() / batch


def ddpm_unet():  # the configuration of ../shared/bench/peer_pytorch.py
  return UNet2DModel(
      sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
      down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'),
      up_block_types=('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'), dropout=0.1, norm_eps=1e-6,
      resnet_time_scale_shift='default', time_embedding_type='positional', flip_sin_to_cos=False, freq_shift=1,
      downsample_padding=0, attention_head_dim=None, add_attention=True)


def text_unet():  # configs/composed/ldm_text_minilm.py: nf 64, ch_mult (1, 2, 2), attention at 8x8 and 4x4
  return UNet2DConditionModel(
      sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 128),
      down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
      up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'),
      attention_head_dim=4,  # diffusers' name for the number of heads (model.num_heads)
      cross_attention_dim=384, norm_num_groups=16, norm_eps=1e-6, use_linear_projection=True,
      class_embed_type='simple_projection', projection_class_embeddings_input_dim=384, flip_sin_to_cos=False,
      freq_shift=1, downsample_padding=0)


def text_vae():  # configs/composed/vae_f4.py: nf 32, ch_mult (1, 2, 2), one block per level, 8 groups
  return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 3,
                       up_block_types=('UpDecoderBlock2D',) * 3, block_out_channels=(32, 64, 64), layers_per_block=1,
                       latent_channels=4, norm_num_groups=8, sample_size=64)


def text_encoder():  # all-MiniLM-L6-v2's shape
  return BertModel(BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                              intermediate_size=1536), add_pooling_layer=False)


def schedulers():
  kw = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule='linear')
  return (('ddim50', DDIMScheduler(**kw, clip_sample=False), 50),
          ('dpm_solver++2m_20', DPMSolverMultistepScheduler(**kw, algorithm_type='dpmsolver++', solver_order=2), 20))


def to_uint8(x):
  return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def make_ddpm_sampler(batch, compile):
  model = compile(ddpm_unet().to(DEV).eval())

  @torch.no_grad()
  def sample(scheduler, steps):
    scheduler.set_timesteps(steps)
    x = torch.randn(batch, 3, 32, 32, device=DEV)
    for t in scheduler.timesteps:
      with torch.autocast(DEV, dtype=torch.bfloat16):
        eps = model(x, t).sample
      x = scheduler.step(eps.float(), t, x).prev_sample
    return to_uint8(x)

  return sample, model, lambda x, t: model(x, t).sample


def make_text_sampler(batch, compile):
  unet = compile(text_unet().to(DEV).eval())
  vae = text_vae().to(DEV).eval()
  vae.decoder = compile(vae.decoder)
  encoder = text_encoder().to(DEV).eval()
  generator = torch.Generator().manual_seed(0)
  ids = torch.randint(1000, 30000, (batch, TEXT_LENGTH), generator=generator)
  lengths = torch.randint(8, TEXT_LENGTH + 1, (batch, 1), generator=generator)
  mask = (torch.arange(TEXT_LENGTH)[None] < lengths).long()
  ids, mask = (ids * mask).to(DEV), mask.to(DEV)
  null_ids, null_mask = torch.zeros_like(ids), torch.zeros_like(mask)
  null_ids[:, :2], null_mask[:, :2] = torch.tensor([101, 102], device=DEV), 1  # [CLS] [SEP]

  def encode(ids, mask):
    tokens = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask[..., None].to(tokens.dtype)
    return tokens, (tokens * m).sum(1) / m.sum(1)  # sentence-transformers' mean pooling

  @torch.no_grad()
  def sample(scheduler, steps):
    scheduler.set_timesteps(steps)
    with torch.autocast(DEV, dtype=torch.bfloat16):  # the prompts and the empty prompt, once per batch
      tokens, pooled = encode(torch.cat([ids, null_ids]), torch.cat([mask, null_mask]))
    both_mask = torch.cat([mask, null_mask])
    x = torch.randn(batch, 4, 16, 16, device=DEV)
    for t in scheduler.timesteps:
      with torch.autocast(DEV, dtype=torch.bfloat16):
        eps = unet(torch.cat([x, x]), t, encoder_hidden_states=tokens, class_labels=pooled,
                   encoder_attention_mask=both_mask).sample.float()
      eps_c, eps_u = eps.chunk(2)
      x = scheduler.step(eps_u + GUIDANCE * (eps_c - eps_u), t, x).prev_sample
    with torch.autocast(DEV, dtype=torch.bfloat16):
      images = vae.decode(x).sample
    return to_uint8(images.float())

  with torch.no_grad(), torch.autocast(DEV, dtype=torch.bfloat16):
    tokens, pooled = encode(ids, mask)

  def forward(x, t):
    return unet(x, t, encoder_hidden_states=tokens, class_labels=pooled, encoder_attention_mask=mask).sample

  return sample, unet, forward


def sync():
  if DEV == 'cuda':
    torch.cuda.synchronize()


def timed(fn, calls):
  t0 = time.perf_counter()
  fn()
  sync()
  first = time.perf_counter() - t0
  times = []
  for _ in range(calls):
    t = time.perf_counter()
    fn()
    sync()
    times.append(time.perf_counter() - t)
  return first, statistics.median(times)


def back_to_back(fn, calls):
  """Mean seconds per call of `calls` calls queued without a sync between them (peer_pytorch.py's method)."""
  t = time.perf_counter()
  for _ in range(calls):
    fn()
  sync()
  return (time.perf_counter() - t) / calls


def run(network, batch, calls, eager):
  compile = (lambda m: m) if eager else torch.compile
  sample, _, forward = (make_ddpm_sampler if network == 'ddpm_cifar10' else make_text_sampler)(batch, compile)
  impl = f'diffusers {"eager" if eager else "torch.compile"} bf16-autocast'
  shape = (batch, 3, 32, 32) if network == 'ddpm_cifar10' else (batch, 4, 16, 16)
  x, t = torch.randn(*shape, device=DEV), torch.full((batch,), 500, device=DEV)

  @torch.no_grad()
  def forward_call():
    with torch.autocast(DEV, dtype=torch.bfloat16):
      return forward(x, t)

  first, s = timed(forward_call, calls * 4)
  emit(what='denoiser_forward', network=network, impl=impl, batch=batch, img_per_s=round(batch / s, 1),
       ms=round(s * 1e3, 2), ms_back_to_back=round(back_to_back(forward_call, calls * 4) * 1e3, 2),
       first_call_s=round(first, 1))
  for label, scheduler, steps in schedulers():
    first, s = timed(lambda: sample(scheduler, steps), calls)
    emit(what='sample', sampler=label, network=network, impl=impl, batch=batch, nfe=steps,
         guidance=GUIDANCE if network == 'ldm_text' else None, img_per_s=round(batch / s, 1), ms=round(s * 1e3, 1),
         first_call_s=round(first, 1))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--network', nargs='+', default=['ddpm_cifar10', 'ldm_text'])
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--calls', type=int, default=5)
  parser.add_argument('--eager', action='store_true', help='without torch.compile')
  parser.add_argument('--params', action='store_true', help='print the parameter counts and exit (CPU)')
  args = parser.parse_args()
  if args.params:
    vae = text_vae()
    unet = ddpm_unet()
    emit(what='params', ddpm_cifar10={'unet': count(unet)}, ddpm_cifar10_train_flops_per_img=train_flops_per_img(unet),
         ldm_text={'unet': count(text_unet()), 'vae_decoder': count(vae.decoder) + count(vae.post_quant_conv),
                   'text_encoder': count(text_encoder())})
    return
  for network in args.network:
    try:
      run(network, args.batch, args.calls, args.eager)
    except Exception as e:  # one failed configuration must not lose the others
      emit(what='peer_failed', network=network, err=repr(e)[:300])


if __name__ == '__main__':
  main()
