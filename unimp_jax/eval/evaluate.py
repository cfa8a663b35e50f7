"""Every task scored on held-out users, sharded over processes.

Each process evaluates its share of the users (`users[process_index::process_count]`; when the model is
sharded across processes, every process evaluates every user, see `evaluate_rows`) and returns one
fixed-size row per user. Rows from all processes are gathered, sorted by user and checked for
duplicates before any metric is computed (`merge`), so N processes give exactly the numbers of one.
Batches are filled up to a fixed size by repeating the last example; those copies never become rows.

What a row holds and how it is scored is the task's (unimp_jax.tasks: ranking for recommendation and
search, rating and explanation for preference, slots for selection); tasks whose answers are items are
also reported for warm and cold targets.
"""

from __future__ import annotations

import jax
import jax.experimental.multihost_utils
import numpy as np

from unimp_jax import tasks
from unimp_jax.data import formats, pipeline, prompts, splits
from unimp_jax.eval import generate

RANKINGS = ('full', 'beam', 'paper')  # unimp_jax.tasks.recommendation


def _batches(builder: prompts.TaskBuilder, task: str, users: np.ndarray, split: str, stage: str, batch_size: int,
             seed: int):
  """Fixed-size `tasks.EvalBatch`es of `users`' prompts at their evaluation targets."""
  for start in range(0, len(users), batch_size):
    chunk = users[start:start + batch_size]
    examples, targets, user_objs = [], [], []
    for u in chunk:
      user = builder.dataset.user(int(u))
      target = splits.target_position(len(user.interactions), split, stage, None)
      rng = np.random.default_rng([seed, int(u)])  # selection questions made up for users without any
      examples.append(builder.build(task, user, target, with_answer=False, rng=rng))
      targets.append(target)
      user_objs.append(user)
    real = len(examples)
    padded = examples + [examples[-1]] * (batch_size - real)
    lengths = np.asarray([e.prompt_length for e in padded], np.int32)
    width = generate.bucket_length(int(lengths.max()), builder.seq_len)
    tokens = np.stack([e.tokens[:width] for e in padded])
    images = None
    if builder.uses_images:
      images = np.stack([pipeline.gather_images(builder.dataset, e.image_items) for e in padded])
    yield tasks.EvalBatch(examples=examples, users=user_objs, user_ids=np.asarray(chunk, np.int64),
                          targets=np.asarray(targets, np.int64), tokens=tokens, images=images, lengths=lengths,
                          real=real)


def task_rows(graphdef, params, builder: prompts.TaskBuilder, task: str, users: np.ndarray, *, split: str,
              stage: str, batch_size: int, ranking_method: str = 'full', seed: int = 0,
              negatives: int = 0) -> dict[str, np.ndarray]:
  """One row per user of `users` (this process's share): 'user', 'target' and the task's columns
  (unimp_jax.tasks.Task.evaluate). `negatives` > 0: the sampled-negatives protocol of ranking tasks
  (unimp_jax.tasks.recommendation)."""
  if ranking_method not in RANKINGS:
    raise ValueError(f'ranking {ranking_method!r} is not one of {RANKINGS}')
  if task not in tasks.EVALUATED:
    raise ValueError(f'no evaluation for task {task!r}; choose from {tasks.EVALUATED}')
  ctx = tasks.EvalContext(graphdef, params, builder, ranking=ranking_method, negatives=negatives, seed=seed)
  rows = {'user': [], 'target': []}
  for batch in _batches(builder, task, users, split, stage, batch_size, seed):
    rows['user'].append(batch.user_ids)
    rows['target'].append(batch.targets)
    for key, column in tasks.TASKS[task].evaluate(ctx, batch).items():
      rows.setdefault(key, []).append(column)
  return {k: np.concatenate(v) for k, v in rows.items()}


def gather(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """All processes' rows on every process (padding rows, user -1, are added for equal shapes and
  dropped again)."""
  counts = jax.experimental.multihost_utils.process_allgather(np.asarray([len(rows['user'])]))
  most = int(counts.max())
  padded = {k: np.concatenate([v, np.full((most - len(v), *v.shape[1:]), -1, v.dtype)]) for k, v in rows.items()}
  everything = jax.experimental.multihost_utils.process_allgather(padded, tiled=True)
  keep = np.asarray(everything['user']) >= 0
  return {k: np.asarray(v)[keep] for k, v in everything.items()}


def merge(shards: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Rows of several shards as one, sorted by user; a user counted twice is an error."""
  rows = {k: np.concatenate([s[k] for s in shards]) for k in shards[0]}
  order = np.argsort(rows['user'], kind='stable')
  rows = {k: v[order] for k, v in rows.items()}
  if len(np.unique(rows['user'])) != len(rows['user']):
    raise ValueError('a user was evaluated twice: the process shares overlap')
  return rows


def summarise(task: str, rows: dict[str, np.ndarray], builder: prompts.TaskBuilder) -> dict[str, float]:
  rows = merge([rows])
  return {'users': len(rows['user']), **tasks.TASKS[task].summarise(rows, builder)}


def evaluate(graphdef, params, builder: prompts.TaskBuilder, **kw) -> dict[str, dict[str, float]]:
  """{task: metrics} over all users of the stage (arguments as `evaluate_rows`); tasks whose answers
  are items are also reported for warm and cold targets ('recommendation, cold targets', ...)."""
  return summaries(evaluate_rows(graphdef, params, builder, **kw), builder)


def summaries(rows_by_task: dict[str, dict[str, np.ndarray]],
              builder: prompts.TaskBuilder) -> dict[str, dict[str, float]]:
  """`evaluate`'s metrics from `evaluate_rows`' rows."""
  results = {}
  for task, rows in rows_by_task.items():
    results[task] = summarise(task, rows, builder)
    if tasks.TASKS[task].answers_items:
      results.update({f'{task}, {kind} targets': summarise(task, part, builder)
                      for kind, part in by_target_kind(rows, builder.dataset).items()})
  return results


def evaluate_rows(graphdef, params, builder: prompts.TaskBuilder, *, split: str, stage: str = 'test',
                  batch_size: int, tasks_to_run=tasks.EVALUATED, ranking_method: str | None = None, seed: int = 0,
                  negatives: int = 0, max_users: int | None = None, process_index: int | None = None,
                  process_count: int | None = None) -> dict[str, dict[str, np.ndarray]]:
  """{task: one row per user} over all users of the stage (or its first `max_users`; every process gets
  all rows), this process evaluating its share. Ranking defaults to `full` for atomic ids and `beam` for
  semantic ones; `negatives` as in `task_rows`."""
  if ranking_method is None:
    ranking_method = 'full' if builder.item_tokens.shape[1] == 1 else 'beam'
  if process_count is None:
    # A process may run its own jitted calls on its own users only when it holds the whole model; a model
    # sharded across processes needs the same calls with the same inputs everywhere, so then every
    # process evaluates every user (correct, redundant; a global-batch evaluation would share the work).
    whole = all(x.is_fully_addressable for x in jax.tree.leaves(params))
    process_index, process_count = (jax.process_index(), jax.process_count()) if whole else (0, 1)
  users = splits.split_users(builder.dataset, split, stage)[:max_users]
  out = {}
  for task in tasks_to_run:
    eligible = np.asarray([u for u in users if tasks.TASKS[task].available(builder, builder.dataset.user(int(u)))],
                          np.int64)
    if not len(eligible):  # e.g. preference on a dataset without ratings
      continue
    rows = share_rows(graphdef, params, builder, task, eligible, process_index, process_count, split=split,
                      stage=stage, batch_size=batch_size, ranking_method=ranking_method, seed=seed,
                      negatives=negatives if tasks.TASKS[task].answers_items else 0)
    out[task] = merge([gather(rows) if process_count > 1 else rows])
  return out


def by_target_kind(rows: dict[str, np.ndarray], dataset) -> dict[str, dict[str, np.ndarray]]:
  """Rows split by whether their target item is warm or cold (`extra.cold_items`: released after the
  data's cut-off, never in training); {} for data without cold items."""
  cold = formats.cold_mask(dataset)
  if not cold.any():
    return {}
  targets = np.asarray([dataset.user(int(u)).interactions[t].item for u, t in zip(rows['user'], rows['target'])])
  parts = {'warm': ~cold[targets], 'cold': cold[targets]}
  return {kind: {k: v[keep] for k, v in rows.items()} for kind, keep in parts.items() if keep.any()}


def share_rows(graphdef, params, builder: prompts.TaskBuilder, task: str, users: np.ndarray, process_index: int,
               process_count: int, **kw) -> dict[str, np.ndarray]:
  """`task_rows` of this process's share of `users` (every `process_count`-th). A process left without
  users (more processes than users) runs one user's batch anyway and keeps none of its rows, so that its
  rows have every column, with the dtypes and shapes the other processes' have."""
  share = users[process_index::process_count]
  if len(share):
    return task_rows(graphdef, params, builder, task, share, **kw)
  return {k: v[:0] for k, v in task_rows(graphdef, params, builder, task, users[:1], **kw).items()}
