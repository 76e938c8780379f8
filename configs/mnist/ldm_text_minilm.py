"""Text-to-image on MNIST: latent diffusion on the 8x8x4 latents of configs/mnist/vae_f4.py, conditioned on
captions ("a handwritten seven", "the digit 7", ...) through the frozen MiniLM-L6 sentence encoder.

The caption set (100 captions: 10 templates x 10 digits) is encoded once (text.mode='cached'); the U-Net's
spatial transformers cross-attend to its token embeddings and the pooled embedding joins the time embedding.
10 % of training captions are replaced by the empty caption, for classifier-free guidance.

  python main.py --config=configs/mnist/vae_f4.py --workdir=runs/mnist_vae
  python main.py --config=configs/mnist/ldm_text_minilm.py --workdir=runs/mnist_text
  python main.py --config=configs/mnist/ldm_text_minilm.py --workdir=runs/mnist_text --mode=sample \
      --config.sample.prompt="a handwritten seven"
  python main.py --config=configs/mnist/ldm_text_minilm.py --workdir=runs/mnist_text --mode=eval  # FID + binding
"""

from configs.mnist import ldm_vp


def get_config():
  c = ldm_vp.get_config()
  c.data.dataset = 'mnist_captions'

  c.text.encoder = 'minilm'
  c.text.mode = 'cached'
  c.text.max_length = 16
  c.text.use_pooled = True
  c.training.label_dropout = 0.1  # p_uncond

  c.model.attn_resolutions = (4,)  # spatial transformers at 4x4 (and in the middle, at 2x2)
  c.model.num_heads = 4
  c.model.transformer_depth = 1

  c.sample.num_samples = 100  # the snapshot grid: one column per digit (caption id = template * 10 + digit)
  c.sample.batch_size = 100
  c.sample.guidance_scale = 3.0
  c.eval.binding = True
  c.eval.guidance_scales = (1.0, 2.0, 3.0, 5.0)
  c.eval.binding_num_images = 500
  return c
