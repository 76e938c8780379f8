"""Composed digits (64x64 RGB canvases with two coloured MNIST digits), a KL autoencoder with f = 4
(64x64x3 -> 16x16x4 latents) for configs/composed/ldm_text_minilm.py.

  python main.py --config=configs/composed/vae_f4.py --workdir=runs/composed_vae
"""

from configs.mnist import vae_f4


def get_config():
  c = vae_f4.get_config()
  c.data.dataset = 'composed_digits'
  c.data.split = 'train'
  c.data.image_size = 64
  c.data.num_channels = 3
  c.model.nf = 32
  c.model.ch_mult = (1, 2, 2)  # f = 4
  c.model.num_res_blocks = 1
  c.model.num_groups = 8
  c.training.batch_size = 16
  c.training.num_steps = 10_000
  c.eval.num_samples = 2000
  c.eval.ref_max_images = 2000
  return c
