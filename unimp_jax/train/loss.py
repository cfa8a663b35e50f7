"""The UniMP objective (SPEC §3): task-weighted, focal-reweighted next-token cross-entropy on answer spans.

    loss = sum(task_weight * (1 - p_t)^gamma * CE) / number of supervised tokens

Optionally (`train.next_item_weight`, off in the paper's objective) every history chunk's
`<|endofchunk|>` also predicts the id of the item bought next, as a sequential recommender is trained
at every step of the sequence (`Example.next_items`). Those positions count as supervised tokens, with
weight `next_item_weight` whatever the example's task.

`excluded` token ids (items released after the data's cut-off) are left out of every softmax: at
training time those items do not exist yet, and as permanent negatives the model would learn to rank
them last, the opposite of what they are there for.

`token_losses` returns *sums*, not means, so that gradient accumulation divides by the token count of
the whole batch once, and 4 micro-batches give exactly the gradient of one 4x batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_losses(logits_btv: jax.Array, tokens_bt: jax.Array, answer_mask_bt: jax.Array, weight_b: jax.Array,
                 task_b: jax.Array, *, num_tasks: int, focal_gamma: float, z_loss: float,
                 next_items_bt: jax.Array | None = None, next_item_weight: float = 0.0,
                 excluded=None) -> dict[str, jax.Array]:
  """Sums over supervised tokens; position t's logits predict token t+1, so the mask of t+1 applies,
  except where `next_items_bt[t]` names the next item (used when `next_item_weight` > 0).

  Returns `objective` (what is differentiated: weighted focal CE plus z-loss), `tokens` (how many are
  supervised), per task `ce_sum` / `count` [num_tasks] of plain CE on answer spans, and the next-item
  positions' `next_item_ce_sum` / `next_item_count`, for reporting.
  """
  labels = _labels(tokens_bt, answer_mask_bt, weight_b, next_items_bt, next_item_weight)
  return _sums(logits_btv[:, :-1], *labels, task_b, num_tasks=num_tasks, focal_gamma=focal_gamma, z_loss=z_loss,
               excluded=excluded)


def chunked_token_losses(hidden_btd: jax.Array, head, tokens_bt: jax.Array, answer_mask_bt: jax.Array,
                         weight_b: jax.Array, task_b: jax.Array, *, chunk: int, num_tasks: int, focal_gamma: float,
                         z_loss: float, next_items_bt: jax.Array | None = None, next_item_weight: float = 0.0,
                         excluded=None) -> dict[str, jax.Array]:
  """`token_losses` of `head(hidden)` computed `chunk` positions at a time (`train.loss_chunk`): a loop whose
  body is rematerialised, so the float32 logits [B, T, V] never exist at once, in the forward pass or the
  backward one; [B, chunk, V] at a time does. The sums are the same (up to float addition order)."""
  labels = _labels(tokens_bt, answer_mask_bt, weight_b, next_items_bt, next_item_weight)
  hidden = hidden_btd[:, :-1]
  t = hidden.shape[1]
  pad = -t % chunk
  split = lambda x: jnp.moveaxis(jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)).reshape(
      x.shape[0], (t + pad) // chunk, chunk, *x.shape[2:]), 1, 0)  # [chunks, B, chunk, ...]; padding: mask 0

  @jax.checkpoint
  def one(xs):
    h, *chunk_labels = xs
    return _sums(head(h), *chunk_labels, task_b, num_tasks=num_tasks, focal_gamma=focal_gamma, z_loss=z_loss,
                 excluded=excluded)

  return jax.tree.map(lambda x: x.sum(0), jax.lax.map(one, [split(x) for x in (hidden, *labels)]))


def _labels(tokens_bt, answer_mask_bt, weight_b, next_items_bt, next_item_weight):
  """(targets, answer mask, loss weight, next-item mask), each [B, T-1]: what each position's logits predict."""
  targets, mask = tokens_bt[:, 1:], answer_mask_bt[:, 1:].astype(jnp.float32)
  weight = jnp.broadcast_to(weight_b[:, None].astype(jnp.float32), mask.shape)
  next_mask = jnp.zeros_like(mask)
  if next_item_weight:
    next_mask = (next_items_bt[:, :-1] >= 0).astype(jnp.float32)  # never an answer position: those are
    targets = jnp.where(next_mask > 0, next_items_bt[:, :-1], targets)  # followed by answer or end tokens
    weight = jnp.where(next_mask > 0, next_item_weight, weight)
  return targets, mask, weight, next_mask


def _sums(logits_btv, targets, mask, weight, next_mask, task_b, *, num_tasks, focal_gamma, z_loss, excluded):
  logits = logits_btv.astype(jnp.float32)
  if excluded is not None and len(excluded):  # a target among them gives an infinite loss: training stops
    keep = jnp.ones(logits.shape[-1], bool).at[excluded].set(False)  # [V]: one select fused into the logits
    logits = jnp.where(keep, logits, -jnp.inf)
  supervised = mask + next_mask
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  ce = log_z - target_logit
  focal = (1.0 - jnp.exp(-ce)) ** focal_gamma if focal_gamma else 1.0
  objective = (weight * focal * ce * supervised).sum()
  if z_loss:
    objective = objective + z_loss * (jnp.square(log_z) * supervised).sum()
  one_hot = jax.nn.one_hot(task_b, num_tasks, dtype=jnp.float32)            # [B, tasks]
  return dict(objective=objective, tokens=supervised.sum(),
              ce_sum=one_hot.T @ (ce * mask).sum(1), count=one_hot.T @ mask.sum(1),
              next_item_ce_sum=(ce * next_mask).sum(), next_item_count=next_mask.sum())
