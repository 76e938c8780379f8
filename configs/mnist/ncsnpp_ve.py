"""MNIST, a small NCSN++ on the VE SDE: BigGAN blocks, Fourier features of log sigma, skip rescaling."""

from configs.mnist import ddpmpp_vp


def get_config():
  c = ddpmpp_vp.get_config()
  c.process.name = 've'
  c.process.sigma_min = 0.01
  c.process.sigma_max = 50.0
  c.data.centered = False  # score_sde's VE models see [0, 1]
  c.model.embedding_type = 'fourier'
  c.model.fourier_scale = 16.0
  c.training.reduce = 'sum'
  c.sample.sampler = 'ddpm'  # score_sde's ancestral sampling on VE
  c.sample.num_steps = 1000
  return c
