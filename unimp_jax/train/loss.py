"""The UniMP objective (SPEC §3): task-weighted, focal-reweighted next-token cross-entropy on answer spans.

    loss = sum(task_weight * (1 - p_t)^gamma * CE) / number of supervised tokens

`token_losses` returns *sums*, not means, so that gradient accumulation divides by the token count of
the whole batch once, and 4 micro-batches give exactly the gradient of one 4x batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_losses(logits_btv: jax.Array, tokens_bt: jax.Array, answer_mask_bt: jax.Array, weight_b: jax.Array,
                 task_b: jax.Array, *, num_tasks: int, focal_gamma: float, z_loss: float) -> dict[str, jax.Array]:
  """Sums over supervised tokens; position t's logits predict token t+1, so the mask of t+1 applies.

  Returns `objective` (what is differentiated: weighted focal CE plus z-loss), `tokens` (how many are
  supervised), and per task `ce_sum` / `count` [num_tasks] of plain CE, for reporting.
  """
  logits = logits_btv[:, :-1].astype(jnp.float32)
  targets, mask = tokens_bt[:, 1:], answer_mask_bt[:, 1:].astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  ce = log_z - target_logit
  focal = (1.0 - jnp.exp(-ce)) ** focal_gamma if focal_gamma else 1.0
  objective = (weight_b[:, None] * focal * ce * mask).sum()
  if z_loss:
    objective = objective + z_loss * (jnp.square(log_z) * mask).sum()
  one_hot = jax.nn.one_hot(task_b, num_tasks, dtype=jnp.float32)            # [B, tasks]
  return dict(objective=objective, tokens=mask.sum(),
              ce_sum=one_hot.T @ (ce * mask).sum(1), count=one_hot.T @ mask.sum(1))
