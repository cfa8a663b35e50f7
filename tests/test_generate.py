"""Generation: the KV-cache loops against full forward passes, and the item-ID trie constraints."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimp_jax import config as config_lib
from unimp_jax.eval import generate
from unimp_jax.model import unimp
from unimp_jax.sharding import mesh as mesh_lib

CFG = config_lib.base_config()
IMAGE, VOCAB, PAD, EOS = CFG.model.image_token_id, CFG.model.lm.vocab_size, 1, 2


@functools.cache
def _model():
  """A tiny model with its gates opened (images matter) and a sharper head (fewer near-ties)."""
  mesh = mesh_lib.make_mesh(CFG.mesh, jax.devices()[:1])
  model = unimp.create_sharded(CFG.model, mesh, CFG.mesh.rules, seed=0)
  cross = model.lm.groups.cross
  cross.alpha_attn[...] = jnp.full(cross.alpha_attn.shape, 0.7)
  cross.alpha_mlp[...] = jnp.full(cross.alpha_mlp.shape, 0.7)
  model.lm.head[...] = model.lm.head[...] * 8
  return nnx.split(model)


_forward = functools.cache(unimp.jit_forward)


def _prompts(lengths=(23, 31), width=32, num_images=2, seed=0):
  """Right-padded prompts with two `<image>` tokens each, and their pictures."""
  rng = np.random.default_rng(seed)
  tokens = np.full((len(lengths), width), PAD, np.int32)
  for row, n in enumerate(lengths):
    tokens[row, :n] = rng.integers(3, VOCAB, n)
    tokens[row, [1, n // 2]] = IMAGE
  images = rng.normal(size=(len(lengths), num_images, 32, 32, 3)).astype(np.float32)
  return tokens, images, np.asarray(lengths, np.int32)


def _log_probs(sequence, images_row, width=48):
  """log p(token_t | tokens_<t) for one row, from a full forward pass without a cache (padded to one
  width, so it compiles once; positions count real tokens only, so padding changes nothing)."""
  graphdef, state = _model()
  padded = np.full((1, width), PAD, np.int32)
  padded[0, :len(sequence)] = sequence
  logits = _forward(graphdef)(state, padded, images_row[None], padded != PAD)[0, :len(sequence)]
  return np.asarray(jax.nn.log_softmax(logits, axis=-1))


def test_greedy_with_cache_equals_greedy_without():
  graphdef, state = _model()
  tokens, images, lengths = _prompts()
  new = np.asarray(generate.sample(graphdef, state, tokens, images, lengths, jax.random.key(0), max_new=6,
                                   pad_id=PAD, eos_id=EOS))
  for row, n in enumerate(lengths):
    sequence = tokens[row, :n]
    for _ in range(6):
      sequence = np.append(sequence, _log_probs(sequence, images[row])[-1].argmax())
    np.testing.assert_array_equal(new[row], sequence[n:])


def test_beam_scores_are_sequence_log_probabilities_and_one_beam_is_greedy():
  graphdef, state = _model()
  tokens, images, lengths = _prompts()
  out, scores = generate.beam_search(graphdef, state, tokens, images, lengths, num_beams=3, max_new=4,
                                     pad_id=PAD, eos_id=EOS)
  out, scores = np.asarray(out), np.asarray(scores)
  assert (np.diff(scores, axis=1) <= 0).all()
  for row, n in enumerate(lengths):
    assert len({tuple(beam) for beam in out[row]}) == 3
    for beam, score in zip(out[row], scores[row]):
      logp = _log_probs(np.concatenate([tokens[row, :n], beam]), images[row])
      expected = sum(logp[n - 1 + t, beam[t]] for t in range(4))
      np.testing.assert_allclose(score, expected, atol=1e-4)
  one, _ = generate.beam_search(graphdef, state, tokens, images, lengths, num_beams=1, max_new=6, pad_id=PAD,
                                eos_id=EOS)
  greedy = generate.sample(graphdef, state, tokens, images, lengths, jax.random.key(0), max_new=6, pad_id=PAD,
                           eos_id=EOS)  # compiled once for the whole file: same shapes as the first test
  np.testing.assert_array_equal(np.asarray(one)[:, 0], np.asarray(greedy))


def test_constrained_beam_top_item_is_the_full_ranking_argmax():
  graphdef, state = _model()
  tokens, images, lengths = _prompts()
  item_tokens = np.arange(100, 140)[:, None]  # 40 atomic item tokens
  trie = generate.ItemTrie.build(item_tokens)
  banned = np.zeros((2, 40), bool)
  logits = np.asarray(_forward(graphdef)(state, tokens, images, tokens != PAD))
  item_logits = logits[np.arange(2), lengths - 1, 100:140]
  banned[np.arange(2), item_logits.argmax(1)] = True  # ban each row's favourite: the runner-up must win
  out, scores = generate.beam_search(graphdef, state, tokens, images, lengths, banned, num_beams=5, max_new=1,
                                     pad_id=PAD, eos_id=EOS, trie=trie)
  items = trie.items(np.asarray(out))
  expected = np.argsort(-np.where(banned, -np.inf, item_logits), axis=1)[:, :5]
  np.testing.assert_array_equal(items, expected)


def test_constrained_decoding_only_emits_catalogue_items():
  """Property test over random tries (two and three levels) and random bans."""
  graphdef, state = _model()
  tokens, images, lengths = _prompts(seed=1)
  rng = np.random.default_rng(0)
  for depth, codes in ((2, 6), (3, 4)):
    levels = [rng.integers(0, codes, 30) for _ in range(depth)]
    unique = np.unique(np.stack(levels, 1), axis=0)
    item_tokens = np.asarray([[200 + level * codes + c for level, c in enumerate(row)] for row in unique])
    trie = generate.ItemTrie.build(item_tokens)
    banned = rng.random((2, len(unique))) < np.asarray([[0.5], [0.9]])  # row 1: few items left
    out, scores = generate.beam_search(graphdef, state, tokens, images, lengths, banned, num_beams=4,
                                       max_new=depth, pad_id=PAD, eos_id=EOS, trie=trie)
    items = trie.items(np.asarray(out))
    allowed = np.asarray(scores) > generate.NEG_INF / 2
    assert (items[allowed] >= 0).all()
    # No beam is spent on a prefix whose items are all banned: as many items as beams, or as allowed.
    np.testing.assert_array_equal(allowed.sum(1), np.minimum(4, (~banned).sum(1)))
    for row in range(2):
      assert not banned[row, items[row][allowed[row]]].any()
      assert len(set(items[row][allowed[row]])) == allowed[row].sum()
      np.testing.assert_array_equal(item_tokens[items[row][allowed[row]]], np.asarray(out)[row][allowed[row]])


def test_top_p_keeps_the_smallest_nucleus():
  logits = np.log(np.asarray([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
  kept = np.asarray(generate._top_p_filter(jnp.asarray(logits), 0.7)) > generate.NEG_INF / 2
  np.testing.assert_array_equal(kept, [[True, True, False, False], [False, False, True, True]])
  kept = np.asarray(generate._top_p_filter(jnp.asarray(logits), 0.01)) > generate.NEG_INF / 2
  np.testing.assert_array_equal(kept.sum(1), [1, 1])


def test_sampling_is_seeded_and_stops_at_end_of_sequence():
  graphdef, state = _model()
  tokens, images, lengths = _prompts()
  kw = dict(max_new=6, pad_id=PAD, eos_id=EOS, temperature=1.0, top_p=0.9)
  a = np.asarray(generate.sample(graphdef, state, tokens, images, lengths, jax.random.key(1), **kw))
  b = np.asarray(generate.sample(graphdef, state, tokens, images, lengths, jax.random.key(1), **kw))
  np.testing.assert_array_equal(a, b)
  greedy = dict(max_new=6, pad_id=PAD)
  first = np.asarray(generate.sample(graphdef, state, tokens, images, lengths, jax.random.key(0), eos_id=EOS,
                                     **greedy))[:, 0]
  stopped = np.asarray(generate.sample(graphdef, state, tokens, images, lengths, jax.random.key(0),
                                       eos_id=int(first[0]), **greedy))  # row 0's first token ends it
  assert stopped[0, 0] == first[0] and (stopped[0, 1:] == PAD).all()
