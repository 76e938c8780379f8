"""CIFAR-10, DDPM++ (continuous VP SDE) as in score_sde's vp/cifar10_ddpmpp_continuous.py."""

from configs import default


def get_config():
  c = default.get_config()
  c.data.dataset = 'cifar10'
  c.data.image_size = 32
  c.data.num_channels = 3
  c.data.random_flip = True
  c.data.centered = True

  c.process.name = 'vp'
  c.process.beta_min = 0.1
  c.process.beta_max = 20.0

  c.model.nf = 128
  c.model.ch_mult = (1, 2, 2, 2)
  c.model.num_res_blocks = 4
  c.model.attn_resolutions = (16,)
  c.model.dropout = 0.1
  c.model.resblock_type = 'biggan'
  c.model.skip_rescale = True
  c.model.embedding_type = 'positional'
  c.model.up_attention = 'once'

  c.optim.lr = 2e-4
  c.optim.warmup_steps = 5000
  c.optim.grad_clip = 1.0
  c.training.batch_size = 128
  c.training.num_steps = 1_300_000
  c.training.ema_decay = 0.9999
  c.training.reduce = 'mean'
  c.training.snapshot_every = 50_000

  c.sample.sampler = 'pc'  # score_sde's: Euler-Maruyama, no corrector, 1000 steps
  c.sample.predictor = 'euler_maruyama'
  c.sample.corrector = 'none'
  c.sample.num_steps = 1000
  return c
