"""CIFAR-10, NCSN++ (continuous VE SDE) as in score_sde's ve/cifar10_ncsnpp_continuous.py: BigGAN blocks with FIR
resampling, Fourier features of log sigma, a residual progressive input path, attention once per up level."""

from configs import default


def get_config():
  c = default.get_config()
  c.data.dataset = 'cifar10'
  c.data.image_size = 32
  c.data.num_channels = 3
  c.data.random_flip = True
  c.data.centered = False

  c.process.name = 've'
  c.process.sigma_min = 0.01
  c.process.sigma_max = 50.0

  c.model.nf = 128
  c.model.ch_mult = (1, 2, 2, 2)
  c.model.num_res_blocks = 4
  c.model.attn_resolutions = (16,)
  c.model.dropout = 0.1
  c.model.resblock_type = 'biggan'
  c.model.skip_rescale = True
  c.model.embedding_type = 'fourier'
  c.model.fourier_scale = 16.0
  c.model.fir = True
  c.model.fir_kernel = (1, 3, 3, 1)
  c.model.progressive = 'none'
  c.model.progressive_input = 'residual'
  c.model.progressive_combine = 'sum'
  c.model.up_attention = 'once'

  c.optim.lr = 2e-4
  c.optim.warmup_steps = 5000
  c.optim.grad_clip = 1.0
  c.training.batch_size = 128
  c.training.num_steps = 1_300_000
  c.training.ema_decay = 0.999
  c.training.reduce = 'sum'
  c.training.snapshot_every = 50_000

  c.sample.sampler = 'pc'  # score_sde's: reverse diffusion + Langevin (snr 0.16), 1000 steps
  c.sample.predictor = 'reverse_diffusion'
  c.sample.corrector = 'langevin'
  c.sample.snr = 0.16
  c.sample.num_steps = 1000
  return c
