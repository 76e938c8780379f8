"""MNIST, small DDPM++ on the sub-VP SDE."""

from configs.mnist import ddpmpp_vp


def get_config():
  c = ddpmpp_vp.get_config()
  c.process.name = 'subvp'
  return c
