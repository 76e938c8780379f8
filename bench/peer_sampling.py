"""PyTorch peer of bench/sample_throughput.py: diffusers UNet2DModel (DDPM CIFAR-10, 35.7 M parameters)
with torch.compile + bf16 autocast, sampled with diffusers' DDIMScheduler (50 steps) and
DPMSolverMultistepScheduler (2M, 20 steps) at batch 256, the scheduler loop in Python as diffusers'
pipelines run it. Prints one JSON line per measurement. Needs torch + diffusers (the GPU machine's wheels).

  python bench/peer_sampling.py [--batch 256] [--calls 5]
"""
import argparse
import json
import statistics
import time

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UNet2DModel

torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
torch.backends.cudnn.benchmark = True


def emit(**kw):
  print(json.dumps(kw), flush=True)


def unet():  # the configuration of ../shared/bench/peer_pytorch.py
  return UNet2DModel(
      sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
      down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'),
      up_block_types=('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'), dropout=0.1, norm_eps=1e-6,
      resnet_time_scale_shift='default', time_embedding_type='positional', flip_sin_to_cos=False, freq_shift=1,
      downsample_padding=0, attention_head_dim=None, add_attention=True).cuda().eval()


@torch.no_grad()
def sample(model, scheduler, steps, batch):
  scheduler.set_timesteps(steps)
  x = torch.randn(batch, 3, 32, 32, device='cuda')
  for t in scheduler.timesteps:
    with torch.autocast('cuda', dtype=torch.bfloat16):
      eps = model(x, t).sample
    x = scheduler.step(eps.float(), t, x).prev_sample
  return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--calls', type=int, default=5)
  args = parser.parse_args()
  model = torch.compile(unet())
  kw = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule='linear')
  for label, sched, steps in (('ddim50', DDIMScheduler(**kw, clip_sample=False), 50),
                              ('dpm_solver++2m_20', DPMSolverMultistepScheduler(**kw, algorithm_type='dpmsolver++',
                                                                                solver_order=2), 20)):
    t0 = time.perf_counter()
    sample(model, sched, steps, args.batch)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.calls):
      t = time.perf_counter()
      sample(model, sched, steps, args.batch)
      torch.cuda.synchronize()
      times.append(time.perf_counter() - t)
    s = statistics.median(times)
    emit(what='sample', sampler=label, impl='diffusers torch.compile bf16-autocast', batch=args.batch, nfe=steps,
         img_per_s=round(args.batch / s, 1), ms=round(s * 1e3, 1), first_call_s=round(first, 1))


if __name__ == '__main__':
  main()
