"""FID / KID / IS / precision-recall against pytorch-fid, analytic values and brute-force references."""

import os

import numpy as np
import pytest
from scipy import linalg

from eval import metrics

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'frechet.npz')


@pytest.mark.parametrize('i', [0, 1, 2])
def test_frechet_matches_pytorch_fid(i):
  f = np.load(FIXTURE)
  ours = metrics.frechet_distance(f[f'mu1_{i}'], f[f'sigma1_{i}'], f[f'mu2_{i}'], f[f'sigma2_{i}'])
  np.testing.assert_allclose(ours, float(f[f'fid_{i}']), rtol=1e-7)


def test_frechet_matches_scipy_sqrtm_reference():
  """The textbook formula with scipy's general matrix square root of the product."""
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(300, 32)), rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32)) * 0.3 + 0.2
  (mu1, s1), (mu2, s2) = metrics.mu_sigma(a), metrics.mu_sigma(b)
  ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
  np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s2), ref, rtol=1e-10)


def test_fid_of_identical_sets_is_zero_and_streaming_stats_match_np_cov():
  feats = np.random.default_rng(2).normal(size=(1000, 64)).astype(np.float32)
  acc = metrics.FeatureStats(64)
  for part in np.array_split(feats, 7):
    acc.update(part)
  mu, sigma = acc.mu_sigma()
  ref_mu, ref_sigma = metrics.mu_sigma(feats)
  np.testing.assert_allclose(mu, ref_mu, atol=1e-12)
  np.testing.assert_allclose(sigma, ref_sigma, atol=1e-10)
  assert abs(metrics.frechet_distance(mu, sigma, ref_mu, ref_sigma)) < 1e-6


def test_frechet_shape_mismatch_is_an_error():
  with pytest.raises(ValueError, match='shape'):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_kid_zero_for_one_distribution_positive_for_two():
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(800, 32)), rng.normal(size=(800, 32))
  mean, std = metrics.kid(x, y, num_subsets=50, subset_size=400)
  assert abs(mean) < 3 * std / np.sqrt(50) + 1e-3
  shifted, _ = metrics.kid(x, y + 0.5, num_subsets=20, subset_size=400)
  assert shifted > 20 * max(abs(mean), std / np.sqrt(50))


def test_kid_matches_explicit_unbiased_mmd():
  """One subset holding every sample: the unbiased MMD^2 written with explicit double sums."""
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(12, 5)), rng.normal(size=(12, 5)) + 0.3
  k = lambda a, b: (a @ b / 5 + 1) ** 3
  m = 12
  kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
  mean, std = metrics.kid(x, y, num_subsets=3, subset_size=m)  # every subset is a permutation of all
  np.testing.assert_allclose(mean, kxx + kyy - 2 * kxy, rtol=1e-10)
  assert std < 1e-10


def test_inception_score_analytic_values():
  c = 10
  confident = np.full((1000, c), -50.0)
  confident[np.arange(1000), np.arange(1000) % c] = 50.0  # one-hot, classes balanced in every split
  mean, std = metrics.inception_score(confident, splits=10)
  np.testing.assert_allclose(mean, c, rtol=1e-6)
  assert std < 1e-6
  np.testing.assert_allclose(metrics.inception_score(np.zeros((100, c)))[0], 1.0, rtol=1e-12)


def _brute_pr(real, fake, k):
  d = lambda a, b: np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
  rr, ff = np.sort(d(real, real), 1)[:, k], np.sort(d(fake, fake), 1)[:, k]
  precision = np.mean([(d(f[None], real)[0] <= rr).any() for f in fake])
  recall = np.mean([(d(r[None], fake)[0] <= ff).any() for r in real])
  return precision, recall


def test_precision_recall_matches_brute_force():
  rng = np.random.default_rng(5)
  real = rng.normal(size=(150, 8))
  fake = np.concatenate([rng.normal(size=(100, 8)) * 0.5, rng.normal(size=(60, 8)) + 4.0])  # narrow + off-support
  p, r = metrics.precision_recall(real, fake, k=3, block=64)
  bp, br = _brute_pr(real, fake, 3)
  assert abs(p - bp) < 1e-6 and abs(r - br) < 1e-6  # fractions of 150 or 160 points
  assert p < 0.75 and r < 0.9  # the off-support mode lowers precision; the narrow fake lowers recall
  assert metrics.precision_recall(real, real, k=3) == (1.0, 1.0)


def test_stats_file_round_trip_and_errors(tmp_path):
  mu, sigma = np.arange(3.0), np.eye(3)
  metrics.save_stats(str(tmp_path / 's.npz'), mu, sigma)
  got = metrics.load_stats(str(tmp_path / 's.npz'))
  np.testing.assert_array_equal(got[0], mu)
  np.testing.assert_array_equal(got[1], sigma)
  with pytest.raises(FileNotFoundError, match='fid_stats'):
    metrics.load_stats(str(tmp_path / 'missing.npz'))
  np.savez(tmp_path / 'other.npz', a=1)
  with pytest.raises(ValueError, match='not pytorch-fid statistics'):
    metrics.load_stats(str(tmp_path / 'other.npz'))
