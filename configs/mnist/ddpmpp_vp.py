"""MNIST, a small DDPM++ on the VP SDE, sized for CPUs: 16 base channels, average-pool / nearest resampling."""

from configs import default


def get_config():
  c = default.get_config()
  c.data.dataset = 'mnist'
  c.data.split = 'train+validation'  # the usual 60k training images
  c.data.image_size = 32
  c.data.num_channels = 1

  c.process.name = 'vp'

  c.model.nf = 16
  c.model.ch_mult = (1, 2, 2)
  c.model.num_res_blocks = 1
  c.model.attn_resolutions = (8,)
  c.model.dropout = 0.0
  c.model.resblock_type = 'ddpm'
  c.model.resamp_with_conv = False  # full-resolution resampling convs would double the cost on CPU
  c.model.skip_rescale = True

  c.optim.lr = 2e-3
  c.optim.warmup_steps = 100
  c.training.batch_size = 32
  c.training.num_steps = 2000
  c.training.ema_decay = 0.998
  c.training.log_every = 50
  c.training.snapshot_every = 2000
  c.training.checkpoint_every = 500

  c.sample.sampler = 'ddim'
  c.sample.num_steps = 50
  c.sample.num_samples = 100
  c.sample.batch_size = 100

  # FID sized for 2 CPU cores (the Inception network runs at ~4 images/s there): 500 samples against the
  # first 500 test images. Small-sample FID is biased upwards; use 10k-50k on a GPU for reported numbers.
  c.eval.num_samples = 500
  c.eval.ref_max_images = 500
  c.eval.batch_size = 100
  c.eval.metrics = ('fid', 'kid')
  return c
