"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", Sec. 3).

The EMA length that gives the best samples is found only after training, and it differs between models and
samplers. Training therefore tracks a few power-function EMAs of the parameters ("profiles") and saves them
as snapshots; any other EMA length is reconstructed afterwards as a linear combination of the snapshots.

A power-function EMA at step t averages the parameters of steps tau <= t with weights proportional to
tau^gamma, which the recursion  ema <- beta ema + (1 - beta) params,  beta_t = (1 - 1/t)^(gamma + 1)
produces. Its relative width sigma_rel (the standard deviation of tau / t under the weights, which follow
Beta(gamma + 1, 1)) is what one chooses: sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)). The profiles
p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) of all snapshots and of the target span a space in which the
target is fitted by least squares (their inner products are closed-form); the same weights then combine the
snapshots' parameters.

Snapshots are safetensors files `<workdir>/ema_profiles/step_<step>.safetensors` with one tensor per
(profile, parameter), named `<sigma_rel>/<parameter path>`, written by process 0 every
training.ema_profile_every steps and with every checkpoint.
"""

import glob
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import numpy as safetensors_np

from train.state import named_leaves

SNAPSHOT_DIR = 'ema_profiles'
MAX_SIGMA_REL = float(np.sqrt(1 / 12))  # gamma -> 0: the uniform average of all steps


class PosthocEMAError(ValueError):
  """Post-hoc EMA is asked for, but the snapshots cannot give it."""


def sigma_rel_to_gamma(sigma_rel: float, name: str = 'sigma_rel') -> float:
  """The exponent gamma > 0 of the power-function EMA of relative width sigma_rel (e.g. 0.05 -> 16.97)."""
  if not 0 < sigma_rel < MAX_SIGMA_REL:
    raise PosthocEMAError(f'{name}={sigma_rel}: an EMA width sigma_rel must be in (0, {MAX_SIGMA_REL:.4f})')
  s2 = 1.0 / sigma_rel ** 2  # (gamma + 2)^2 (gamma + 3) = s2 (gamma + 1), a cubic in gamma
  roots = np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2])
  return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def profile_gammas(sigma_rels) -> tuple[float, ...]:
  """The exponents of training.ema_profiles' widths (one clear error for a width out of range)."""
  return tuple(sigma_rel_to_gamma(s, 'training.ema_profiles') for s in sigma_rels)


def decay(step, gamma: float):
  """(beta, 1 - beta) of the power-function EMA at optimizer step `step` >= 1, beta = (1 - 1/t)^(gamma + 1)
  (0 at step 1: the EMA starts at the parameters). Both through log1p / expm1: in float32, 1 - 1/t itself is
  off by up to 3 % of 1/t at a million steps, and 1 - beta with it. Works on jax arrays inside jit."""
  log_beta = (gamma + 1.0) * jnp.log1p(-1.0 / step)
  return jnp.exp(log_beta), -jnp.expm1(log_beta)


def profile_products(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
  """Inner products of the profiles p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t] (broadcasting):
  (gamma_a + 1)(gamma_b + 1) m^(gamma_a + gamma_b + 1) / ((gamma_a + gamma_b + 1) t_a^(gamma_a + 1) t_b^(gamma_b + 1)),
  m = min(t_a, t_b), written with ratios <= 1 so that large exponents do not overflow."""
  t_a, g_a, t_b, g_b = (np.asarray(v, np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
  m = np.minimum(t_a, t_b)
  return ((g_a + 1) * (g_b + 1) / (g_a + g_b + 1) / np.maximum(t_a, t_b)
          * (m / t_a) ** g_a * (m / t_b) ** g_b)


def coefficients(times, gammas, t_target: float, gamma_target: float) -> np.ndarray:
  """Weights [S] of snapshots (times [S], gammas [S]) whose combination of profiles is closest (L2) to the
  target profile; normalized to sum to 1, as Karras et al. do, so that the result is an average."""
  times, gammas = np.asarray(times, np.float64), np.asarray(gammas, np.float64)
  gram = profile_products(times[:, None], gammas[:, None], times[None, :], gammas[None, :])  # [S, S]
  rhs = profile_products(times, gammas, t_target, gamma_target)  # [S]
  weights = np.linalg.lstsq(gram, rhs, rcond=None)[0]
  return weights / weights.sum()


# ---------------------------------------------------------------------------------------------- snapshots
def _flatten(params) -> dict[str, np.ndarray]:
  """{'a/b/c': array} of a parameter tree (host arrays)."""
  return {'/'.join(path): np.asarray(leaf) for path, leaf in named_leaves(params)}


def _key(sigma_rel: float) -> str:
  return f'{sigma_rel:.4f}'


def snapshot_path(workdir: str, step: int) -> str:
  return os.path.join(workdir, SNAPSHOT_DIR, f'step_{step:08d}.safetensors')


def save_snapshot(workdir: str, step: int, sigma_rels: tuple[float, ...], profiles: tuple) -> str:
  """Writes the profiles' parameters (host arrays) at `step` atomically; returns the path."""
  tensors = {f'{_key(s)}/{name}': np.ascontiguousarray(value, np.float32)
             for s, params in zip(sigma_rels, profiles) for name, value in _flatten(params).items()}
  path = snapshot_path(workdir, step)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  meta = {'step': str(step), 'sigma_rels': json.dumps([float(s) for s in sigma_rels])}
  safetensors_np.save_file(tensors, path + '.tmp', metadata=meta)
  os.replace(path + '.tmp', path)
  return path


def snapshot_steps(workdir: str) -> list[int]:
  files = glob.glob(os.path.join(workdir, SNAPSHOT_DIR, 'step_*.safetensors'))
  return sorted(int(m.group(1)) for f in files if (m := re.search(r'step_(\d+)\.safetensors$', f)))


def reconstruct(workdir: str, step: int, sigma_rel: float, params_like):
  """The post-hoc EMA of relative width sigma_rel at `step` from the snapshots at steps <= step, shaped like
  params_like (any arrays; only their shapes are read), as numpy leaves. Needs the snapshot at `step` itself (the trainer writes one with every checkpoint).
  Returns (params, {'snapshots': files used, 'profiles': profiles combined, 'max_abs_weight': ...})."""
  gamma = sigma_rel_to_gamma(sigma_rel, 'sample.ema_sigma_rel')
  steps = [s for s in snapshot_steps(workdir) if s <= step]
  if step not in steps:
    raise PosthocEMAError(f'post-hoc EMA (sample.ema_sigma_rel={sigma_rel}) needs the EMA snapshot of step {step} '
                          f'in {os.path.join(workdir, SNAPSHOT_DIR)} (found steps: {steps or "none"}); it is written with '
                          "every checkpoint of a run with training.ema_profiles, e.g. '(0.05, 0.1)'")
  entries = []  # (snapshot step, tensor-name prefix, gamma) of every profile in every snapshot
  for s in steps:
    with safetensors_np.safe_open(snapshot_path(workdir, s), 'np') as f:
      entries += [(s, _key(rel), sigma_rel_to_gamma(rel)) for rel in json.loads(f.metadata()['sigma_rels'])]
  weights = coefficients([e[0] for e in entries], [e[2] for e in entries], float(step), gamma)
  names_leaves = named_leaves(params_like)  # the same order as tree_flatten's
  names = ['/'.join(path) for path, _ in names_leaves]
  total = [np.zeros(np.shape(like), np.float64) for _, like in names_leaves]
  for s in steps:
    with safetensors_np.safe_open(snapshot_path(workdir, s), 'np') as f:
      for w, (_, prefix, _) in ((w, e) for w, e in zip(weights, entries) if e[0] == s):
        for i, name in enumerate(names):
          key = f'{prefix}/{name}'
          if key not in f.keys():
            raise PosthocEMAError(f'EMA snapshot {snapshot_path(workdir, s)} has no parameter {name}: it was written '
                                  'by another model configuration')
          value = f.get_tensor(key)
          if value.shape != total[i].shape:
            raise PosthocEMAError(f'EMA snapshot {snapshot_path(workdir, s)} has {name} of shape {value.shape}, the '
                                  f'model {total[i].shape}')
          total[i] += w * value
  params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params_like), [t.astype(np.float32) for t in total])
  return params, {'snapshots': len(steps), 'profiles': len(entries), 'max_abs_weight': float(np.abs(weights).max())}
