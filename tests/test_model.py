"""Behaviour of the UniMP model: gates, the media mask and the KV cache."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unimp_jax import config as config_lib
from unimp_jax.model import unimp
from unimp_jax.model.lm import GatedCrossAttention
from unimp_jax.sharding import mesh as mesh_lib

CFG = config_lib.base_config()
IMAGE = CFG.model.image_token_id
VOCAB = CFG.model.lm.vocab_size


# With `model.item_pool` (the pooled user tower): a range of ordinary tokens stands for the items.
POOL = dict(item_pool=True, item_tokens=(100, VOCAB // 2))


@functools.cache
def _initial_weights(pool=False):
  # One device: these tests are about numerics; tests/test_sharding.py covers the meshes.
  cfg = config_lib.base_config()
  cfg.model.update(POOL if pool else {})
  mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1])
  return nnx.split(unimp.create_sharded(cfg.model, mesh, cfg.mesh.rules, seed=0))


_compiled_forward = functools.cache(unimp.jit_forward)


def _model(alpha=None, pool=False):
  graphdef, state = _initial_weights(pool)
  model = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
  if alpha is not None:  # open the gates so that images change the output
    cross = model.lm.groups.cross
    cross.alpha_attn[...] = jnp.full(cross.alpha_attn.shape, alpha)
    cross.alpha_mlp[...] = jnp.full(cross.alpha_mlp.shape, alpha)
  return model


def _forward(model, tokens, images=None, mask=None):
  graphdef, state = nnx.split(model)
  return np.asarray(_compiled_forward(graphdef)(state, tokens, images, mask))


def _batch(seed=0, batch=2, length=40, image_positions=(5, 17, 29), num_images=3):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, (batch, length))
  tokens[:, list(image_positions)] = IMAGE
  images = rng.normal(size=(batch, num_images, 32, 32, 3)).astype(np.float32)
  return tokens, images


def test_closed_gates_give_the_text_only_lm():
  tokens, images = _batch()
  model = _model()
  assert not np.any(np.asarray(model.lm.groups.cross.alpha_attn[...]))
  np.testing.assert_array_equal(_forward(model, tokens, images), _forward(model, tokens))
  opened = _model(alpha=0.5)
  assert np.abs(_forward(opened, tokens, images) - _forward(opened, tokens)).max() > 1e-3


def test_pixels_as_stored_are_normalised_inside_with_clips_statistics():
  """uint8 pictures (what the dataset stores and batches carry) give the logits of the same pictures
  normalised by numpy with CLIP's mean and standard deviation (floats are taken as normalised)."""
  tokens, _ = _batch()
  pixels = np.random.default_rng(3).integers(0, 256, (2, 3, 32, 32, 3), dtype=np.uint8)
  clip_mean, clip_std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
  normalised = ((pixels / 255.0 - clip_mean) / clip_std).astype(np.float32)
  model = _model(alpha=0.5)
  np.testing.assert_allclose(_forward(model, tokens, pixels), _forward(model, tokens, normalised), atol=1e-5)
  assert np.abs(_forward(model, tokens, pixels) - _forward(model, tokens, pixels.astype(np.float32))).max() > 1e-3


def test_changing_image_k_leaves_everything_before_it_unchanged():
  positions = (5, 17, 29)
  tokens, images = _batch(image_positions=positions)
  model = _model(alpha=1.0)
  base = _forward(model, tokens, images)
  for k, pos in enumerate(positions):
    changed = images.copy()
    changed[:, k] = np.random.default_rng(10 + k).normal(size=changed[:, k].shape)
    out = _forward(model, tokens, changed)
    np.testing.assert_array_equal(out[:, :pos], base[:, :pos])
    assert np.abs(out[:, pos:] - base[:, pos:]).max() > 1e-4


def _attention_reference(q, k, v, mask):
  """float64 numpy: softmax(q k' / sqrt(d)) v per head, query head h reading key head h // (H / K), masked
  positions left out; a row with none left averages every position (finite, where -inf would give NaN)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  groups = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  logits = np.einsum('bthd,bshd->bhts', q, k) / np.sqrt(q.shape[-1])
  allowed = np.broadcast_to(mask[:, None], logits.shape)
  logits = np.where(allowed, logits, -np.inf)
  logits = np.where(allowed.any(-1, keepdims=True), logits, 0.0)  # no position left: the plain average
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum('bhts,bshd->bthd', probs, v)


@pytest.mark.parametrize('heads,kv_heads,dtype,tol', [(4, 4, jnp.float32, 1e-5), (8, 2, jnp.float32, 1e-5),
                                                     (8, 2, jnp.bfloat16, 3e-2)])
def test_attention_equals_a_numpy_reference_under_causal_padding_and_cross_masks(heads, kv_heads, dtype, tol):
  """The causal mask with right padding, and a cross-attention mask with rows that may see no picture."""
  from unimp_jax.model import layers
  rng = np.random.default_rng(0)
  b, t, s, d = 2, 12, 12, 16
  q, k, v = (rng.normal(size=shape).astype(np.float32) for shape in ((b, t, heads, d), (b, s, kv_heads, d),
                                                                      (b, s, kv_heads, d)))
  causal = np.tril(np.ones((t, s), bool))[None] & (np.arange(s) < np.array([[12], [7]]))[:, None]
  cross = rng.random((b, t, s)) < 0.3
  cross[:, :3] = False  # tokens before any picture
  for mask in (causal, cross, None):
    out = layers.attention(*(jnp.asarray(x, dtype) for x in (q, k, v)), None if mask is None else jnp.asarray(mask))
    expected = _attention_reference(q, k, v, np.ones((b, t, s), bool) if mask is None else mask)
    assert out.dtype == dtype and not np.isnan(np.asarray(out, np.float32)).any()
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=tol, rtol=0)


def test_cudnn_attention_is_refused_off_nvidia_gpus():
  cfg = config_lib.base_config()
  cfg.model.attention = 'cudnn'
  with pytest.raises(config_lib.ConfigError, match=r"config.model.attention.*NVIDIA GPUs; this process runs on cpu"):
    config_lib.validate(cfg, jax.device_count())
  cfg.model.attention = 'flash'
  with pytest.raises(config_lib.ConfigError, match=r"config.model.attention.*'flash'"):
    config_lib.validate(cfg, jax.device_count())


@pytest.mark.parametrize('mode', ['previous', 'all'])
def test_cross_attention_sees_the_images_the_media_mask_allows(mode):
  lm = CFG.model.lm
  block = GatedCrossAttention(lm, CFG.model.vision.width, dtype=jnp.float32, param_dtype=jnp.float32,
                              stack=(), attention='xla', rngs=nnx.Rngs(0))
  block.alpha_attn[...] = jnp.ones_like(block.alpha_attn[...])
  num_images, num_latents, length = 3, 4, 24
  positions = (4, 10, 17)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (1, length))
  tokens[0, list(positions)] = IMAGE
  x = jnp.asarray(rng.normal(size=(1, length, lm.width)), jnp.float32)
  latents = rng.normal(size=(1, num_images * num_latents, CFG.model.vision.width)).astype(np.float32)
  media = unimp.media_index(tokens, IMAGE)
  mask = unimp.cross_attention_mask(media, num_images, num_latents, mode)

  def cross_output(lat):  # the gated cross-attention term alone (alpha_mlp = 0)
    k, v = block.project_kv(jnp.asarray(lat))
    return np.asarray(block(x, k, v, mask, mask.any(-1)) - x)[0]

  base = cross_output(latents)
  np.testing.assert_array_equal(base[:positions[0]], 0.0)  # before any image: exactly zero
  assert np.all(np.abs(base[positions[0]:]).max(-1) > 0)
  for j in range(num_images):
    changed = latents.copy()
    changed[:, j * num_latents:(j + 1) * num_latents] += 1.0
    out = cross_output(changed)
    sees_j = (media[0] == j) if mode == 'previous' else (media[0] >= j)
    sees_j = np.asarray(sees_j)
    np.testing.assert_array_equal(out[~sees_j], base[~sees_j])
    assert np.all(np.abs(out[sees_j] - base[sees_j]).max(-1) > 0)


@pytest.mark.parametrize('pool', [False, True])
def test_kv_cache_decoding_matches_full_forward(pool):
  """Prefill a right-padded prompt with images, then decode one token at a time (one of them an
  `<image>` that opens the next slot); every step's logits must equal a full forward pass. With the
  pooled user tower the cache carries the sum and count of the item embeddings so far."""
  model = _model(alpha=0.7, pool=pool)
  graphdef, state = nnx.split(model)
  prompt, images = _batch(seed=3, length=24, image_positions=(2, 11), num_images=3)
  prompt_mask = np.ones_like(prompt, bool)
  prompt_mask[0, 18:] = False  # row 0 has a 6-token shorter prompt
  steps = np.random.default_rng(4).integers(0, VOCAB, (2, 6))
  steps[:, 2] = IMAGE

  @jax.jit
  def prefill(state, tokens, images, mask):
    return nnx.merge(graphdef, state).prefill(tokens, images, mask, max_len=32)

  @jax.jit
  def decode(state, tokens, cache):
    return nnx.merge(graphdef, state).decode(tokens, cache)

  prompt_logits, cache = prefill(state, prompt, images, prompt_mask)
  decoded = []
  for i in range(steps.shape[1]):
    logits, cache = decode(state, steps[:, i:i + 1], cache)
    decoded.append(np.asarray(logits[:, 0]))

  for row in range(2):
    n = int(prompt_mask[row].sum())
    full = np.concatenate([prompt[row, :n], steps[row]])[None]
    expected = _forward(model, full, images[row:row + 1])[0]
    np.testing.assert_allclose(np.asarray(prompt_logits)[row, :n], expected[:n], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.stack(decoded)[:, row], expected[n:], atol=1e-5, rtol=0)
  np.testing.assert_array_equal(np.asarray(cache['length']), prompt_mask.sum(1) + steps.shape[1])
  np.testing.assert_array_equal(np.asarray(cache['media']), [2, 2])


def test_item_pool_is_a_matrix_times_the_mean_embedding_of_the_item_tokens_so_far():
  model = _model(pool=True)
  np.testing.assert_array_equal(np.asarray(model.pool_kernel[...]), np.eye(CFG.model.lm.width))  # at the start
  kernel = np.random.default_rng(6).normal(size=model.pool_kernel.shape).astype(np.float32)
  model.pool_kernel[...] = kernel  # as trained
  tokens, _ = _batch(seed=5, length=30)
  valid = np.ones_like(tokens, bool)
  valid[1, 20:] = False
  embedded = np.asarray(model.lm.embed_tokens(tokens), np.float64)
  is_item = ((tokens >= POOL['item_tokens'][0]) & (tokens < POOL['item_tokens'][1]) & valid)[..., None]
  assert 0 < is_item[0].sum() < valid[0].sum()  # some tokens are items, some are not
  expected = np.cumsum(embedded * is_item, 1) / np.maximum(np.cumsum(is_item, 1), 1) @ kernel
  pooled, (sums, counts) = model.pool_items(model.lm.embed_tokens(tokens), tokens, valid)
  np.testing.assert_allclose(np.asarray(pooled), expected, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(counts), is_item.sum((1, 2)))
  assert _model().pool_items(embedded, tokens, valid) == (None, None)  # off


def _graphdef(**model_overrides):
  """The graph of a tiny model with other static settings, to merge with existing weights."""
  cfg = config_lib.base_config()
  cfg.model.update(model_overrides)
  return unimp.abstract_model(cfg.model)[0]


@pytest.mark.parametrize('setting', [{'remat': 'full'}, {'scan_layers': False}])
def test_remat_and_unrolled_layers_change_the_program_not_the_numbers(setting):
  tokens, images = _batch(length=24, image_positions=(3, 12), num_images=2)
  _, state = nnx.split(_model(alpha=0.5))

  def logits_and_grads(**overrides):
    graphdef = _graphdef(**overrides)
    loss = lambda s: jnp.mean(nnx.merge(graphdef, s)(tokens, images) ** 2)
    return jax.jit(lambda s: (nnx.merge(graphdef, s)(tokens, images), jax.grad(loss)(s)))(state)

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), logits_and_grads(**setting),
               logits_and_grads())


def test_bfloat16_compute_keeps_float32_params_and_logits():
  tokens, images = _batch(length=24, image_positions=(3, 12), num_images=2)
  _, state = nnx.split(_model(alpha=0.5))
  logits = _compiled_forward(_graphdef())(state, tokens, images)
  logits_low = _compiled_forward(_graphdef(dtype='bfloat16'))(state, tokens, images)
  assert logits_low.dtype == jnp.float32
  assert np.abs(logits_low - logits).max() < 0.05 * np.abs(logits).max()
  assert np.abs(logits_low - logits).max() > 0  # the low-precision path really ran


def test_dropout_acts_only_in_training_and_draws_its_masks_from_the_key():
  tokens, images = _batch(length=24, image_positions=(3, 12), num_images=2)
  _, state = nnx.split(_model(alpha=0.5))
  cfg = config_lib.base_config()
  cfg.model.lm.dropout = 0.3
  dropping = unimp.abstract_model(cfg.model)[0]
  forward = jax.jit(lambda graphdef, key: nnx.merge(graphdef, state)(tokens, images, dropout_key=key),
                    static_argnums=0)
  plain = np.asarray(forward(_graphdef(), None))
  np.testing.assert_array_equal(np.asarray(forward(dropping, None)), plain)  # inference: no dropout
  np.testing.assert_array_equal(np.asarray(forward(_graphdef(), jax.random.key(1))), plain)  # rate 0
  one = np.asarray(forward(dropping, jax.random.key(1)))
  np.testing.assert_array_equal(np.asarray(forward(dropping, jax.random.key(1))), one)
  assert np.abs(one - plain).max() > 1e-2 and np.abs(np.asarray(forward(dropping, jax.random.key(2))) - one).max() > 1e-2
  # Inverted dropout: a share `rate` of the units zeroed, the rest scaled by 1 / (1 - rate).
  from unimp_jax.model import layers
  out = np.asarray(layers.dropout(jnp.ones(200_000), 0.3, jax.random.key(0)))
  assert set(np.unique(out).tolist()) == {0.0, np.float32(1 / 0.7)}
  assert abs((out == 0).mean() - 0.3) < 0.005
