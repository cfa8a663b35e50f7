"""UniMP: vision tower -> perceiver resampler -> gated cross-attention into a Llama decoder.

Images enter as fixed slots, `images [B, N, H, W, C]`; the text refers to them with `<image>` tokens, the
k-th `<image>` of a row meaning slot k. Which slot a text token may see is the *media mask*:

  previous  a token sees only the most recent `<image>` at or before it ("fine-grained fusion": an item's
            text sees only its own picture; items interact through self-attention)
  all       a token sees every image at or before it

A token before any `<image>` sees nothing and its cross-attention output is exactly zero. Slots beyond
the number of `<image>` tokens are never seen, so padding slots need no mask of their own.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from unimp_jax.model import layers
from unimp_jax.model.connector import PerceiverResampler
from unimp_jax.model.items import ItemEncoder
from unimp_jax.model.lm import LanguageModel
from unimp_jax.model.vision import VisionEncoder
from unimp_jax.sharding import mesh as mesh_lib


def media_index(tokens_bt: jax.Array, image_token_id: int, last_bt: jax.Array | None = None) -> jax.Array:
  """Index of the most recent `<image>` at or before each token (-1: none); `last` continues a prefix."""
  count = jnp.cumsum(tokens_bt == image_token_id, axis=1, dtype=jnp.int32) - 1
  return count if last_bt is None else count + 1 + last_bt[:, None]


def cross_attention_mask(media_bt: jax.Array, num_images: int, num_latents: int, mode: str) -> jax.Array:
  """[B, T, num_images * num_latents] bool: which image latents each token may attend to."""
  slot_n = jnp.arange(num_images)
  if mode == 'previous':
    mask_btn = media_bt[..., None] == slot_n
  else:
    mask_btn = slot_n <= media_bt[..., None]
  return jnp.repeat(mask_btn, num_latents, axis=-1)


def positions(valid_bt: jax.Array) -> jax.Array:
  """Rotary positions that count real tokens only (padding repeats its neighbour's position)."""
  return jnp.maximum(jnp.cumsum(valid_bt, axis=1) - 1, 0)


class UniMP(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, remat=cfg.remat, unroll=not cfg.scan_layers,
              attention=cfg.attention, rngs=rngs)
    self.vision = VisionEncoder(cfg.vision, **kw)
    self.connector = PerceiverResampler(cfg.connector, cfg.vision.width, **kw)
    self.lm = LanguageModel(cfg.lm, cfg.vision.width, **kw)
    self.image_token_id, self.media_mask = int(cfg.image_token_id), cfg.lm.media_mask
    self.num_latents = cfg.connector.num_latents
    self.item_tokens = tuple(int(i) for i in cfg.item_tokens)
    # The pooled user tower's matrix (`model.item_pool`), the identity at the start; None: no pool.
    eye = lambda key, shape, dtype: jnp.eye(shape[-1], dtype=dtype)
    self.pool_kernel = (layers.param(rngs, eye, (cfg.lm.width, cfg.lm.width), ('embed', 'mlp'), param_dtype)
                        if cfg.item_pool else None)
    # Content rows for item tokens (unimp_jax.model.items); None: the item rows are learned.
    id_rows = cfg.lm.added_vocab_size if cfg.item_embeddings == 'content+id' else 0
    self.items = (ItemEncoder(cfg.lm.width, cfg.vision.width, id_rows=id_rows, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs)
                  if cfg.item_embeddings != 'learned' else None)

  def encode_images(self, images_bnhwc: jax.Array) -> jax.Array:
    """images [B, N, H, W, C] -> latents [B, N * num_latents, vision width]."""
    b, n = images_bnhwc.shape[:2]
    tokens, _ = self.vision(images_bnhwc.reshape(b * n, *images_bnhwc.shape[2:]))
    return self.connector(tokens).reshape(b, n * self.num_latents, -1)

  def __call__(self, tokens_bt: jax.Array, images_bnhwc: jax.Array | None = None,
               attention_mask_bt: jax.Array | None = None, dropout_key: jax.Array | None = None) -> jax.Array:
    """Full forward pass -> float32 logits [B, T, vocab + added vocab].

    `attention_mask_bt` marks real tokens (False: padding); positions count real tokens only, so left
    and right padding give the same logits at real tokens. Without images the cross-attention blocks are
    skipped: the result is the text-only LM. `dropout_key` (training) turns on `model.lm.dropout`.
    """
    return self.lm.logits(self.hidden(tokens_bt, images_bnhwc, attention_mask_bt, dropout_key))

  def hidden(self, tokens_bt: jax.Array, images_bnhwc: jax.Array | None = None,
             attention_mask_bt: jax.Array | None = None, dropout_key: jax.Array | None = None) -> jax.Array:
    """What `lm.logits` turns into the logits [B, T, width]: the forward pass without its output head, for
    a loss that applies the head a chunk of positions at a time (unimp_jax.train.loss)."""
    b, t = tokens_bt.shape
    valid_bt = jnp.ones((b, t), bool) if attention_mask_bt is None else attention_mask_bt.astype(bool)
    positions_bt = positions(valid_bt)
    mask_bts = jnp.tril(jnp.ones((t, t), bool))[None] & valid_bt[:, None, :]
    latents, cross_mask = None, None
    if images_bnhwc is not None:
      latents = self.encode_images(images_bnhwc)
      media = media_index(tokens_bt, self.image_token_id)
      cross_mask = cross_attention_mask(media, images_bnhwc.shape[1], self.num_latents, self.media_mask)
    x = self.lm.embed_tokens(tokens_bt)
    pooled, _ = self.pool_items(x, tokens_bt, valid_bt)
    x, _, _ = self.lm(x, positions_bt=positions_bt, mask_bts=mask_bts,
                      latents_bmd=latents, cross_mask_btm=cross_mask, dropout_key=dropout_key)
    return x if pooled is None else x + pooled

  def pool_items(self, embedded_btd, tokens_bt, valid_bt, state=None):
    """The pooled user tower (`model.item_pool`): at every position, W times the mean embedding of the real
    item tokens at or before it (zero before the first), in the LM's dtype. `state` = (sums [B, D], counts
    [B]) carries those of earlier calls (the KV cache's). Returns (pooled or None without the tower, new
    state)."""
    if self.pool_kernel is None:
      return None, None
    first, end = self.item_tokens
    is_item = ((tokens_bt >= first) & (tokens_bt < end) & valid_bt)[..., None].astype(jnp.float32)
    sums, counts = jnp.cumsum(embedded_btd.astype(jnp.float32) * is_item, 1), jnp.cumsum(is_item, 1)
    if state is not None:
      sums, counts = sums + state[0][:, None], counts + state[1][:, None, None]
    mean = (sums / jnp.maximum(counts, 1.0)).astype(embedded_btd.dtype)
    pooled = jnp.einsum('btd,de->bte', mean, self.pool_kernel[...].astype(embedded_btd.dtype))
    return pooled, (sums[:, -1], counts[:, -1, 0])

  # ------------------------------------------------------------------------------------------------
  # Incremental decoding. The cache is a plain dict of arrays (a pytree), threaded functionally:
  #   k, v        [groups, layers per group, B, max_len, kv heads, head dim]  self-attention keys/values
  #   cross_kv    ([groups, B, N * latents, heads, head dim],) * 2  image keys/values, once per prompt
  #   valid       [B, max_len] which cache slots hold real tokens
  #   index       next slot to write (shared by the batch)
  #   length      [B] real tokens so far (the next token's rotary position)
  #   media       [B] index of the most recent `<image>` so far (-1: none)
  #   pool        ([B, D], [B]) sum and count of the item embeddings so far (`model.item_pool` only)
  # A prompt's padding (attention_mask False) occupies cache slots that stay invalid, so rows of
  # different prompt lengths decode together.
  # ------------------------------------------------------------------------------------------------

  def prefill(self, tokens_bt, images_bnhwc=None, attention_mask_bt=None, *, max_len: int):
    """Runs the prompt, returns (logits [B, T, V], cache with room for `max_len` tokens in all)."""
    b, t = tokens_bt.shape
    groups, per_group, kv_heads, head_dim = self.lm.cache_dims
    zeros = jnp.zeros((groups, per_group, b, max_len, kv_heads, head_dim), self.lm.dtype)
    valid = jnp.ones((b, t), bool) if attention_mask_bt is None else attention_mask_bt.astype(bool)
    cache = dict(k=zeros, v=zeros, valid=jnp.zeros((b, max_len), bool), index=jnp.zeros((), jnp.int32),
                 length=jnp.zeros((b,), jnp.int32), media=jnp.full((b,), -1, jnp.int32))
    if self.pool_kernel is not None:
      cache['pool'] = (jnp.zeros((b, self.pool_kernel.shape[0]), jnp.float32), jnp.zeros((b,), jnp.float32))
    latents = None if images_bnhwc is None else self.encode_images(images_bnhwc)
    return self._step(tokens_bt, valid, cache, latents)

  def decode(self, tokens_bt, cache):
    """Appends `tokens_bt` (usually one per row) to the cache; returns (logits, new cache)."""
    return self._step(tokens_bt, jnp.ones(tokens_bt.shape, bool), cache, None)

  def _step(self, tokens_bt, valid_bt, cache, latents_bmd):
    b, t = tokens_bt.shape
    index = cache['index']
    positions_bt = cache['length'][:, None] + positions(valid_bt)
    cache_valid = jax.lax.dynamic_update_slice(cache['valid'], valid_bt, (0, index))
    slots = jnp.arange(cache_valid.shape[1])
    mask_bts = (slots[None, None, :] <= index + jnp.arange(t)[None, :, None]) & cache_valid[:, None, :]
    media_bt = media_index(jnp.where(valid_bt, tokens_bt, -1), self.image_token_id, cache['media'])
    cross_mask = None
    image_source = latents_bmd if latents_bmd is not None else cache.get('cross_kv', (None,))[0]
    if image_source is not None:  # latents [B, M, D] or cross keys [G, B, M, H, hd]: M = images * latents
      num_images = image_source.shape[-3 if image_source.ndim == 5 else 1] // self.num_latents
      cross_mask = cross_attention_mask(media_bt, num_images, self.num_latents, self.media_mask)
    x = self.lm.embed_tokens(tokens_bt)
    pooled, pool = self.pool_items(x, tokens_bt, valid_bt, cache.get('pool'))
    x, new_kv, new_cross = self.lm(
        x, positions_bt=positions_bt, mask_bts=mask_bts,
        latents_bmd=latents_bmd, cross_kv=cache.get('cross_kv'), cross_mask_btm=cross_mask,
        cache_kv=(cache['k'], cache['v']), cache_index=index)
    new_cache = dict(cache, k=new_kv[0], v=new_kv[1], valid=cache_valid, index=index + t,
                     length=cache['length'] + valid_bt.sum(1, dtype=jnp.int32),
                     media=media_bt[:, -1])
    if new_cross is not None:
      new_cache['cross_kv'] = new_cross
    if pool is not None:
      new_cache['pool'] = pool
    return self.lm.logits(x if pooled is None else x + pooled), new_cache


# --------------------------------------------------------------------------------------------------
# Creation: abstract shapes -> shardings -> jitted init, so no host ever holds the whole model.
# --------------------------------------------------------------------------------------------------

def abstract_model(model_cfg, seed: int = 0):
  """(graphdef, abstract state) of the model: shapes and dtypes only, nothing allocated."""
  return nnx.split(nnx.eval_shape(lambda: UniMP(model_cfg, rngs=nnx.Rngs(seed))))


def create_sharded(model_cfg, mesh, rules, seed: int = 0) -> UniMP:
  """Initialises every parameter directly in its shard on `mesh`."""
  graphdef, abstract_state = abstract_model(model_cfg, seed)
  shardings = mesh_lib.state_shardings(abstract_state, mesh, rules)

  @functools.partial(jax.jit, out_shardings=shardings)
  def init():
    return nnx.state(UniMP(model_cfg, rngs=nnx.Rngs(seed)))

  with mesh_lib.use_mesh(mesh, rules):
    return nnx.merge(graphdef, init())


def jit_forward(graphdef):
  """`forward(state, tokens, images, attention_mask) -> logits`, compiled once per input shape."""

  @jax.jit
  def forward(state, tokens_bt, images_bnhwc=None, attention_mask_bt=None):
    return nnx.merge(graphdef, state)(tokens_bt, images_bnhwc, attention_mask_bt)

  return forward

