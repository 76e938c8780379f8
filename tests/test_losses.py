"""Denoising losses on Gaussian data, where the exact denoiser is known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import losses, processes
from diffusion.exact_score import GaussianMixture
from diffusion.parameterization import make_model_fn, x0_to_eps

SETTINGS = [
    ('vp', losses.LossSettings(weighting='eps')),
    ('vp', losses.LossSettings(weighting='likelihood', reduce='sum')),
    ('subvp', losses.LossSettings(weighting='eps')),
    ('ve', losses.LossSettings(weighting='eps', reduce='sum')),
    ('ddpm', losses.LossSettings(weighting='eps', time_sampling='discrete')),
    ('edm', losses.LossSettings(weighting='edm', time_sampling='lognormal')),
    ('vp', losses.LossSettings(weighting='v', time_sampling='lognormal')),
    ('vp', losses.LossSettings(weighting='x0')),
    ('ddpm', losses.LossSettings(weighting='min_snr', time_sampling='discrete')),
    ('ve', losses.LossSettings(weighting='min_snr', min_snr_gamma=1.0)),
    ('flow', losses.LossSettings(weighting='flow', time_sampling='lognormal', P_mean=0.0, P_std=1.0)),
    ('flow', losses.LossSettings(weighting='v', time_shift=3.0)),
    ('vp', losses.LossSettings(weighting='flow')),
]


def _gaussian_data():
  cov = np.diag(np.linspace(0.05, 0.5, 6)) + 0.02
  return GaussianMixture.create([1.0], [np.linspace(-0.5, 0.5, 6)], [cov])


@pytest.mark.parametrize('name,settings', SETTINGS)
def test_exact_model_has_lowest_loss(name, settings):
  """On Gaussian data the analytic denoiser beats every perturbation of it, on the same draws."""
  kw = {'sigma_min': 0.002, 'sigma_max': 80.0} if name == 'edm' else {}
  process = processes.get_process(name, **kw)
  data = _gaussian_data()
  x0, _ = data.sample(jax.random.key(0), 8192)
  exact = data.model_fn(process)
  rng = jax.random.key(1)
  base, _ = losses.denoising_loss(exact, process, x0, rng, settings)

  def perturbed(kind, delta):
    def fn(x, t, cond):
      x0_hat, eps_hat = exact(x, t, cond)
      if kind == 'scale':
        return x0_hat, (1 + delta) * eps_hat
      if kind == 'shift':
        return x0_hat, eps_hat + delta
      shifted = x0_hat + delta  # a biased x0 estimate, converted consistently
      a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
      return shifted, x0_to_eps(shifted, x, a, s)
    return fn

  for kind in ('scale', 'shift', 'x0'):
    for delta in (-0.05, 0.05):
      loss, _ = losses.denoising_loss(perturbed(kind, delta), process, x0, rng, settings)
      assert float(loss) > float(base), (kind, delta, float(loss), float(base))


def test_exact_loss_value_matches_the_irreducible_error():
  """For x0 ~ N(mu, c I), the optimal eps error at (alpha, sigma) is alpha^2 c / (alpha^2 c + sigma^2) per pixel."""
  c = 0.3
  data = GaussianMixture.create([1.0], [np.zeros(4)], [c * np.eye(4)])
  process = processes.get_process('vp')
  x0, _ = data.sample(jax.random.key(0), 200_000)
  settings = losses.LossSettings(weighting='eps')
  loss, aux = losses.denoising_loss(data.model_fn(process), process, x0, jax.random.key(3), settings)
  a2, s2 = process.alpha(aux['t']) ** 2, process.sigma(aux['t']) ** 2
  np.testing.assert_allclose(float(loss), float(jnp.mean(a2 * c / (a2 * c + s2))), rtol=0.01)


def test_time_sampling():
  rng = jax.random.key(0)
  vp = processes.get_process('vp')
  t = losses.sample_time(rng, 10_000, vp, losses.LossSettings())
  assert float(t.min()) >= vp.t_eps and float(t.max()) <= 1.0
  ddpm = processes.get_process('ddpm')
  t = losses.sample_time(rng, 10_000, ddpm, losses.LossSettings(time_sampling='discrete'))
  idx = np.asarray(t) * 1000 - 1
  np.testing.assert_allclose(idx, np.round(idx), atol=1e-3)
  assert idx.min() >= 0 and idx.max() <= 999
  edm = processes.get_process('edm', sigma_min=0.002, sigma_max=80.0)
  t = losses.sample_time(rng, 100_000, edm, losses.LossSettings(time_sampling='lognormal'))
  np.testing.assert_allclose(float(jnp.mean(jnp.log(t))), -1.2, atol=0.02)
  np.testing.assert_allclose(float(jnp.std(jnp.log(t))), 1.2, atol=0.02)
  # log-normal noise levels on VP: log(sigma / alpha) has the same law
  t = losses.sample_time(rng, 100_000, vp, losses.LossSettings(time_sampling='lognormal'))
  log_s = jnp.log(vp.sigma(t) / vp.alpha(t))
  np.testing.assert_allclose(float(jnp.median(log_s)), -1.2, atol=0.03)
  with pytest.raises(ValueError, match='discrete process'):
    losses.sample_time(rng, 4, vp, losses.LossSettings(time_sampling='discrete'))


@pytest.mark.parametrize('prediction', ['eps', 'v'])
def test_min_snr_matches_the_published_recipe(prediction):
  """Min-SNR-gamma as Hang et al. (2023) and diffusers' training scripts compute it on a VP schedule: the squared
  error of the network's own target times min(SNR, gamma) / SNR (eps) or min(SNR, gamma) / (SNR + 1) (v)."""
  process = processes.get_process('ddpm', schedule='scaled_linear', beta_min=0.85, beta_max=12.0)
  data = _gaussian_data()
  x0, _ = data.sample(jax.random.key(0), 512)
  exact = data.model_fn(process)

  def model_fn(x, t, cond=None):  # the exact model with a biased x0: errors of every size across t
    x0_hat, _ = exact(x, t, cond)
    x0_hat = 1.1 * x0_hat + 0.05
    a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
    return x0_hat, x0_to_eps(x0_hat, x, a, s)

  settings = losses.LossSettings(weighting='min_snr', time_sampling='discrete', min_snr_gamma=5.0)
  t, eps = losses.draw_noise(jax.random.key(1), x0, process, settings)
  ours, _ = losses.denoising_loss_at(model_fn, process, x0, t, eps, settings)
  a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
  x0_hat, eps_hat = model_fn(process.perturb(x0, t, eps), t)
  snr = (process.alpha(t) / process.sigma(t)) ** 2
  if prediction == 'eps':
    per_example = jnp.minimum(snr, 5.0) / snr * jnp.mean((eps_hat - eps) ** 2, -1)
  else:
    v_hat, v = a * eps_hat - s * x0_hat, a * eps - s * x0
    per_example = jnp.minimum(snr, 5.0) / (snr + 1) * jnp.mean((v_hat - v) ** 2, -1)
  assert float(jnp.min(snr)) < 5.0 < float(jnp.max(snr))  # both sides of the clip are drawn
  np.testing.assert_allclose(float(ours), float(jnp.mean(per_example)), rtol=2e-4)


def test_flow_matching_loss_is_the_velocity_error():
  """weighting='flow' on the flow process is conditional flow matching: |u_hat - (eps - x0)|^2, u_hat the
  network's velocity, at logit-normal t (Stable Diffusion 3's recipe)."""
  process = processes.get_process('flow')
  x0, _ = _gaussian_data().sample(jax.random.key(0), 512)
  net = lambda x, c_noise, cond: 0.9 * jnp.tanh(x) - 0.4 * x + 0.1 * (c_noise / 999)[:, None]
  model_fn = make_model_fn(net, process, 'flow')
  settings = losses.LossSettings(weighting='flow', time_sampling='lognormal', P_mean=0.0, P_std=1.0)
  t, eps = losses.draw_noise(jax.random.key(1), x0, process, settings)
  ours, _ = losses.denoising_loss_at(model_fn, process, x0, t, eps, settings)
  x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
  want = jnp.mean(jnp.mean((net(x_t, 999 * t, None) - (eps - x0)) ** 2, -1))
  np.testing.assert_allclose(float(ours), float(want), rtol=1e-4)


def test_logit_normal_and_shifted_time_sampling():
  """On the flow process lognormal time sampling is logit-normal t; time_shift k adds log k to logit(t) and maps
  uniform draws u to k u / (1 + (k - 1) u)."""
  flow = processes.get_process('flow')
  rng = jax.random.key(0)
  for shift in (1.0, 3.0):
    t = losses.sample_time(rng, 100_000, flow, losses.LossSettings(time_sampling='lognormal', P_mean=0.5,
                                                                   P_std=0.8, time_shift=shift))
    logit = np.log(np.asarray(t) / (1 - np.asarray(t)))
    np.testing.assert_allclose(logit.mean(), 0.5 + np.log(shift), atol=0.01)
    np.testing.assert_allclose(logit.std(), 0.8, atol=0.01)
  u = losses.sample_time(rng, 1000, flow, losses.LossSettings())
  t = losses.sample_time(rng, 1000, flow, losses.LossSettings(time_shift=3.0))
  np.testing.assert_allclose(t, 3 * u / (1 + 2 * u), rtol=1e-5)
  with pytest.raises(ValueError, match='discrete grid'):
    losses.LossSettings(time_sampling='discrete', time_shift=2.0)


def test_bad_settings():
  with pytest.raises(ValueError, match='weighting'):
    losses.LossSettings(weighting='snr')
  with pytest.raises(ValueError, match='min_snr_gamma'):
    losses.LossSettings(weighting='min_snr', min_snr_gamma=0.0)
