"""Inpainting and colorization by replacement, on Gaussian mixtures whose context identifies a component."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import processes
from diffusion.exact_score import GaussianMixture
from samplers import get_sampler
from samplers.inpaint import COLOR_TRANSFORM, replacement_sample

N = 3000


def _run(mixture, name, sampler, steps, known, mask, **kw):
  process = processes.get_process(name)
  settings, _ = get_sampler(sampler, num_steps=steps)
  fn = jax.jit(lambda r: replacement_sample(r, mixture.model_fn(process), process, sampler, settings, known, mask,
                                            **kw))
  x, nfe = fn(jax.random.key(0))
  return np.asarray(x), int(nfe)


@pytest.mark.parametrize('name,sampler,steps,min_fraction', [
    ('ve', 'pc', 300, 0.97), ('vp', 'pc', 300, 0.97), ('vp', 'ddpm', 200, 0.95), ('vp', 'ddim', 100, 0.7),
])
def test_inpainting_keeps_the_context_and_completes_it_consistently(name, sampler, steps, min_fraction):
  means = np.array([[0.6, 0.6, 0.6, 0.6], [-0.6, -0.6, -0.6, -0.6], [0.6, -0.6, -0.6, 0.6]])
  mixture = GaussianMixture.create([1.0, 1.0, 1.0], means, [0.01 * np.eye(4)] * 3, (2, 2, 1))
  comp = np.arange(N) % 3
  known = jnp.asarray(means[comp].reshape(N, 2, 2, 1))
  mask = jnp.broadcast_to(jnp.array([1.0, 1.0, 0.0, 0.0]).reshape(1, 2, 2, 1), known.shape)
  x, nfe = _run(mixture, name, sampler, steps, known, mask)
  x = x.reshape(N, 4)
  np.testing.assert_allclose(x[:, :2], means[comp][:, :2], atol=1e-6)  # the known pixels, exactly
  consistent = np.abs(x[:, 2:] - means[comp][:, 2:]).max(1) < 0.35  # completed from the right component
  assert consistent.mean() >= min_fraction, consistent.mean()
  assert nfe >= steps - 1


def test_colorization_keeps_the_grey_level_and_finds_the_colours():
  colours = np.array([[0.8, 0.6, -0.2], [-0.7, 0.8, -0.1], [0.1, -0.6, -0.7]])  # grey levels 0.69, 0, -0.69
  means = np.concatenate([colours, colours], 1)  # two pixels of the same colour: [3, 6]
  mixture = GaussianMixture.create([1.0] * 3, means, [0.005 * np.eye(6)] * 3, (1, 2, 3))
  comp = np.arange(N) % 3
  images = jnp.asarray(means[comp].reshape(N, 1, 2, 3))
  mask = jnp.zeros((N, 1, 2, 3)).at[..., 0].set(1.0)  # the grey channel is known everywhere
  x, _ = _run(mixture, 've', 'pc', 500, images, mask, transform=COLOR_TRANSFORM)
  grey = lambda a: np.einsum('...i,i->...', a, COLOR_TRANSFORM[:, 0])
  np.testing.assert_allclose(grey(x), grey(np.asarray(images)), atol=1e-5)
  # Replacement does not sample the exact conditional: the colours of the component the grey level identifies
  # come back about 70% of the time (1/3 without the grey level); see samplers/inpaint.py.
  found = np.abs(x.reshape(N, 6) - means[comp]).max(1) < 0.3
  assert found.mean() >= 0.6, found.mean()
  np.testing.assert_allclose(COLOR_TRANSFORM @ COLOR_TRANSFORM.T, np.eye(3), atol=1e-6)
