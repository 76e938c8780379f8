"""Text-to-image with two objects: latent diffusion on composed digits ("a red 3 on the left and a blue 7 on
the right"), conditioned through the frozen MiniLM-L6 encoder, evaluated for prompt binding (digit and colour
accuracy per object, and bleed: an attribute landing on the wrong object) against guidance scale.

The caption set has 15,000 captions (digits x colours x sides x templates): a cached table of their token
embeddings would take ~280 MB, so the frozen encoder runs inside the step instead (text.mode='frozen').

  python main.py --config=configs/composed/vae_f4.py --workdir=runs/composed_vae
  python main.py --config=configs/composed/ldm_text_minilm.py --workdir=runs/composed_text
  python main.py --config=configs/composed/ldm_text_minilm.py --workdir=runs/composed_text --mode=sample \
      --config.sample.prompt="a red 3 on the left and a blue 7 on the right"
  python main.py --config=configs/composed/ldm_text_minilm.py --workdir=runs/composed_text --mode=eval
"""

from configs.mnist import ldm_vp


def get_config():
  c = ldm_vp.get_config()
  c.data.dataset = 'composed_digits'
  c.data.split = 'train'
  c.data.image_size = 64
  c.data.num_channels = 3
  c.latent.vae = 'runs/composed_vae'
  c.latent.cache = True

  c.text.encoder = 'minilm'
  c.text.mode = 'frozen'
  c.text.max_length = 24
  c.training.label_dropout = 0.1  # p_uncond

  c.model.nf = 64
  c.model.ch_mult = (1, 2, 2)  # 16x16 -> 8x8 -> 4x4 latents
  c.model.num_res_blocks = 2
  c.model.attn_resolutions = (8, 4)
  c.model.num_heads = 4
  c.model.num_groups = 16
  c.training.batch_size = 64
  c.training.num_steps = 50_000

  c.sample.num_samples = 64
  c.sample.batch_size = 64
  c.sample.guidance_scale = 3.0
  c.eval.num_samples = 2000
  c.eval.ref_max_images = 2000
  c.eval.batch_size = 100
  c.eval.binding = True
  c.eval.guidance_scales = (1.0, 2.0, 3.0, 5.0, 7.5)
  c.eval.binding_num_images = 600  # 20 of each of the 30 colour pairs
  return c
