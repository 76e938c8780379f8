"""MNIST, class-conditional rectified flow (Liu et al. 2023; Lipman et al. 2023) with the README main job's network.

The straight path x_t = (1 - t) x_0 + t eps; the network predicts the velocity eps - x_0 with the flow-matching
loss at logit-normal times (Stable Diffusion 3's recipe, Esser et al. 2024: logit(t) ~ N(0, 1)); DDIM on this
process is the Euler method on the velocity. Everything else as configs/mnist/edm.py, so the two compare directly.
"""

from configs.mnist import edm


def get_config():
  c = edm.get_config()
  c.process.name = 'flow'
  c.model.prediction = 'flow'
  c.training.loss_weighting = 'flow'
  c.training.time_sampling = 'lognormal'  # log(sigma / alpha) = logit(t) ~ N(P_mean, P_std^2)
  c.training.P_mean = 0.0
  c.training.P_std = 1.0
  c.sample.sampler = 'ddim'  # Euler; sample.time_shift > 1 moves the steps towards noise (SD3 at high resolution)
  c.sample.spacing = 'linspace'
  # No x0 clipping, as edm.py: with guidance 2 it cut the guided x0 where it leaves [-1, 1] at high noise, and the
  # samples lost their digit (500-sample FID 123.7 with clipping; bench/RESULTS.md)
  c.sample.clip_x0 = False
  return c
