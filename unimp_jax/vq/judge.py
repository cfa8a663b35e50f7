"""The judge of generated pictures: a small classifier of category and colour trained on the item pictures.

It answers whether a generated picture shows the category the query asked for and the user's colour, and
its hidden layer gives the features of the Fréchet distance between generated and real pictures (an FID
at this scale: a 64-wide MLP over 32 px pictures stands in for Inception). It trains on the warm items'
pictures and reports its accuracy on the cold ones, which it never saw: a judge that cannot tell the
catalogue's own pictures apart says nothing about generated ones.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unimp_jax.data import formats

HIDDEN = 64


@dataclasses.dataclass(frozen=True)
class Judge:
  params: dict
  labels: dict[str, list[str]]      # head -> class names ('category', and 'colour' where the data knows it)
  accuracy: dict[str, float]        # head -> accuracy on held-out (cold, else the last 10%) items

  def features(self, pictures_u8: np.ndarray) -> np.ndarray:
    """float32 [N, HIDDEN]: the hidden layer."""
    return np.asarray(_hidden(self.params, jnp.asarray(pictures_u8)))

  def predict(self, pictures_u8: np.ndarray) -> dict[str, np.ndarray]:
    """head -> int [N] class index."""
    logits = _logits(self.params, jnp.asarray(pictures_u8))
    return {head: np.asarray(v.argmax(-1)) for head, v in logits.items()}


def _hidden(params, pictures_u8):
  x = pictures_u8.reshape(pictures_u8.shape[0], -1).astype(jnp.float32) / 255.0 - 0.5
  return jax.nn.gelu(x @ params['w1'] + params['b1'])


def _logits(params, pictures_u8):
  h = _hidden(params, pictures_u8)
  return {head: h @ w + params['heads_b'][head] for head, w in params['heads_w'].items()}


def item_labels(dataset: formats.UnifiedDataset) -> dict[str, tuple[list[str], np.ndarray]]:
  """head -> (class names, int [num_items] class of each item): category always, colour where the
  manifest records it (the embedded dataset)."""
  categories = sorted({item.category for item in dataset.items})
  out = {'category': (categories, np.asarray([categories.index(item.category) for item in dataset.items]))}
  extra = dataset.manifest.get('extra', {})
  if 'item_colour' in extra:
    names = list(extra['colours'])
    out['colour'] = (names, np.asarray(extra['item_colour']))  # colour indices
  return out


def train(dataset: formats.UnifiedDataset, *, steps: int = 600, seed: int = 0) -> Judge:
  """Fits the judge on the warm items' pictures (full batch, Adam) and scores it on the held-out ones."""
  has_image = np.asarray([item.has_image for item in dataset.items])
  held_out = formats.cold_mask(dataset)
  if not held_out.any():
    held_out[int(0.9 * len(held_out)):] = True
  train_ids, test_ids = np.flatnonzero(has_image & ~held_out), np.flatnonzero(has_image & held_out)
  pictures = dataset.images(np.arange(len(dataset.items)))
  labels = item_labels(dataset)
  keys = jax.random.split(jax.random.key(seed), 1 + len(labels))
  width = int(np.prod(pictures.shape[1:]))
  params = {'w1': jax.random.normal(keys[0], (width, HIDDEN)) / np.sqrt(width), 'b1': jnp.zeros(HIDDEN),
            'heads_w': {h: jax.random.normal(k, (HIDDEN, len(names))) / np.sqrt(HIDDEN)
                        for k, (h, (names, _)) in zip(keys[1:], labels.items())},
            'heads_b': {h: jnp.zeros(len(names)) for h, (names, _) in labels.items()}}
  x = jnp.asarray(pictures[train_ids])
  y = {h: jnp.asarray(classes[train_ids]) for h, (_, classes) in labels.items()}
  tx = optax.adamw(3e-3, weight_decay=1e-3)

  def loss(p):
    logits = _logits(p, x)
    return sum(optax.softmax_cross_entropy_with_integer_labels(logits[h], y[h]).mean() for h in y)

  @jax.jit
  def step(p, opt):
    grads = jax.grad(loss)(p)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt

  opt = tx.init(params)
  for _ in range(steps):
    params, opt = step(params, opt)
  predicted = {h: np.asarray(v.argmax(-1)) for h, v in _logits(params, jnp.asarray(pictures[test_ids])).items()}
  accuracy = {h: float((predicted[h] == classes[test_ids]).mean()) for h, (_, classes) in labels.items()}
  return Judge(params=jax.device_get(params), labels={h: names for h, (names, _) in labels.items()},
               accuracy=accuracy)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """Fréchet distance between Gaussians fitted to feature sets a [N, D] and b [M, D] (FID's formula);
  NaN when either set has fewer than two rows (no covariance)."""
  if min(len(a), len(b)) < 2:
    return float('nan')
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  # tr sqrt(A B) = sum of sqrt(eigenvalues of A B), which are real and >= 0 for covariances A and B.
  root_trace = np.sqrt(np.clip(np.linalg.eigvals(cov_a @ cov_b).real, 0, None)).sum()
  return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * root_trace)
