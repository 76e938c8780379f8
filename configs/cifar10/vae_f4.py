"""CIFAR-10, LDM's KL-f4 autoencoder (Rombach et al. 2022, kl-f4: 128-256-512 channels, z = 3 there; 4 here as
Stable Diffusion) at 32x32 -> 8x8x4, with the patch discriminator switched on after 50k steps."""

from configs import default


def get_config():
  c = default.get_config()
  c.data.dataset = 'cifar10'
  c.data.image_size = 32
  c.data.num_channels = 3
  c.data.random_flip = True

  c.model.name = 'vae'
  c.model.nf = 128
  c.model.ch_mult = (1, 2, 4)  # f = 4
  c.model.num_res_blocks = 2
  c.model.num_groups = 32
  c.model.dropout = 0.0
  c.model.z_channels = 4

  c.autoencoder.recon_loss = 'l1'
  c.autoencoder.kl_weight = 1e-6
  c.autoencoder.disc_start = 50_001
  c.autoencoder.disc_weight = 0.5
  c.autoencoder.disc_layers = 3
  c.autoencoder.disc_nf = 64

  c.optim.optimizer = 'adam'
  c.optim.lr = 4.5e-6 * 64  # LDM: base lr times the batch size
  c.optim.beta1 = 0.5
  c.optim.beta2 = 0.9
  c.optim.warmup_steps = 0
  c.optim.grad_clip = 0.0
  c.training.batch_size = 64
  c.training.num_steps = 200_000
  c.training.ema_decay = 0.999
  c.training.snapshot_every = 10_000
  c.training.checkpoint_every = 10_000

  c.eval.num_samples = 10_000
  c.eval.ref_max_images = 10_000
  c.eval.metrics = ('fid',)
  return c
