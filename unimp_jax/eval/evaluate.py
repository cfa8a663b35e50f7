"""Every task scored on held-out users, sharded over processes.

Each process evaluates its share of the users (`users[process_index::process_count]`; when the model is
sharded across processes, every process evaluates every user, see `evaluate`) and returns one
fixed-size row per user (`rows`). Rows from all processes are gathered, sorted by user and checked for
duplicates before any metric is computed (`summarise`), so N processes give exactly the numbers of one.
Batches are filled up to a fixed size by repeating the last example; those copies never become rows.

Ranking (recommendation, search), `ranking=`:
  full   exact full-catalogue ranking from one forward pass: the item tokens' logits at the answer
         position (atomic IDs only)
  beam   beam search constrained to the item-ID trie (atomic or semantic IDs), 20 beams; a target
         outside the beams counts as a miss
  paper  the UniMP paper's protocol: 10-beam unconstrained generation, a beam counts when its tokens
         spell the target's ID followed by end-of-sequence (string match); history items not removed
`full` and `beam` remove the user's earlier items from the ranking (see ranking.py); all three report
HR/NDCG/MRR@{1,3,5,10,20} from the target's position.

Preference: rating probabilities over the `rate_1..5` tokens at the answer position (argmax and
expectation), then the explanation generated greedily after the predicted rating. Selection: the slot
tokens generated greedily before end-of-sequence.
"""

from __future__ import annotations

import functools
import weakref

import jax
import jax.experimental.multihost_utils
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimp_jax.data import formats, pipeline, tasks
from unimp_jax.eval import generate, metrics, ranking
from unimp_jax.model import vision

RANKINGS = ('full', 'beam', 'paper')
BEAMS = {'beam': max(ranking.KS), 'paper': 10}
EVAL_TASKS = ('recommendation', 'search', 'preference', 'selection')


@functools.partial(jax.jit, static_argnames=('graphdef', 'pad_id'))
def answer_logits(graphdef, params, tokens_bt, images, prompt_length_b, *, pad_id: int) -> jax.Array:
  """Logits [B, V] of the first answer token (one forward pass)."""
  logits = nnx.merge(graphdef, params)(tokens_bt, images, tokens_bt != pad_id)
  return jnp.take_along_axis(logits, (prompt_length_b - 1)[:, None, None], axis=1)[:, 0]


_TRIES = weakref.WeakKeyDictionary()


def item_trie(builder: tasks.TaskBuilder) -> generate.ItemTrie:
  """The builder's item-id trie, built once: beam search compiles once per trie (a static argument)."""
  if builder not in _TRIES:
    _TRIES[builder] = generate.ItemTrie.build(builder.item_tokens)
  return _TRIES[builder]


def _batches(builder: tasks.TaskBuilder, task: str, users: np.ndarray, split: str, stage: str, batch_size: int,
             seed: int):
  """(real rows, examples, users, targets, tokens, images, prompt lengths) per fixed-size batch."""
  for start in range(0, len(users), batch_size):
    chunk = users[start:start + batch_size]
    examples, targets = [], []
    for u in chunk:
      user = builder.dataset.user(int(u))
      target = pipeline.target_position(len(user.interactions), split, stage, None)
      rng = np.random.default_rng([seed, int(u)])  # selection questions made up for users without any
      examples.append(builder.build(task, user, target, with_answer=False, rng=rng))
      targets.append(target)
    real = len(examples)
    examples += [examples[-1]] * (batch_size - real)
    lengths = np.asarray([e.prompt_length for e in examples], np.int32)
    width = generate.bucket_length(int(lengths.max()), builder.seq_len)
    tokens = np.stack([e.tokens[:width] for e in examples])
    images = None
    if builder.uses_images:
      images = vision.normalize(np.stack([pipeline.gather_images(builder.dataset, e.image_items) for e in examples]))
    yield real, examples[:real], chunk, targets, tokens, images, lengths


def _position(candidates: np.ndarray, targets: np.ndarray, miss: int) -> np.ndarray:
  """Index of each row's target in its candidate list (best first); `miss` when absent."""
  found = candidates == targets[:, None]
  return np.where(found.any(1), found.argmax(1), miss)


def task_rows(graphdef, params, builder: tasks.TaskBuilder, task: str, users: np.ndarray, *, split: str,
              stage: str, batch_size: int, ranking_method: str = 'full', seed: int = 0,
              negatives: int = 0) -> dict[str, np.ndarray]:
  """One row per user of `users` (this process's share): what `summarise` needs for `task`, and for
  recommendation and search the best `max(ranking.KS)` items (`top`, -1 where fewer).

  `negatives` > 0 (full ranking only): the sampled-negatives protocol of many published tables, the
  target ranked among that many items drawn uniformly, per user and seeded by (seed, user), from the
  items the user has not interacted with before; `top` is then that ranking's."""
  if ranking_method not in RANKINGS:
    raise ValueError(f'ranking {ranking_method!r} is not one of {RANKINGS}')
  if negatives and ranking_method != 'full':
    raise ValueError('sampled negatives need full ranking (scores for every item)')
  pad, eos = builder.pad, builder.eos
  item_tokens = builder.item_tokens
  num_items, id_length = item_tokens.shape
  if task in ('recommendation', 'search') and ranking_method == 'full' and id_length != 1:
    raise ValueError('full-catalogue ranking needs atomic item IDs (config.data.item_ids); use beam ranking')
  trie = item_trie(builder)
  kw = dict(pad_id=pad, eos_id=eos)
  rows = {'user': [], 'target': []}
  for real, examples, chunk, targets, tokens, images, lengths in _batches(
      builder, task, users, split, stage, batch_size, seed):
    user_objs = [builder.dataset.user(int(u)) for u in chunk]
    rows['user'].append(np.asarray(chunk, np.int64))
    rows['target'].append(np.asarray(targets, np.int64))
    if task in ('recommendation', 'search'):
      target_items = np.asarray([e.target[0] for e in examples])
      seen = [ranking.seen_before(u, t) for u, t in zip(user_objs, targets)]
      if ranking_method == 'full':
        logits = np.asarray(answer_logits(graphdef, params, tokens, images, lengths, pad_id=pad))[:real]
        scores = logits[:, item_tokens[:, 0]]
        if negatives:
          seen = [sampled_out(u, t, s, num_items, negatives, seed) for u, t, s in zip(chunk, target_items, seen)]
        rank = ranking.ranks_from_scores(scores, target_items, seen)
        rows.setdefault('top', []).append(ranking.top_items(scores, seen, max(ranking.KS)))
      else:
        banned = np.zeros((len(tokens), num_items), bool)
        if ranking_method == 'beam':
          for r, items in enumerate(seen):
            banned[r, items[items != target_items[r]]] = True
        paper = ranking_method == 'paper'
        out, _ = generate.beam_search(graphdef, params, tokens, images, lengths, None if paper else banned,
                                      num_beams=BEAMS[ranking_method], max_new=id_length + paper,
                                      trie=None if paper else trie, **kw)
        out = np.asarray(out)[:real]
        found = trie.items(out[..., :id_length])
        if paper:  # string match: the ID and then end-of-sequence
          found = np.where(out[..., id_length] == eos, found, -1)
        rank = _position(found, target_items, num_items)
        rows.setdefault('top', []).append(found[:, :max(ranking.KS)])
      rows.setdefault('rank', []).append(rank)
    elif task == 'preference':
      probs, text = rating_and_explanation(graphdef, params, builder, tokens, images, lengths)
      rows.setdefault('rating_probs', []).append(probs[:real])
      rows.setdefault('rating', []).append(np.asarray([e.target[1] for e in examples]))
      rows.setdefault('explanation', []).append(text[:real])
    elif task == 'selection':
      rows.setdefault('chosen', []).append(chosen_slots(graphdef, params, builder, tokens, images, lengths)[:real])
      rows.setdefault('positives', []).append(np.asarray([e.target[2] for e in examples]))
    else:
      raise ValueError(f'no evaluation for task {task!r}; choose from {EVAL_TASKS}')
  return {k: np.concatenate(v) for k, v in rows.items()}


def sampled_out(user: int, target: int, seen: np.ndarray, num_items: int, negatives: int, seed: int) -> np.ndarray:
  """Every item but the target and `negatives` seeded random unseen ones: what the sampled-negatives
  protocol removes from the ranking."""
  pool = np.setdiff1d(np.arange(num_items), np.append(seen, target))
  kept = np.random.default_rng([seed, int(user)]).choice(pool, min(negatives, len(pool)), replace=False)
  return np.setdiff1d(np.arange(num_items), np.append(kept, target))


def rating_and_explanation(graphdef, params, builder: tasks.TaskBuilder, tokens, images, lengths):
  """(probabilities [B, 5] over ratings 1..5, explanation tokens [B, E]): the rating from the answer
  position's `rate_r` logits, the explanation generated greedily after the most likely rating."""
  ids = builder.ids
  logits = np.asarray(answer_logits(graphdef, params, tokens, images, lengths, pad_id=builder.pad))
  rating_logits = logits[:, [ids.rating(r) for r in metrics.RATINGS]]
  probs = np.exp(rating_logits - rating_logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  with_rating = np.concatenate([tokens, np.full((len(tokens), 1), builder.pad, np.int32)], axis=1)
  with_rating[np.arange(len(tokens)), lengths] = [ids.rating(int(r)) for r in probs.argmax(1) + 1]
  text = generate.sample(graphdef, params, with_rating, images, lengths + 1, jax.random.key(0),
                         max_new=tasks.EXPLANATION_TOKENS + 1, pad_id=builder.pad, eos_id=builder.eos)
  return probs, np.asarray(text)


def chosen_slots(graphdef, params, builder: tasks.TaskBuilder, tokens, images, lengths) -> np.ndarray:
  """Bitmasks [B] of the slot tokens generated greedily before end-of-sequence (others ignored)."""
  ids = builder.ids
  out = np.asarray(generate.sample(graphdef, params, tokens, images, lengths, jax.random.key(0),
                                   max_new=ids.num_slots + 1, pad_id=builder.pad, eos_id=builder.eos))
  slot_tokens = np.asarray([ids.slot(s) for s in range(ids.num_slots)])
  before_end = np.cumsum(out == builder.eos, axis=1) == 0
  hits = (out[:, :, None] == slot_tokens) & before_end[:, :, None]  # [B, new tokens, slots]
  return (hits.any(1) * (1 << np.arange(ids.num_slots))).sum(1)


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


def summarise(task: str, rows: dict[str, np.ndarray], builder: tasks.TaskBuilder) -> dict[str, float]:
  rows = merge([rows])
  out = {'users': len(rows['user'])}
  if task in ('recommendation', 'search'):
    out.update(ranking.ranking_metrics(rows['rank']))
  elif task == 'preference':
    out.update(metrics.rating_metrics(rows['rating_probs'], rows['rating']))
    references = [builder.dataset.user(int(u)).interactions[t].explanation for u, t in zip(rows['user'], rows['target'])]
    if any(references):  # datasets without reviews (MovieLens) have no explanations to score
      hypotheses = [decode_text(builder, row) for row in rows['explanation']]
      out.update(metrics.text_metrics(hypotheses, references))
  elif task == 'selection':
    out.update(metrics.selection_metrics(rows['chosen'], rows['positives']))
  return out


def decode_text(builder: tasks.TaskBuilder, tokens: np.ndarray) -> str:
  """Generated tokens up to end-of-sequence as text (added tokens dropped)."""
  end = np.flatnonzero(tokens == builder.eos)
  return builder.tokenizer.decode(tokens[:end[0] if len(end) else len(tokens)], skip_special_tokens=True).strip()


def evaluate(graphdef, params, builder: tasks.TaskBuilder, **kw) -> dict[str, dict[str, float]]:
  """{task: metrics} over all users of the stage (arguments as `evaluate_rows`); recommendation and
  search are also reported for warm and cold targets ('recommendation, cold targets', ...)."""
  return summaries(evaluate_rows(graphdef, params, builder, **kw), builder)


def summaries(rows_by_task: dict[str, dict[str, np.ndarray]], builder: tasks.TaskBuilder) -> dict[str, dict[str, float]]:
  """`evaluate`'s metrics from `evaluate_rows`' rows."""
  results = {}
  for task, rows in rows_by_task.items():
    results[task] = summarise(task, rows, builder)
    if task in ('recommendation', 'search'):
      results.update({f'{task}, {kind} targets': summarise(task, part, builder)
                      for kind, part in by_target_kind(rows, builder.dataset).items()})
  return results


def evaluate_rows(graphdef, params, builder: tasks.TaskBuilder, *, split: str, stage: str = 'test',
                  batch_size: int, tasks_to_run=EVAL_TASKS, ranking_method: str | None = None, seed: int = 0,
                  negatives: int = 0, process_index: int | None = None,
                  process_count: int | None = None) -> dict[str, dict[str, np.ndarray]]:
  """{task: one row per user} over all users of the stage (every process gets all rows), this process
  evaluating its share. Ranking defaults to `full` for atomic ids and `beam` for semantic ones;
  `negatives` as in `task_rows`."""
  if ranking_method is None:
    ranking_method = 'full' if builder.item_tokens.shape[1] == 1 else 'beam'
  if process_count is None:
    # A process may run its own jitted calls on its own users only when it holds the whole model; a model
    # sharded across processes needs the same calls with the same inputs everywhere, so then every
    # process evaluates every user (correct, redundant; a global-batch evaluation would share the work).
    whole = all(x.is_fully_addressable for x in jax.tree.leaves(params))
    process_index, process_count = (jax.process_index(), jax.process_count()) if whole else (0, 1)
  users = pipeline.split_users(builder.dataset, split, stage)
  out = {}
  for task in tasks_to_run:
    eligible = np.asarray([u for u in users if builder.available(task, builder.dataset.user(int(u)))], np.int64)
    if not len(eligible):  # e.g. preference on a dataset without ratings
      continue
    rows = share_rows(graphdef, params, builder, task, eligible, process_index, process_count, split=split,
                      stage=stage, batch_size=batch_size, ranking_method=ranking_method, seed=seed,
                      negatives=negatives if task in ('recommendation', 'search') else 0)
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


def share_rows(graphdef, params, builder: tasks.TaskBuilder, task: str, users: np.ndarray, process_index: int,
               process_count: int, **kw) -> dict[str, np.ndarray]:
  """`task_rows` of this process's share of `users` (every `process_count`-th). A process left without
  users (more processes than users) runs one user's batch anyway and keeps none of its rows, so that its
  rows have every column, with the dtypes and shapes the other processes' have."""
  share = users[process_index::process_count]
  if len(share):
    return task_rows(graphdef, params, builder, task, share, **kw)
  return {k: v[:0] for k, v in task_rows(graphdef, params, builder, task, users[:1], **kw).items()}
