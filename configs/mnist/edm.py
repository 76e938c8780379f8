"""MNIST, EDM (Karras et al. 2022): sigma-space process, preconditioning, log-normal sigma, rho=7 steps."""

from configs.mnist import ddpmpp_vp


def get_config():
  c = ddpmpp_vp.get_config()
  c.process.name = 'edm'
  c.process.sigma_min = 0.002
  c.process.sigma_max = 80.0
  c.model.prediction = 'edm'
  c.model.sigma_data = 0.5
  c.training.loss_weighting = 'edm'
  c.training.time_sampling = 'lognormal'
  c.training.P_mean = -1.2
  c.training.P_std = 1.2
  c.sample.sampler = 'ddim'  # first-order probability-flow step; EDM Heun arrives with the sampler suite
  c.sample.spacing = 'karras'
  c.sample.rho = 7.0
  c.sample.clip_x0 = False
  return c
