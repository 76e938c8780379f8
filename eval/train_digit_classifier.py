"""Trains eval/digits.py's classifier on MNIST and writes eval/weights/digit_classifier.safetensors.

Regenerate the committed weights (deterministic for a seed on CPU; a few minutes on 2 cores):

  python -m eval.train_digit_classifier [--epochs=4] [--seed=0] [--out=eval/weights/digit_classifier.safetensors]

Trains on MNIST train+validation (60k) with Adam (cosine-decayed learning rate) and random affine
augmentation (scale 0.85..1.15, shifts up to 3 px, small rotations), so that it tolerates generated digits
and the re-centred crops of composed canvases; prints the test accuracy (10k) and refuses to write weights
below 99 %.
"""

import argparse
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from data.mnist import load_mnist
from eval import digits

MIN_ACCURACY = 0.99


def augment(key: jax.Array, x: jax.Array) -> jax.Array:
  """Random affine warps of x float [B, 28, 28, 1] about the centre (bilinear, zero outside)."""
  b = x.shape[0]
  k1, k2, k3 = jax.random.split(key, 3)
  scale = jax.random.uniform(k1, (b,), minval=0.85, maxval=1.15)
  angle = jax.random.uniform(k2, (b,), minval=-0.2, maxval=0.2)  # radians, about 11 degrees
  shift = jax.random.uniform(k3, (b, 2), minval=-3.0, maxval=3.0)
  c = (digits.SIZE - 1) / 2
  yy, xx = jnp.meshgrid(jnp.arange(digits.SIZE) - c, jnp.arange(digits.SIZE) - c, indexing='ij')  # [28, 28]

  def warp(img, s, a, t):  # output pixel p samples input R(-a) (p - t) / s
    cos, sin = jnp.cos(a), jnp.sin(a)
    y, x = (yy - t[0]) / s, (xx - t[1]) / s
    src_y, src_x = cos * y + sin * x + c, -sin * y + cos * x + c
    return jax.scipy.ndimage.map_coordinates(img[..., 0], [src_y, src_x], order=1, mode='constant')[..., None]

  return jax.vmap(warp)(x, scale, angle, shift)


def train(epochs: int, seed: int, batch_size: int = 128, lr: float = 2e-3) -> digits.DigitClassifier:
  x, y = load_mnist('train+validation')  # [60000, 28, 28, 1], [60000]
  steps_per_epoch = len(x) // batch_size
  model = digits.DigitClassifier(rngs=nnx.Rngs(seed))
  tx = optax.adam(optax.cosine_decay_schedule(lr, epochs * steps_per_epoch))
  graphdef, params = nnx.split(model)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, key, images, labels):
    inputs = augment(key, images.astype(jnp.float32) / 255.0)

    def loss_fn(params):
      logits = nnx.merge(graphdef, params)(inputs)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  key = jax.random.key(seed)
  rng = np.random.default_rng(seed)
  for epoch in range(epochs):
    t0, order, losses = time.time(), rng.permutation(len(x)), []
    for i in range(steps_per_epoch):
      idx = order[i * batch_size:(i + 1) * batch_size]
      params, opt_state, loss = step(params, opt_state, jax.random.fold_in(key, epoch * steps_per_epoch + i),
                                     x[idx], y[idx])
      losses.append(loss)
    model = nnx.merge(graphdef, params)
    acc = test_accuracy(model)
    print(f'epoch {epoch + 1}/{epochs}: loss {float(np.mean(jax.device_get(losses))):.4f}, '
          f'test accuracy {acc:.4f} ({time.time() - t0:.0f} s)', flush=True)
  return model


def test_accuracy(model: digits.DigitClassifier) -> float:
  x, y = load_mnist('test')
  return float(np.mean(digits.classify(np.asarray(x), model) == y))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--epochs', type=int, default=4)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default=digits.WEIGHTS)
  args = parser.parse_args(argv)
  model = train(args.epochs, args.seed)
  acc = test_accuracy(model)
  print(f'MNIST test accuracy: {acc:.4f}')
  if not acc >= MIN_ACCURACY or not math.isfinite(acc):
    print(f'error: test accuracy {acc:.4f} is below {MIN_ACCURACY}; weights not written', file=sys.stderr)
    return 1
  digits.save_weights(model, args.out, metadata={'test_accuracy': f'{acc:.4f}', 'epochs': str(args.epochs),
                                                  'seed': str(args.seed)})
  print(f'wrote {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
