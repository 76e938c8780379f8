"""Forward processes: marginals against SDE simulation, schedules against closed forms, log-SNR inverse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import processes, schedules

ALL = [
    ('vp', {}), ('subvp', {}), ('ve', {}),
    ('ddpm', {'schedule': 'linear'}), ('ddpm', {'schedule': 'cosine'}), ('ddpm', {'schedule': 'scaled_linear'}),
    ('edm', {'sigma_min': 0.002, 'sigma_max': 80.0}),
    ('ddpm', {'schedule': 'linear', 'zero_terminal_snr': True}),
    ('ddpm', {'schedule': 'scaled_linear', 'beta_min': 0.85, 'beta_max': 12.0, 'zero_terminal_snr': True}),
    ('flow', {}),
]


def make(name, kw):
  return processes.get_process(name, **kw)


@pytest.mark.parametrize('name,kw', ALL)
def test_euler_maruyama_matches_marginal(name, kw):
  """Simulating dx = f x dt + g dW from x(0) = x0 + sigma(0) z gives mean alpha(t) x0 and std sigma(t)."""
  p = make(name, kw)
  t_end = 0.6 * p.T if name != 'edm' else 3.0
  n_paths, n_steps = 20000, 1000
  x0 = jnp.array([1.0, -0.5, 0.25, 0.0])
  key = jax.random.key(0)
  x = x0 + p.sigma(0.0) * jax.random.normal(jax.random.key(1), (n_paths, 4))
  dt = t_end / n_steps

  def body(i, x):
    t = i * dt
    drift, g = p.sde(x, jnp.full((n_paths,), t))
    return x + drift * dt + g[:, None] * jnp.sqrt(dt) * jax.random.normal(jax.random.fold_in(key, i), x.shape)

  x = jax.lax.fori_loop(0, n_steps, body, x)
  alpha, sigma = float(p.alpha(t_end)), float(p.sigma(t_end))
  se = sigma / np.sqrt(n_paths)
  np.testing.assert_allclose(np.mean(x, 0), alpha * np.asarray(x0), atol=5 * se + 2e-3 * abs(alpha))
  np.testing.assert_allclose(np.std(x, 0), sigma, rtol=0.03)


@pytest.mark.parametrize('name,kw', ALL)
def test_log_snr_inverse_round_trips(name, kw):
  p = make(name, kw)
  t = jnp.linspace(max(p.t_eps, 1e-3 * p.T), p.T, 101)
  lam = p.log_snr(t)
  assert bool(jnp.all(jnp.diff(lam) < 0)), 'log-SNR must decrease'
  np.testing.assert_allclose(p.t_from_log_snr(lam), t, rtol=2e-4, atol=2e-5 * p.T)
  np.testing.assert_allclose(lam, 2 * jnp.log(p.alpha(t) / p.sigma(t)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name,kw', ALL)
def test_drift_and_diffusion_match_alpha_sigma(name, kw):
  """f = d log alpha / dt and g^2 = d sigma^2 / dt - 2 f sigma^2 (central differences inside segments)."""
  p = make(name, kw)
  t = np.linspace(0.1, 0.9, 9) * p.T + 0.37e-3 * p.T  # off the discrete grid points
  h = 1e-4 * p.T
  tt = jnp.asarray(t, jnp.float32)
  la = lambda s: jnp.log(p.alpha(jnp.asarray(s, jnp.float32)))
  s2 = lambda s: p.sigma(jnp.asarray(s, jnp.float32)) ** 2
  f_fd = (la(t + h) - la(t - h)) / (2 * h)
  g2_fd = (s2(t + h) - s2(t - h)) / (2 * h) - 2 * f_fd * s2(t)
  np.testing.assert_allclose(p.f(tt), f_fd, rtol=5e-3, atol=1e-3)
  np.testing.assert_allclose(p.g2(tt), g2_fd, rtol=5e-3, atol=1e-3)


def test_ddpm_alpha_bar_matches_closed_forms():
  n = 1000
  # Linear (Ho et al. 2020): beta_t = 1e-4 + (t - 1) (0.02 - 1e-4) / (T - 1), alpha_bar_t = prod (1 - beta_s).
  beta = [1e-4 + (i - 1) * (0.02 - 1e-4) / (n - 1) for i in range(1, n + 1)]
  alpha_bar = np.cumprod([1 - b for b in beta])
  p = processes.get_process('ddpm', schedule='linear', num_timesteps=n)
  t = p.t_from_index(jnp.arange(n))
  np.testing.assert_allclose(np.asarray(p.alpha(t)) ** 2, alpha_bar, rtol=2e-5, atol=1e-7)
  # Cosine (Nichol & Dhariwal 2021): alpha_bar_t = f(t) / f(0), f(t) = cos^2((t / T + s) / (1 + s) pi / 2),
  # exact until the 0.999 clip of beta bites at the very end.
  s = 0.008
  f = lambda i: np.cos((i / n + s) / (1 + s) * np.pi / 2) ** 2
  closed = f(np.arange(1, n + 1)) / f(0)
  p = processes.get_process('ddpm', schedule='cosine', num_timesteps=n)
  got = np.asarray(p.alpha(p.t_from_index(jnp.arange(n)))) ** 2
  unclipped = schedules.discrete_betas('cosine', n) < 0.999
  np.testing.assert_allclose(got[unclipped], closed[unclipped], rtol=1e-4, atol=1e-7)
  # Scaled linear (Stable Diffusion): sqrt(beta) linear from sqrt(0.00085) to sqrt(0.012).
  b = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, n) ** 2
  p = processes.get_process('ddpm', schedule='scaled_linear', beta_min=0.85, beta_max=12.0, num_timesteps=n)
  got = np.asarray(p.alpha(p.t_from_index(jnp.arange(n)))) ** 2
  np.testing.assert_allclose(got, np.cumprod(1 - b), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize('schedule,kw', [('linear', {}), ('scaled_linear', {'beta_min': 0.85, 'beta_max': 12.0}),
                                         ('cosine', {})])
def test_zero_terminal_snr(schedule, kw):
  """Lin et al.'s rescaling: alpha_bar_1 unchanged, alpha_bar_N = 0 (x_T pure noise), sqrt(alpha_bar) an affine
  map of the original's; the process keeps a tiny alpha(T) so that log-SNR stays finite and decreasing."""
  n = 1000
  plain = processes.get_process('ddpm', schedule=schedule, num_timesteps=n, **kw)
  p = processes.get_process('ddpm', schedule=schedule, num_timesteps=n, zero_terminal_snr=True, **kw)
  root, root_plain = np.sqrt(p.alphas_cumprod), np.sqrt(plain.alphas_cumprod)
  assert p.betas[-1] == 1.0 and p.alphas_cumprod[-1] == 0.0
  np.testing.assert_allclose(root[0], root_plain[0], rtol=1e-12)
  slope, offset = np.polyfit(root_plain, root, 1)
  np.testing.assert_allclose(root, slope * root_plain + offset, atol=1e-12)
  # the process: equal to the rescaled table on the grid, finite and strictly decreasing log-SNR up to T
  t = p.t_from_index(jnp.arange(n))
  np.testing.assert_allclose(np.asarray(p.alpha(t[:-1])) ** 2, p.alphas_cumprod[:-1], rtol=2e-4, atol=1e-7)
  alpha_T = float(p.alpha(p.T))
  assert 0 < alpha_T <= 2.0 ** -12 and alpha_T < float(p.alpha(t[-2]))
  lam = p.log_snr(jnp.linspace(0.0, 1.0, 2001)[1:])
  assert bool(jnp.all(jnp.isfinite(lam))) and bool(jnp.all(jnp.diff(lam) < 0))
  np.testing.assert_allclose(float(p.sigma(p.T)), 1.0, atol=1e-7)
  with pytest.raises(ValueError, match="needs process.name='ddpm'"):
    processes.get_process('vp', zero_terminal_snr=True)


def test_vp_closed_forms():
  """score_sde's VP: log alpha = -t^2 (b1 - b0) / 4 - t b0 / 2; sub-VP sigma = 1 - alpha^2."""
  t = jnp.linspace(0.0, 1.0, 11)
  log_mean_coeff = -0.25 * t ** 2 * (20.0 - 0.1) - 0.5 * t * 0.1
  vp, sub = processes.get_process('vp'), processes.get_process('subvp')
  np.testing.assert_allclose(vp.alpha(t), jnp.exp(log_mean_coeff), rtol=1e-6)
  np.testing.assert_allclose(vp.sigma(t), jnp.sqrt(1 - jnp.exp(2 * log_mean_coeff)), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(sub.sigma(t), 1 - jnp.exp(2 * log_mean_coeff), rtol=1e-5, atol=1e-7)
  ve = processes.get_process('ve', sigma_min=0.01, sigma_max=50.0)
  np.testing.assert_allclose(ve.sigma(t), 0.01 * (50.0 / 0.01) ** t, rtol=1e-5)


@pytest.mark.parametrize('name,kw', ALL)
def test_prior(name, kw):
  p = make(name, kw)
  z = p.prior_sample(jax.random.key(1), (4096, 8))
  np.testing.assert_allclose(float(jnp.std(z)), p.prior_std, rtol=0.03)
  # prior_logp is the Gaussian log-density
  from scipy import stats
  want = stats.norm.logpdf(np.asarray(z[:3]), scale=p.prior_std).sum(-1)
  np.testing.assert_allclose(p.prior_logp(z[:3]), want, rtol=1e-5)
  # the prior matches the marginal at T (up to the VP / DDPM residual alpha(T) x0)
  assert abs(float(p.sigma(p.T)) - p.prior_std) / p.prior_std < 1e-3


@pytest.mark.parametrize('name,kw', ALL)
def test_time_derivatives_match_drift_and_diffusion(name, kw):
  """d_alpha = f alpha and d_sigma = (g^2 + 2 f sigma^2) / (2 sigma), the definitions of f and g^2."""
  p = make(name, kw)
  t = jnp.asarray(np.linspace(0.1, 0.9, 9) * p.T + 0.37e-3 * p.T, jnp.float32)
  a, s, f, g2 = p.alpha(t), p.sigma(t), p.f(t), p.g2(t)
  np.testing.assert_allclose(p.d_alpha(t), f * a, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(p.d_sigma(t), (g2 + 2 * f * s ** 2) / (2 * s), rtol=1e-4, atol=1e-6)


def test_flow_process_closed_forms():
  """Rectified flow: x_t = (1 - t) x0 + t eps, velocity eps - x0, log-SNR = -2 logit(t), T = 1 - 2^-12."""
  p = processes.get_process('flow')
  t = jnp.linspace(0.01, 0.99, 50)
  np.testing.assert_allclose(p.alpha(t), 1 - t, rtol=1e-6)
  np.testing.assert_allclose(p.sigma(t), t, rtol=1e-6)
  np.testing.assert_allclose(p.log_snr(t), -2 * np.log(np.asarray(t) / (1 - np.asarray(t))), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(p.d_alpha(t), -1.0)
  np.testing.assert_allclose(p.d_sigma(t), 1.0)
  np.testing.assert_allclose(p.noise_cond(t), 999 * t, rtol=1e-6)
  assert p.T == 1 - 2.0 ** -12 and float(p.alpha(p.T)) == 2.0 ** -12
  assert np.isfinite([float(p.log_snr(p.T)), float(p.f(p.T)), float(p.g2(p.T))]).all()


@pytest.mark.parametrize('name,kw', [('flow', {}), ('vp', {}), ('edm', {'sigma_min': 0.002, 'sigma_max': 80.0})])
def test_shift_time_scales_the_noise_to_signal_ratio(name, kw):
  """shift_time(t, k): sigma / alpha multiplied by k; on the flow process Esser et al.'s k t / (1 + (k - 1) t)."""
  p = make(name, kw)
  t = jnp.asarray(np.linspace(0.05, 0.3, 14) * p.T, jnp.float32)  # shifted by 3 stays below T
  for k in (0.5, 3.0):
    u = p.shift_time(t, k)
    np.testing.assert_allclose(p.sigma(u) / p.alpha(u), k * p.sigma(t) / p.alpha(t), rtol=2e-4)
    if name == 'flow':
      np.testing.assert_allclose(u, k * t / (1 + (k - 1) * t), rtol=1e-5)
  np.testing.assert_array_equal(p.shift_time(t, 1.0), t)
  assert float(p.shift_time(p.T, 3.0)) == p.T  # clipped to the process's end
  with pytest.raises(ValueError, match='time_shift'):
    p.shift_time(t, 0.0)


def test_reverse_sde_and_probability_flow():
  p = processes.get_process('vp')
  score = lambda x, t: -x  # score of N(0, I)
  x, t = jnp.ones((2, 3)), jnp.array([0.3, 0.7])
  f, g = p.sde(x, t)
  drift, diff = p.reverse(score).sde(x, t)
  np.testing.assert_allclose(drift, f - (g ** 2)[:, None] * score(x, t), rtol=1e-6)
  np.testing.assert_allclose(diff, g)
  drift, diff = p.reverse(score, probability_flow=True).sde(x, t)
  np.testing.assert_allclose(drift, f - 0.5 * (g ** 2)[:, None] * score(x, t), rtol=1e-6)
  np.testing.assert_allclose(diff, 0.0)


def test_unknown_process_and_schedule():
  with pytest.raises(ValueError, match='unknown process'):
    processes.get_process('vpp')
  with pytest.raises(ValueError, match='unknown noise schedule'):
    processes.get_process('ddpm', schedule='cosin')
  with pytest.raises(ValueError, match='linear beta schedule only'):
    processes.get_process('vp', schedule='cosine')
