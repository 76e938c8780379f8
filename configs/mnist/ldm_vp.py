"""MNIST latent diffusion: the VP SDE on the 8x8x4 latents of configs/mnist/vae_f4.py, decoded for grids and FID.

Train the autoencoder first (its workdir is latent.vae):
  python main.py --config=configs/mnist/vae_f4.py --workdir=runs/mnist_vae
  python main.py --config=configs/mnist/ldm_vp.py --workdir=runs/mnist_ldm [--config.latent.vae=runs/mnist_vae]
The training split is encoded once (latent.cache) and each step samples z ~ q(z | x) from the cached moments.
"""

from configs.mnist import ddpmpp_vp


def get_config():
  c = ddpmpp_vp.get_config()
  c.latent.vae = 'runs/mnist_vae'
  c.latent.cache = True

  c.process.name = 'vp'
  c.model.nf = 32
  c.model.ch_mult = (1, 2, 2)  # 8x8 -> 4x4 -> 2x2
  c.model.num_res_blocks = 2
  c.model.attn_resolutions = (4,)
  c.model.num_groups = 8
  c.model.dropout = 0.0
  c.model.resamp_with_conv = True
  c.model.skip_rescale = True

  c.optim.lr = 1e-3
  c.optim.warmup_steps = 200
  c.training.batch_size = 64
  c.training.num_steps = 5000
  c.training.snapshot_every = 1000
  c.training.checkpoint_every = 1000

  c.sample.sampler = 'ddim'
  c.sample.num_steps = 50
  c.sample.clip_x0 = False  # no clipping in latent space (the trainer never clips latents anyway)
  return c
