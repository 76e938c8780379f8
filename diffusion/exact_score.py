"""The exact-score test bed: Gaussian-mixture data whose noised marginals are known in closed form.

If x0 ~ sum_k w_k N(mu_k, Sigma_k), then x_t = alpha x0 + sigma eps ~ sum_k w_k N(alpha mu_k,
alpha^2 Sigma_k + sigma^2 I) at every t, so the true score, E[x0 | x_t], E[eps | x_t] and the density are
analytic. Plugging this "perfect model" into a sampler or a loss isolates their own error (DESIGN.md).

Covariances are stored by their eigendecomposition Sigma_k = U_k diag(l_k) U_k^T; the marginal covariance
shares the eigenvectors (eigenvalues alpha^2 l_k + sigma^2), so scores and densities cost O(K D^2).
Examples may have any event shape (e.g. (D,) or an image (H, W, C)); internally they are flattened.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.parameterization import ModelFn
from diffusion.processes import Process, bcast

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
  weights: Array  # [K], sums to 1
  means: Array  # [K, D]
  eigvecs: Array  # [K, D, D], columns are eigenvectors of Sigma_k
  eigvals: Array  # [K, D], eigenvalues of Sigma_k (>= 0)
  event_shape: tuple[int, ...]

  @classmethod
  def create(cls, weights, means, covs, event_shape: tuple[int, ...] | None = None) -> 'GaussianMixture':
    """From mixture weights [K], means [K, D] and full covariances [K, D, D]."""
    means = np.asarray(means, np.float64)
    lam, vecs = np.linalg.eigh(np.asarray(covs, np.float64))
    w = np.asarray(weights, np.float64)
    return cls(jnp.asarray(w / w.sum(), jnp.float32), jnp.asarray(means, jnp.float32),
               jnp.asarray(vecs, jnp.float32), jnp.asarray(np.maximum(lam, 0.0), jnp.float32),
               tuple(event_shape or (means.shape[1],)))

  @classmethod
  def random(cls, rng: Array, num_components: int, event_shape: tuple[int, ...], *, mean_scale: float = 1.0,
             std_range: tuple[float, float] = (0.05, 0.3)) -> 'GaussianMixture':
    """A random well-separated test mixture with anisotropic covariances and unequal weights."""
    d = math.prod(event_shape)
    k1, k2, k3, k4 = jax.random.split(rng, 4)
    means = mean_scale * jax.random.uniform(k1, (num_components, d), minval=-1, maxval=1)
    q, _ = jnp.linalg.qr(jax.random.normal(k2, (num_components, d, d)))
    stds = jax.random.uniform(k3, (num_components, d), minval=std_range[0], maxval=std_range[1])
    covs = jnp.einsum('kij,kj,klj->kil', q, stds ** 2, q)
    weights = jax.random.uniform(k4, (num_components,), minval=0.5, maxval=1.5)
    return cls.create(np.asarray(weights), np.asarray(means), np.asarray(covs), event_shape)

  @property
  def dim(self) -> int:
    return self.means.shape[1]

  def sample(self, rng: Array, n: int) -> tuple[Array, Array]:
    """n samples [n, *event_shape] and their component indices [n]."""
    k_rng, z_rng = jax.random.split(rng)
    k = jax.random.categorical(k_rng, jnp.log(self.weights), shape=(n,))
    z = jax.random.normal(z_rng, (n, self.dim))
    x = self.means[k] + jnp.einsum('nij,nj->ni', self.eigvecs[k], jnp.sqrt(self.eigvals[k]) * z)
    return x.reshape((n,) + self.event_shape), k

  def _components(self, x: Array, alpha: Array, sigma: Array, denoise: bool = False):
    """Per-component log-densities [B, K] and scores [B, K, D] of the marginal at (alpha, sigma) [B]; with
    denoise, the per-component posterior means E[x0 | x, k] [B, K, D] instead of the scores."""
    x = x.reshape(x.shape[0], -1)  # [B, D]
    var = alpha[:, None, None] ** 2 * self.eigvals[None] + sigma[:, None, None] ** 2  # [B, K, D]
    diff = x[:, None, :] - alpha[:, None, None] * self.means[None]  # [B, K, D]
    proj = jnp.einsum('kdj,bkd->bkj', self.eigvecs, diff)  # [B, K, D] in the eigenbasis
    logp = -0.5 * (self.dim * math.log(2 * math.pi) + jnp.sum(jnp.log(var), -1) + jnp.sum(proj ** 2 / var, -1))
    if denoise:  # mu_k + alpha Sigma_k (alpha^2 Sigma_k + sigma^2 I)^-1 (x - alpha mu_k)
      gain = alpha[:, None, None] * self.eigvals[None] / var
      out = self.means[None] + jnp.einsum('kdj,bkj->bkd', self.eigvecs, gain * proj)
    else:
      out = -jnp.einsum('kdj,bkj->bkd', self.eigvecs, proj / var)
    return logp + jnp.log(self.weights)[None], out

  def logp(self, x: Array, alpha: Array, sigma: Array) -> Array:
    """log p_t(x) [B] of the marginal with signal scale alpha [B] and noise scale sigma [B]."""
    logp, _ = self._components(x, alpha, sigma)
    return jax.nn.logsumexp(logp, -1)

  def score(self, x: Array, alpha: Array, sigma: Array) -> Array:
    """grad_x log p_t(x), shaped like x."""
    logp, scores = self._components(x, alpha, sigma)
    resp = jax.nn.softmax(logp, -1)  # [B, K] posterior component probabilities
    return jnp.einsum('bk,bkd->bd', resp, scores).reshape(x.shape)

  def denoise(self, x: Array, alpha: Array, sigma: Array) -> Array:
    """E[x0 | x_t = x], shaped like x: computed directly, so it stays exact where alpha is about 0 and
    Tweedie's (x + sigma^2 score) / alpha divides rounding errors by alpha."""
    logp, means = self._components(x, alpha, sigma, denoise=True)
    resp = jax.nn.softmax(logp, -1)
    return jnp.einsum('bk,bkd->bd', resp, means).reshape(x.shape)

  def component_posterior(self, x: Array) -> Array:
    """p(k | x) [B, K] under the clean mixture (alpha=1, sigma=0): assigns samples to components."""
    ones = jnp.ones(x.shape[:1])
    logp, _ = self._components(x, ones, 0.0 * ones)
    return jax.nn.softmax(logp, -1)

  def model_fn(self, process: Process) -> ModelFn:
    """The exact model_fn(x, t, cond) -> (x0, eps) for data from this mixture under `process`: eps from the
    score (exact where sigma is about 0 too), x0 from the posterior means."""

    def fn(x, t, cond: Any = None):
      del cond
      t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
      alpha, sigma = process.alpha(t), process.sigma(t)
      return self.denoise(x, alpha, sigma), -bcast(sigma, x) * self.score(x, alpha, sigma)

    return fn
