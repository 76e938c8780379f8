"""The composed-digits binding benchmark sized for 2 CPU cores: text-conditioned latent diffusion on the
8x8x8 latents of configs/composed/vae_f8_cpu.py, MiniLM-L6 token embeddings of all 15,000 captions cached
once (text.mode='cached', ~280 MB in float16), a 2-level U-Net with spatial transformers at 4x4 and in the
middle. configs/composed/ldm_text_minilm.py is the GPU-sized recipe.

  python main.py --config=configs/composed/vae_f8_cpu.py --workdir=runs/composed_vae_cpu
  python main.py --config=configs/composed/ldm_text_minilm_cpu.py --workdir=runs/composed_text_cpu
  python main.py --config=configs/composed/ldm_text_minilm_cpu.py --workdir=runs/composed_text_cpu --mode=eval \
      --config.eval.metrics="()"  # the binding table alone
"""

from configs.composed import ldm_text_minilm


def get_config():
  c = ldm_text_minilm.get_config()
  c.latent.vae = 'runs/composed_vae_cpu'
  c.text.mode = 'cached'

  c.model.nf = 48
  c.model.ch_mult = (1, 2, 2)  # 8x8 -> 4x4 -> 2x2 latents
  c.model.num_res_blocks = 2
  c.model.attn_resolutions = (4,)
  c.model.num_heads = 4
  c.model.num_groups = 8
  c.training.batch_size = 64
  c.training.num_steps = 4000
  c.training.snapshot_every = 1000
  c.training.checkpoint_every = 500

  c.eval.guidance_scales = (1.0, 3.0, 5.0)
  c.eval.binding_num_images = 300  # 10 of each of the 30 colour pairs
  return c
