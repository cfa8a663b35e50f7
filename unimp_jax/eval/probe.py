"""What the pictures carry: linear probes for colour and kind on a model's frozen picture features.

(The command line is `python -m unimp_jax.probe`; stage 1's report probes its towers too, see
unimp_jax.tasks.caption.)

On the embedded dataset the colour of an item is visible only in its picture, and shoppers choose by
colour. Before asking whether a recommender uses colour, ask whether its picture features hold it at
all: if a linear classifier cannot read colour from them, no amount of training the LM on top will.

Feature of a picture: the connector's output latents (what the LM's gated cross-attention reads),
mean-pooled, from `UniMP.encode_images` on the pictures as the dataset stores them (the tower normalises
them), in fixed-size jitted batches. Labels: colour from the manifest's `extra.item_colour`
(the embedded default dataset and the caption corpus have it), kind from each item's `category`.

Probe: multinomial logistic regression on features standardised with the fit set's mean and spread,
L2 penalty `l2 / 2 * |W|^2` (not on the bias), minimised by full-batch accelerated gradient descent with
adaptive restart from zero weights for a fixed number of steps: no randomness, so the same features give
the same numbers. Items with a picture are split by a seeded permutation, `fit_fraction` to fit and the
rest held out; the held-out accuracy is reported next to chance, the share of the most frequent class
among the held-out items.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimp_jax.data import formats
from unimp_jax.model import unimp
from unimp_jax.sharding import mesh as mesh_lib


@functools.lru_cache(maxsize=8)
def _encoder(graphdef, out_sharding):
  """The jitted feature function, one per model structure: repeated probes compile once."""

  def encode(params, images_bhwc):
    model = nnx.merge(graphdef, params)
    latents_bld = model.encode_images(images_bhwc[:, None])
    return latents_bld.astype(jnp.float32).mean(1)

  return jax.jit(encode, out_shardings=out_sharding)


def picture_features(graphdef, params, dataset: formats.UnifiedDataset, item_ids, *,
                     batch_size: int = 64) -> np.ndarray:
  """float32 [len(item_ids), width]: the mean of each picture's resampler latents."""
  leaf_sharding = getattr(jax.tree.leaves(params)[0], 'sharding', None)
  replicated = (jax.sharding.NamedSharding(leaf_sharding.mesh, jax.sharding.PartitionSpec())
                if isinstance(leaf_sharding, jax.sharding.NamedSharding) else None)  # every process reads all
  encode = _encoder(graphdef, replicated)
  item_ids = np.asarray(item_ids, np.int64)
  out = []
  for start in range(0, len(item_ids), batch_size):
    rows = item_ids[np.minimum(np.arange(start, start + batch_size), len(item_ids) - 1)]  # one shape: one compile
    out.append(np.asarray(encode(params, dataset.images(rows)))[:len(item_ids) - start])
  return np.concatenate(out).astype(np.float32)


def _softmax(logits: np.ndarray) -> np.ndarray:
  e = np.exp(logits - logits.max(1, keepdims=True))
  return e / e.sum(1, keepdims=True)


def fit_logistic(x: np.ndarray, y: np.ndarray, num_classes: int, *, l2: float = 1e-3,
                 steps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
  """(weights [D, K], bias [K]) minimising mean cross-entropy + l2 / 2 * |weights|^2.

  Accelerated gradient descent (Nesterov/FISTA) with the step 1/L, L = lambda_max(X1'X1 / n) / 2 + l2
  bounding the loss's curvature (X1 = [x, 1]; softmax's Hessian is at most 1/2), restarted whenever the
  momentum points uphill (O'Donoghue & Candes 2015); deterministic.
  """
  x = np.asarray(x, np.float64)
  n, d = x.shape
  x1 = np.concatenate([x, np.ones((n, 1))], 1)
  onehot = np.eye(num_classes)[np.asarray(y)]
  penalty = np.concatenate([np.full(d, l2), [0.0]])[:, None]
  step = 1.0 / (0.5 * np.linalg.eigvalsh(x1.T @ x1 / n).max() + l2)
  w = np.zeros((d + 1, num_classes))
  v, t = w, 1.0
  for _ in range(steps):
    grad = x1.T @ (_softmax(x1 @ v) - onehot) / n + penalty * v
    w_next = v - step * grad
    if np.sum(grad * (w_next - w)) > 0:  # momentum points uphill: restart from the plain step
      t = 1.0
    t_next = (1 + np.sqrt(1 + 4 * t * t)) / 2
    v = w_next + (t - 1) / t_next * (w_next - w)
    w, t = w_next, t_next
  return w[:d], w[d]


def linear_probe(features: np.ndarray, labels: np.ndarray, num_classes: int, fit: np.ndarray,
                 held_out: np.ndarray, *, l2: float = 1e-3, steps: int = 1000) -> tuple[float, float]:
  """(held-out accuracy, chance) of a logistic regression fitted on the `fit` rows."""
  mean, spread = features[fit].mean(0), features[fit].std(0)
  scaled = (features - mean) / np.where(spread > 1e-8, spread, 1.0)  # constant features stay 0
  weights, bias = fit_logistic(scaled[fit], labels[fit], num_classes, l2=l2, steps=steps)
  predicted = (scaled[held_out] @ weights + bias).argmax(1)
  chance = np.bincount(labels[held_out], minlength=num_classes).max() / len(held_out)
  return float((predicted == labels[held_out]).mean()), float(chance)


def probe(graphdef, params, dataset: formats.UnifiedDataset, *, seed: int = 0, fit_fraction: float = 0.7,
          l2: float = 1e-3, steps: int = 1000, batch_size: int = 64) -> dict:
  """Held-out accuracy of linear colour and kind probes on the model's picture features, with chance.

  Also returns the split (`held_out_items`, item ids) so that every number can be recomputed.
  """
  extra = dataset.manifest['extra']
  if 'item_colour' not in extra:
    raise formats.DatasetError(f'{dataset.path}/manifest.json has no extra.item_colour: the colour probe needs '
                               'the items\' true colours (the embedded default dataset or the caption corpus)')
  items = np.flatnonzero([item.has_image for item in dataset.items])
  order = np.random.default_rng(seed).permutation(len(items))
  num_fit = int(round(fit_fraction * len(items)))
  if not 0 < num_fit < len(items):
    raise ValueError(f'fit_fraction={fit_fraction} leaves no items to fit or none to hold out of {len(items)}')
  fit, held_out = np.sort(order[:num_fit]), np.sort(order[num_fit:])  # positions in `items`
  features = picture_features(graphdef, params, dataset, items, batch_size=batch_size)
  kinds = sorted({dataset.items[i].category for i in items})
  labels = {'colour': (np.asarray(extra['item_colour'], np.int64)[items], len(extra['colours'])),
            'category': (np.asarray([kinds.index(dataset.items[i].category) for i in items]), len(kinds))}
  out = dict(items_fit=len(fit), items_held_out=len(held_out), feature_dim=features.shape[1],
             held_out_items=items[held_out].tolist())
  for name, (y, num_classes) in labels.items():
    out[f'{name}_classes'] = num_classes
    out[f'{name}_accuracy'], out[f'{name}_chance'] = linear_probe(features, y, num_classes, fit, held_out,
                                                                  l2=l2, steps=steps)
  return out


def markdown(result: dict) -> str:
  rows = [f'| {name} | {result[f"{name}_accuracy"]:.3f} | {result[f"{name}_chance"]:.3f} | '
          f'{result[f"{name}_classes"]} |' for name in ('colour', 'category')]
  return '\n'.join(['| probe | held-out accuracy | chance | classes |', '|---|---|---|---|', *rows,
                    f'\n{result["items_fit"]} items fit, {result["items_held_out"]} held out; features: the '
                    f'{result["feature_dim"]}-wide resampler latents, mean-pooled'])


def random_towers(cfg):
  """(graphdef, params) of a model freshly initialised from `cfg` (sized to its dataset already): the
  towers a run starts from."""
  mesh = mesh_lib.make_mesh(cfg.mesh)
  return nnx.split(unimp.create_sharded(cfg.model, mesh, cfg.mesh.rules, seed=cfg.seed))
