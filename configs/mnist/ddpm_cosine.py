"""MNIST, small DDPM with the cosine schedule (Nichol & Dhariwal 2021)."""

from configs.mnist import ddpm_linear


def get_config():
  c = ddpm_linear.get_config()
  c.process.schedule = 'cosine'
  return c
