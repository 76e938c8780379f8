"""MNIST, a KL autoencoder with f = 4 (32x32x1 -> 8x8x4 latents) for latent diffusion, sized for CPUs.

LDM's f4 recipe scaled down: 16-32-32 channels (0.24 M parameters), one residual block per level, mid-block attention, L1 + 1e-6 KL.
No discriminator by default (digits need none to reach > 25 dB PSNR); --config.autoencoder.disc_start=N turns
the patch GAN on at step N. Checkpoints export the EMA autoencoder with its latent scale factor to <workdir>/vae
in diffusers' AutoencoderKL layout, which configs/mnist/ldm_vp.py reads.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.data.dataset = 'mnist'
  c.data.split = 'train+validation'
  c.data.image_size = 32
  c.data.num_channels = 1

  c.model.name = 'vae'
  c.model.nf = 16
  c.model.ch_mult = (1, 2, 2)  # f = 4
  c.model.num_res_blocks = 1
  c.model.num_groups = 8
  c.model.dropout = 0.0
  c.model.z_channels = 4

  c.autoencoder.recon_loss = 'l1'
  c.autoencoder.kl_weight = 1e-6
  c.autoencoder.disc_start = -1
  c.autoencoder.disc_layers = 2
  c.autoencoder.disc_nf = 32
  c.autoencoder.scale_images = 2048

  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.optim.grad_clip = 0.0  # the loss is a per-image sum; Adam normalizes its scale
  c.training.batch_size = 32
  c.training.num_steps = 3000
  c.training.ema_decay = 0.998
  c.training.log_every = 100
  c.training.snapshot_every = 1000
  c.training.checkpoint_every = 1000

  c.sample.num_samples = 64  # reconstruction grid: 8 originals / 8 reconstructions per row pair
  c.eval.num_samples = 10_000  # PSNR over the test set (rFID with --config.eval.metrics=fid,)
  c.eval.batch_size = 250
  c.eval.metrics = ()
  c.eval.ref_max_images = 10_000
  return c
