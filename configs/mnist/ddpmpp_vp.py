"""MNIST, a small DDPM++ on the VP SDE: the embedded default that trains on 2 CPU cores in minutes."""

from configs import default


def get_config():
  c = default.get_config()
  c.data.dataset = 'mnist'
  c.data.image_size = 32
  c.data.num_channels = 1

  c.process.name = 'vp'

  c.model.nf = 32
  c.model.ch_mult = (1, 2, 2)
  c.model.num_res_blocks = 1
  c.model.attn_resolutions = (8,)
  c.model.dropout = 0.0
  c.model.resblock_type = 'biggan'
  c.model.skip_rescale = True

  c.optim.lr = 2e-3
  c.optim.warmup_steps = 200
  c.training.batch_size = 64
  c.training.num_steps = 3000
  c.training.ema_decay = 0.999
  c.training.log_every = 50
  c.training.snapshot_every = 1000
  c.training.checkpoint_every = 500

  c.sample.sampler = 'ddim'
  c.sample.num_steps = 50
  c.sample.num_samples = 64
  c.sample.batch_size = 64
  return c
