"""MNIST, a small NCSN++ on the VE SDE: BigGAN blocks with FIR resampling, Fourier features of log sigma, skip
rescaling, a residual progressive input path and attention once per up level (score_sde's CIFAR-10 NCSN++ layout)."""

from configs.mnist import ddpmpp_vp


def get_config():
  c = ddpmpp_vp.get_config()
  c.process.name = 've'
  c.process.sigma_min = 0.01
  c.process.sigma_max = 50.0
  c.data.centered = False  # score_sde's VE models see [0, 1]
  c.model.resblock_type = 'biggan'
  c.model.embedding_type = 'fourier'
  c.model.fourier_scale = 16.0
  c.model.fir = True
  c.model.progressive_input = 'residual'
  c.model.up_attention = 'once'
  c.training.reduce = 'sum'
  c.sample.sampler = 'ddpm'  # score_sde's ancestral sampling on VE
  c.sample.num_steps = 1000
  return c
