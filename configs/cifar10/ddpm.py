"""CIFAR-10, DDPM (Ho et al. 2020): 35.7 M parameters, linear betas 1e-4..0.02, simple loss."""

from configs import default


def get_config():
  c = default.get_config()
  c.data.dataset = 'cifar10'
  c.data.image_size = 32
  c.data.num_channels = 3
  c.data.random_flip = True

  c.process.name = 'ddpm'
  c.process.schedule = 'linear'
  c.process.beta_min = 0.1  # beta_1 = 1e-4
  c.process.beta_max = 20.0  # beta_N = 0.02
  c.process.num_timesteps = 1000

  c.model.nf = 128
  c.model.ch_mult = (1, 2, 2, 2)
  c.model.num_res_blocks = 2
  c.model.attn_resolutions = (16,)
  c.model.dropout = 0.1
  c.model.resblock_type = 'ddpm'
  c.model.skip_rescale = False
  c.model.embedding_type = 'positional'

  c.optim.optimizer = 'adam'
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 5000
  c.optim.grad_clip = 1.0
  c.training.batch_size = 128
  c.training.num_steps = 800_000
  c.training.ema_decay = 0.9999
  c.training.time_sampling = 'discrete'
  c.training.loss_weighting = 'eps'
  c.training.snapshot_every = 50_000
  c.training.checkpoint_every = 10_000

  c.sample.sampler = 'ddpm'
  c.sample.num_steps = 1000
  return c
