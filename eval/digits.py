"""A small CNN digit classifier, trained by this project on MNIST, to score generated digits.

The weights are committed (eval/weights/digit_classifier.safetensors, ~0.5 MB) and reproduced by
`python -m eval.train_digit_classifier`. `classify` takes uint8 images of any size the generators produce:
28x28 as is, 32x32 (MNIST zero-padded by 2, the DDPM convention) centre-cropped to 28, other sizes resized to
28; RGB is reduced to its maximum over channels (a coloured digit on black becomes a white one).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import numpy as safetensors_np

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'weights', 'digit_classifier.safetensors')
SIZE = 28  # the classifier's input resolution
BATCH = 500  # classify() pads every batch to this size: one compiled program per input shape


class DigitClassifier(nnx.Module):
  """Three 3x3 conv + max-pool stages (32, 64, 64 channels) and a 128-unit dense layer: 131k parameters."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 32, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
    self.conv3 = nnx.Conv(64, 64, (3, 3), rngs=rngs)
    self.dense1 = nnx.Linear(3 * 3 * 64, 128, rngs=rngs)
    self.dense2 = nnx.Linear(128, 10, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x float [B, 28, 28, 1] in [0, 1] -> logits [B, 10]."""
    pool = lambda h: nnx.max_pool(h, (2, 2), strides=(2, 2))
    x = pool(nnx.relu(self.conv1(x)))  # [B, 14, 14, 32]
    x = pool(nnx.relu(self.conv2(x)))  # [B, 7, 7, 64]
    x = pool(nnx.relu(self.conv3(x)))  # [B, 3, 3, 64]
    x = nnx.relu(self.dense1(x.reshape(x.shape[0], -1)))
    return self.dense2(x)


def _name(path: tuple) -> str:
  return '.'.join(str(p) for p in path)


def state_dict(model: DigitClassifier) -> dict[str, np.ndarray]:
  """{'conv1.kernel': array, ...}: the parameters by dotted name, as stored in the weights file."""
  return {_name(path): np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def save_weights(model: DigitClassifier, path: str, metadata: dict[str, str] | None = None) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  safetensors_np.save_file(state_dict(model), path, metadata=metadata)


@functools.lru_cache(maxsize=4)
def load_digit_classifier(path: str | None = None) -> DigitClassifier:
  """The classifier with the weights of `path` (default: the committed file); cached per path."""
  path = path or WEIGHTS
  if not os.path.isfile(path):
    raise FileNotFoundError(f'digit classifier weights not found at {path}; '
                            'run `python -m eval.train_digit_classifier`')
  arrays = safetensors_np.load_file(path)
  model = DigitClassifier(rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  expected = {_name(p): v.shape for p, v in nnx.to_flat_state(state)}
  if set(arrays) != set(expected) or any(arrays[k].shape != s for k, s in expected.items()):
    raise ValueError(f'{path} does not hold DigitClassifier weights: expected {sorted(expected.items())}, '
                     f'got {sorted((k, v.shape) for k, v in arrays.items())}')

  def fill(path, var):
    return jnp.asarray(arrays[_name(path)], jnp.float32)

  return nnx.merge(graphdef, nnx.map_state(fill, state))


def to_input(images: jax.Array) -> jax.Array:
  """uint8 [N, H, W, C] (C = 1 or 3) -> float32 [N, 28, 28, 1] in [0, 1], as described in the module doc."""
  x = jnp.max(images, axis=-1, keepdims=True).astype(jnp.float32) / 255.0  # RGB -> max over channels
  n, h, w, _ = x.shape
  if (h, w) == (SIZE + 4, SIZE + 4):
    return x[:, 2:-2, 2:-2]  # MNIST padded to 32: the central 28x28 is the original frame
  if (h, w) != (SIZE, SIZE):
    x = jax.image.resize(x, (n, SIZE, SIZE, 1), method='linear')  # antialiased when shrinking
  return x


@functools.lru_cache(maxsize=4)  # keyed by the model's identity
def _predict_fn(model: DigitClassifier):
  graphdef, state = nnx.split(model)

  @jax.jit
  def predict(state, images):  # uint8 [B, H, W, C] -> logits [B, 10]
    return nnx.merge(graphdef, state)(to_input(images))

  return functools.partial(predict, state)


def _check(images: np.ndarray) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'classify takes uint8 [N, H, W, 1 | 3] images, got {images.dtype} {images.shape}')
  return images


def logits(images: np.ndarray, model: DigitClassifier | None = None, batch_size: int = BATCH) -> np.ndarray:
  """uint8 [N, H, W, C] -> float32 logits [N, 10], in batches of batch_size (the last one zero-padded)."""
  images = _check(images)
  predict = _predict_fn(model or load_digit_classifier())
  out = []
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    pad = batch_size - len(batch)
    if pad:
      batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), np.uint8)])
    out.append(np.asarray(predict(batch))[:batch_size - pad])
  return np.concatenate(out) if out else np.zeros((0, 10), np.float32)


def classify(images: np.ndarray, model: DigitClassifier | None = None, batch_size: int = BATCH) -> np.ndarray:
  """uint8 [N, H, W, C] -> predicted digits int32 [N] (default model: the committed weights)."""
  return np.argmax(logits(images, model, batch_size), axis=-1).astype(np.int32)
