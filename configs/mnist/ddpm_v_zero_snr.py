"""MNIST, a small DDPM on Stable Diffusion's scaled-linear betas rescaled to zero terminal SNR (Lin et al. 2024):
x_T is pure noise, so the network predicts v (eps cannot give x0 there) with the v loss, and DDIM starts at T
with trailing timesteps. MNIST's mostly black images are the case the rescaling is for: without it, x_T keeps
alpha_T = 0.068 of the image, which a sampler starting from N(0, I) cannot supply."""

from configs.mnist import ddpm_linear


def get_config():
  c = ddpm_linear.get_config()
  c.process.schedule = 'scaled_linear'
  c.process.beta_min = 0.85  # beta_1 = 0.00085 .. beta_N = 0.012 (Stable Diffusion)
  c.process.beta_max = 12.0
  c.process.zero_terminal_snr = True
  c.model.prediction = 'v'
  c.training.loss_weighting = 'v'
  c.sample.sampler = 'ddim'
  c.sample.num_steps = 50
  c.sample.spacing = 'trailing'
  return c
