"""Full-catalogue ranking for recommendation and search, from one forward pass.

With atomic item ids every item is one token, so the logits at the answer position, restricted to the
item tokens, rank the whole catalogue exactly. HR@K, NDCG@K and MRR@K follow from the target's rank.
Padding rows added to fill the last batch are dropped before anything is counted.

Every ranker in this codebase (UniMP, the baselines) is scored the same way: the items the user
interacted with before the target are removed from the ranking (the usual full-sort protocol; the
synthetic shoppers never buy an item twice), and the target's 0-based rank among the rest is counted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimp_jax.data import pipeline, tasks
from unimp_jax.model import vision

KS = (1, 3, 5, 10, 20)


def ranking_metrics(ranks: np.ndarray, ks=KS) -> dict[str, float]:
  """ranks: 0-based rank of each example's target. One relevant item, so NDCG@K = 1/log2(rank+2)."""
  ranks = np.asarray(ranks)
  out = {}
  for k in ks:
    hit = ranks < k
    out[f'HR@{k}'] = float(hit.mean())
    out[f'NDCG@{k}'] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
    out[f'MRR@{k}'] = float(np.where(hit, 1.0 / (ranks + 1.0), 0.0).mean())
  return out


def seen_before(user, target: int) -> np.ndarray:
  """Item ids the user interacted with before interaction `target` (excluded from the ranking)."""
  return np.asarray([i.item for i in user.interactions[:target]], np.int64)


def ranks_from_scores(scores: np.ndarray, targets: np.ndarray, seen: list[np.ndarray] | None = None) -> np.ndarray:
  """0-based rank of each row's target among its items, after removing that row's `seen` items (the
  target itself is never removed). Ties count against the target: rank = #items scored strictly higher."""
  scores = np.array(scores, np.float64)
  rows = np.arange(len(scores))
  if seen is not None:
    for r, items in enumerate(seen):
      items = np.asarray(items, np.int64)
      scores[r, items[items != targets[r]]] = -np.inf
  return (scores > scores[rows, targets][:, None]).sum(1)


def target_ranks(graphdef, state_params, builder: tasks.TaskBuilder, task: str, stage: str, split: str,
                 batch_size: int, pad_id: int) -> np.ndarray:
  """Rank of the true item among all items, for every user of the stage (no duplicates, no padding)."""
  users = pipeline.split_users(builder.dataset, split, stage)
  first, last = builder.ids.item_range

  @jax.jit
  def item_logits(params, tokens, images, answer_at):
    logits = nnx.merge(graphdef, params)(tokens, vision.normalize(images), tokens != pad_id)
    at = jnp.take_along_axis(logits, answer_at[:, None, None], axis=1)[:, 0]
    return at[:, first:last]

  ranks = []
  for start in range(0, len(users), batch_size):
    chunk = users[start:start + batch_size]
    examples = []
    for u in chunk:
      user = builder.dataset.user(int(u))
      target = pipeline.target_position(len(user.interactions), split, stage, None)
      examples.append(builder.build(task, user, target, with_answer=False))
    real = len(examples)
    examples += [examples[-1]] * (batch_size - real)  # fixed shape; the copies are dropped below
    tokens = np.stack([e.tokens for e in examples])
    images = np.stack([pipeline.gather_images(builder.dataset, e.image_items) for e in examples])
    answer_at = np.asarray([e.prompt_length - 1 for e in examples], np.int32)
    scores = np.asarray(item_logits(state_params, tokens, images, answer_at))[:real]
    targets = np.asarray([e.target[0] for e in examples[:real]])
    ranks.append((scores > scores[np.arange(real), targets][:, None]).sum(1))
  return np.concatenate(ranks)
