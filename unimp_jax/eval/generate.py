"""Token generation with the KV cache: greedy, sampling (temperature, top-p) and beam search, the last
optionally constrained to a trie of item IDs.

Prompts arrive right-padded to a common length `T` (`prompt_length` real tokens per row). The prefill
runs all of them at once; each row's first new token comes from the logits at its own last prompt token,
and every later token is appended at the same cache slot for all rows (padding slots stay invalid, so
rows of different lengths decode together). A whole generation is one compiled program per
(batch, T, max_new, method) shape: `bucket_length` rounds prompt lengths up so a handful of shapes
cover an evaluation. Rows stop at end-of-sequence: after it they emit padding.

Constrained beam search walks an `ItemTrie`: at every step only tokens that continue some item's ID
are allowed, so every result is a catalogue item; items listed in `banned` (the user's history) are
never completed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

NEG_INF = -1e30


def bucket_length(length: int, limit: int, multiple: int = 32) -> int:
  """`length` rounded up to a multiple of `multiple`, at most `limit`: the prompt shapes compiled."""
  return min(limit, -(-length // multiple) * multiple)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument, built once
class ItemTrie:
  """Every item's ID token sequence as a prefix tree over the ID token range [first, first + width).

  next_node [internal nodes, width]  internal node reached by a token, -1 if none
  leaf_item [internal nodes, width]  item completed by a token, -1 if none
  ancestors [items, depth - 1]       the internal nodes on each item's path below the root
  Node 0 is the root. All IDs have the same length (`depth`), so a token completes an item exactly at
  the last level.
  """
  first: int
  depth: int
  next_node: np.ndarray
  leaf_item: np.ndarray
  ancestors: np.ndarray

  @classmethod
  def build(cls, item_tokens: np.ndarray) -> 'ItemTrie':
    """item_tokens: int [num_items, depth], the tokens that spell each item; must be unique."""
    item_tokens = np.asarray(item_tokens, np.int64)
    first = int(item_tokens.min())
    width = int(item_tokens.max()) - first + 1
    num_items, depth = item_tokens.shape
    nodes = {(): 0}
    for row in item_tokens[:, :-1]:
      for d in range(1, depth):
        nodes.setdefault(tuple(row[:d]), len(nodes))
    next_node = np.full((len(nodes), width), -1, np.int32)
    leaf_item = np.full((len(nodes), width), -1, np.int32)
    ancestors = np.asarray([[nodes[tuple(row[:d])] for d in range(1, depth)] for row in item_tokens],
                           np.int32).reshape(num_items, depth - 1)
    for item, row in enumerate(item_tokens):
      for d in range(depth - 1):
        next_node[nodes[tuple(row[:d])], row[d] - first] = nodes[tuple(row[:d + 1])]
      parent = nodes[tuple(row[:-1])]
      if leaf_item[parent, row[-1] - first] >= 0:
        raise ValueError(f'items {leaf_item[parent, row[-1] - first]} and {item} have the same ID tokens {row.tolist()}')
      leaf_item[parent, row[-1] - first] = item
    return cls(first, depth, next_node, leaf_item, ancestors)

  def items(self, tokens: np.ndarray) -> np.ndarray:
    """Item ids spelt by token sequences [..., depth]; -1 for a sequence that is no item's ID."""
    rel = np.asarray(tokens, np.int64) - self.first
    ok = ((rel >= 0) & (rel < self.next_node.shape[1])).all(-1)
    rel = np.clip(rel, 0, self.next_node.shape[1] - 1)
    node = np.zeros(rel.shape[:-1], np.int64)
    for d in range(self.depth - 1):
      node = self.next_node[node, rel[..., d]]
      ok &= node >= 0
      node = np.maximum(node, 0)
    return np.where(ok, self.leaf_item[node, rel[..., -1]], -1)


# --------------------------------------------------------------------------------------------------
# The cache is a dict of arrays (see UniMP.prefill); beams reorder it along each entry's batch axis.
# --------------------------------------------------------------------------------------------------

_BATCH_AXIS = dict(k=2, v=2, valid=0, length=0, media=0, cross_kv=1, pool=0)


def take_rows(cache: dict, rows: jax.Array) -> dict:
  out = dict(cache)
  for name, axis in _BATCH_AXIS.items():
    if name in cache:
      out[name] = jax.tree.map(lambda x, axis=axis: jnp.take(x, rows, axis=axis), cache[name])
  return out


def _prefill(model, tokens_bt, images, prompt_length_b, pad_id, max_new):
  logits, cache = model.prefill(tokens_bt, images, tokens_bt != pad_id, max_len=tokens_bt.shape[1] + max_new)
  last = jnp.take_along_axis(logits, (prompt_length_b - 1)[:, None, None], axis=1)[:, 0]
  return last, cache


def _top_p_filter(logits_bv: jax.Array, top_p: float) -> jax.Array:
  """Keeps the smallest set of most likely tokens whose probability reaches `top_p` (at least one)."""
  order = jnp.argsort(-logits_bv, axis=-1)
  sorted_logits = jnp.take_along_axis(logits_bv, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
  keep_sorted = before < top_p
  keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits_bv.shape[0])[:, None], order].set(keep_sorted)
  return jnp.where(keep, logits_bv, NEG_INF)


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new', 'temperature', 'top_p'))
def sample(graphdef, params, tokens_bt, images, prompt_length_b, rng, allowed_bv=None, *, max_new: int, pad_id: int,
           eos_id: int, temperature: float = 0.0, top_p: float = 1.0) -> jax.Array:
  """New tokens [B, max_new]: greedy when temperature == 0, else sampled from softmax(logits /
  temperature) restricted to the top-p nucleus; only the tokens `allowed_bv` (bool [B, V]) marks, when
  given. Padding after each row's end-of-sequence."""
  model = nnx.merge(graphdef, params)
  logits, cache = _prefill(model, tokens_bt, images, prompt_length_b, pad_id, max_new)

  def choose(logits_bv, key):
    if allowed_bv is not None:
      logits_bv = jnp.where(allowed_bv, logits_bv, NEG_INF)
    if temperature == 0.0:
      return jnp.argmax(logits_bv, axis=-1)
    scaled = logits_bv / temperature
    if top_p < 1.0:
      scaled = _top_p_filter(scaled, top_p)
    return jax.random.categorical(key, scaled, axis=-1)

  def step(carry, key):
    logits_bv, cache, done_b = carry
    token_b = jnp.where(done_b, pad_id, choose(logits_bv, key).astype(jnp.int32))
    logits_b1v, cache = model.decode(token_b[:, None], cache)
    return (logits_b1v[:, 0], cache, done_b | (token_b == eos_id)), token_b

  done = jnp.zeros(tokens_bt.shape[0], bool)
  _, new_tokens = jax.lax.scan(step, (logits, cache, done), jax.random.split(rng, max_new))
  return new_tokens.T


@functools.partial(jax.jit, static_argnames=('graphdef', 'num_beams', 'max_new', 'trie'))
def beam_search(graphdef, params, tokens_bt, images, prompt_length_b, banned_bn=None, allowed_bv=None, *,
                num_beams: int, max_new: int, pad_id: int, eos_id: int, trie: ItemTrie | None = None):
  """(tokens [B, beams, max_new], log-probabilities [B, beams]), best beam first.

  Scores are sums of the model's log-probabilities (no length penalty). A beam that emits
  end-of-sequence is finished: it keeps its score and emits padding. `allowed_bv` (bool [B, V]) restricts
  every step to the tokens it marks (their log-probabilities still over the whole vocabulary). With
  `trie`, `max_new` must equal the ID length and only item IDs can come out; `banned_bn` [B, num_items]
  excludes items per row, and a prefix whose every item is banned is never taken, so no beam is spent on
  it. A row with fewer allowed items than beams gets -inf scores for the rest.
  """
  model = nnx.merge(graphdef, params)
  b, k = tokens_bt.shape[0], num_beams
  logits, cache = _prefill(model, tokens_bt, images, prompt_length_b, pad_id, max_new)
  rows = jnp.repeat(jnp.arange(b), k)
  cache, logits = take_rows(cache, rows), logits[rows]
  vocab = logits.shape[-1]
  scores = jnp.tile(jnp.asarray([0.0] + [NEG_INF] * (k - 1)), b)  # all beams start equal: expand one
  node = jnp.zeros(b * k, jnp.int32)
  done = jnp.zeros(b * k, bool)
  out = jnp.full((b * k, max_new), pad_id, jnp.int32)
  if trie is not None:
    next_node, leaf_item = jnp.asarray(trie.next_node), jnp.asarray(trie.leaf_item)
    if banned_bn is not None:  # per row, how many allowed items each internal node leads to
      allowed_items = (~jnp.asarray(banned_bn)).astype(jnp.int32)
      open_bn = jnp.zeros((b, next_node.shape[0]), jnp.int32)
      for level in range(trie.depth - 1):
        open_bn = open_bn.at[:, trie.ancestors[:, level]].add(allowed_items)

  def constrain(logp, node):
    """Log-probabilities of tokens that continue an ID from `node`; all others -inf."""
    ids = jax.lax.dynamic_slice_in_dim(logp, trie.first, next_node.shape[1], axis=1)
    leaf, child = leaf_item[node], next_node[node]
    allowed = (child >= 0) | (leaf >= 0)
    if banned_bn is not None:
      allowed &= ~(jnp.take_along_axis(banned_bn[rows], jnp.maximum(leaf, 0), axis=1) & (leaf >= 0))
      allowed &= (child < 0) | (jnp.take_along_axis(open_bn[rows], jnp.maximum(child, 0), axis=1) > 0)
    masked = jnp.full_like(logp, NEG_INF)
    return jax.lax.dynamic_update_slice_in_dim(masked, jnp.where(allowed, ids, NEG_INF), trie.first, axis=1)

  def step(carry, t):
    logits, cache, scores, node, done, out = carry
    logp = jax.nn.log_softmax(logits, axis=-1)
    if allowed_bv is not None:
      logp = jnp.where(allowed_bv[rows], logp, NEG_INF)
    if trie is not None:
      logp = constrain(logp, node)
    finished = jnp.full((vocab,), NEG_INF).at[pad_id].set(0.0)
    logp = jnp.where(done[:, None], finished, logp)
    total = (scores[:, None] + logp).reshape(b, k * vocab)
    scores_bk, flat = jax.lax.top_k(total, k)
    parent = (jnp.arange(b)[:, None] * k + flat // vocab).reshape(-1)
    token = (flat % vocab).reshape(-1).astype(jnp.int32)
    if trie is not None:
      node = next_node[node[parent], jnp.clip(token - trie.first, 0, next_node.shape[1] - 1)]
    cache = take_rows(cache, parent)
    done = done[parent] | (token == eos_id)
    out = out[parent].at[:, t].set(token)
    logits_b1v, cache = model.decode(token[:, None], cache)
    return (logits_b1v[:, 0], cache, scores_bk.reshape(-1), node, done, out), None

  carry = (logits, cache, scores, node, done, out)
  (_, _, scores, _, _, out), _ = jax.lax.scan(step, carry, jnp.arange(max_new))
  return out.reshape(b, k, max_new), scores.reshape(b, k)
