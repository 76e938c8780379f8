"""MNIST, a small DDPM (Ho et al. 2020): discrete linear betas, DDPM blocks, simple loss, ancestral sampling."""

from configs.mnist import ddpmpp_vp


def get_config():
  c = ddpmpp_vp.get_config()
  c.process.name = 'ddpm'
  c.process.schedule = 'linear'
  c.model.resblock_type = 'ddpm'
  c.model.skip_rescale = False
  c.training.time_sampling = 'discrete'
  c.sample.sampler = 'ddpm'
  c.sample.num_steps = 1000
  c.sample.spacing = 'linspace'
  return c
