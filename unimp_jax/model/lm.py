"""Llama-family decoder with Flamingo-style tanh-gated cross-attention to image latents.

Layout (as in HF `IdeficsModel`): the decoder is cut into groups of `cross_attn_every` layers; each group
is one gated cross-attention block followed by its decoder layers. Groups are stacked and scanned, and so
are the layers inside a group, so compile time does not grow with depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from unimp_jax.model import layers
from unimp_jax.sharding.mesh import constrain

ACT_BTD = ('act_batch', 'act_seq', 'act_embed')


class SwiGLU(nnx.Module):

  def __init__(self, width: int, hidden: int, **kw):
    self.gate = layers.Dense(width, hidden, ('embed', 'mlp'), **kw)
    self.up = layers.Dense(width, hidden, ('embed', 'mlp'), **kw)
    self.down = layers.Dense(hidden, width, ('mlp', 'embed'), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.silu(self.gate(x)) * self.up(x)
    return self.down(constrain(h, ('act_batch', 'act_seq', 'act_mlp')))


class DecoderLayer(nnx.Module):
  """Pre-RMSNorm self-attention (RoPE, grouped-query; q/k/v biases for Qwen2) and SwiGLU MLP."""

  def __init__(self, cfg, *, dtype, param_dtype, stack, attention: str, rngs: nnx.Rngs):
    d, hd = cfg.width, cfg.width // cfg.num_heads
    kw = dict(dtype=dtype, param_dtype=param_dtype, stack=stack, rngs=rngs)
    self.num_heads, self.num_kv_heads, self.dropout = cfg.num_heads, cfg.num_kv_heads, cfg.dropout
    self.attention = attention
    self.attn_norm = layers.RMSNorm(d, eps=cfg.norm_eps, **kw)
    bias = cfg.qkv_bias
    self.q = layers.Dense(d, cfg.num_heads * hd, ('embed', 'heads'), use_bias=bias, **kw)
    self.k = layers.Dense(d, cfg.num_kv_heads * hd, ('embed', 'kv_heads'), use_bias=bias, **kw)
    self.v = layers.Dense(d, cfg.num_kv_heads * hd, ('embed', 'kv_heads'), use_bias=bias, **kw)
    self.o = layers.Dense(cfg.num_heads * hd, d, ('heads', 'embed'), **kw)
    self.mlp_norm = layers.RMSNorm(d, eps=cfg.norm_eps, **kw)
    self.mlp = SwiGLU(d, cfg.mlp_dim, **kw)

  def __call__(self, x_btd, *, rope_tables, mask_bts, cache_kv=None, cache_index=None, dropout_key=None):
    """With `cache_kv` ([B, T, K, hd] pair), writes this chunk's keys/values at `cache_index` and attends
    over the whole cache; returns the updated pair (or None without a cache). `dropout_key`: training."""
    keys = layers.split_keys(dropout_key, 2)
    b, t, _ = x_btd.shape
    h = self.attn_norm(x_btd)
    q = layers.rope(self.q(h).reshape(b, t, self.num_heads, -1), rope_tables)
    k = layers.rope(self.k(h).reshape(b, t, self.num_kv_heads, -1), rope_tables)
    v = self.v(h).reshape(b, t, self.num_kv_heads, -1)
    if cache_kv is not None:
      k = jax.lax.dynamic_update_slice(cache_kv[0], k.astype(cache_kv[0].dtype), (0, cache_index, 0, 0))
      v = jax.lax.dynamic_update_slice(cache_kv[1], v.astype(cache_kv[1].dtype), (0, cache_index, 0, 0))
    out = layers.attention(constrain(q, ('act_batch', 'act_seq', 'act_heads', None)), k, v, mask_bts, self.attention)
    x_btd = x_btd + layers.dropout(self.o(out.reshape(b, t, -1)), self.dropout, keys[0])
    x_btd = x_btd + layers.dropout(self.mlp(self.mlp_norm(x_btd)), self.dropout, keys[1])
    return constrain(x_btd, ACT_BTD), (None if cache_kv is None else (k, v))


class GatedCrossAttention(nnx.Module):
  """x + tanh(alpha_attn) * xattn(x, latents); x + tanh(alpha_mlp) * mlp(x).

  Both alphas start at `alpha_init`: 0 (Flamingo, IDEFICS) keeps a pretrained LM exactly as it was; a
  model trained from scratch needs the gates open, or the image path gets almost no gradient and the
  gates stay near 0 (docs/BENCHMARKS.md). The attention output of a token
  that may see no image (`gate` = 0: no `<image>` before it) is zeroed, as in IDEFICS; the MLP branch is
  not gated by images.
  """

  def __init__(self, cfg, vision_width: int, *, dtype, param_dtype, stack, attention: str, rngs: nnx.Rngs):
    d, hd = cfg.width, cfg.width // cfg.num_heads
    kw = dict(dtype=dtype, param_dtype=param_dtype, stack=stack, rngs=rngs)
    self.num_heads, self.dtype, self.dropout, self.attention = cfg.num_heads, dtype, cfg.dropout, attention
    self.attn_norm = layers.RMSNorm(d, eps=cfg.norm_eps, **kw)
    self.q = layers.Dense(d, cfg.num_heads * hd, ('embed', 'heads'), **kw)
    self.k = layers.Dense(vision_width, cfg.num_heads * hd, ('embed', 'heads'), **kw)
    self.v = layers.Dense(vision_width, cfg.num_heads * hd, ('embed', 'heads'), **kw)
    self.o = layers.Dense(cfg.num_heads * hd, d, ('heads', 'embed'), **kw)
    self.q_norm = layers.RMSNorm(hd, eps=cfg.norm_eps, **kw) if cfg.qk_norm else None
    self.k_norm = layers.RMSNorm(hd, eps=cfg.norm_eps, **kw) if cfg.qk_norm else None
    alpha_shape = (d,) if cfg.alpha_type == 'vector' else (1,)
    init = jax.nn.initializers.constant(cfg.alpha_init)
    self.alpha_attn = layers.param(rngs, init, alpha_shape, (None,), param_dtype, stack)
    self.mlp_norm = layers.RMSNorm(d, eps=cfg.norm_eps, **kw)
    self.mlp = SwiGLU(d, cfg.mlp_dim, **kw)
    self.alpha_mlp = layers.param(rngs, init, alpha_shape, (None,), param_dtype, stack)

  def project_kv(self, latents_bmd: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Image keys/values, computed once per prompt and reused by every decoding step."""
    b, m, _ = latents_bmd.shape
    k = self.k(latents_bmd).reshape(b, m, self.num_heads, -1)
    v = self.v(latents_bmd).reshape(b, m, self.num_heads, -1)
    return (k if self.k_norm is None else self.k_norm(k)), v

  def __call__(self, x_btd, k_bmhd, v_bmhd, mask_btm, gate_bt, dropout_key=None):
    b, t, _ = x_btd.shape
    keys = layers.split_keys(dropout_key, 2)
    q = self.q(self.attn_norm(x_btd)).reshape(b, t, self.num_heads, -1)
    if self.q_norm is not None:
      q = self.q_norm(q)
    out = self.o(layers.attention(q, k_bmhd, v_bmhd, mask_btm, self.attention).reshape(b, t, -1))
    out = layers.dropout(out * gate_bt[..., None].astype(out.dtype), self.dropout, keys[0])
    x_btd = x_btd + jnp.tanh(self.alpha_attn[...].astype(self.dtype)) * out
    mlp = layers.dropout(self.mlp(self.mlp_norm(x_btd)), self.dropout, keys[1])
    return x_btd + jnp.tanh(self.alpha_mlp[...].astype(self.dtype)) * mlp


class DecoderGroup(nnx.Module):
  """One gated cross-attention block followed by `cross_attn_every` decoder layers."""

  def __init__(self, cfg, vision_width: int, *, stack, **kw):
    self.cross = GatedCrossAttention(cfg, vision_width, stack=stack, **kw)
    self.layers = DecoderLayer(cfg, stack=(*stack, cfg.cross_attn_every), **kw)


class LanguageModel(nnx.Module):
  """Token embedding (base rows + added rows) -> groups -> RMSNorm -> head (base + added columns).

  Added-vocabulary rows (`<image>`, ratings, slots, item and image-code tokens) live in their own
  arrays, `added_embed` and `added_head`, so an optimizer mask can train them while the base rows stay
  frozen; this is the layout of IDEFICS' decoupled embedding and head.
  """

  def __init__(self, cfg, vision_width: int, *, dtype, param_dtype, remat: str, unroll: bool = False,
               attention: str = 'xla', rngs: nnx.Rngs):
    d, v, a = cfg.width, cfg.vocab_size, cfg.added_vocab_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.vocab_size, self.dtype, self.remat, self.unroll, self.dropout = v, dtype, remat, unroll, cfg.dropout
    self.rope = (d // cfg.num_heads, cfg.rope_theta, layers.RopeScaling(**cfg.rope_scaling))
    num_groups = cfg.num_layers // cfg.cross_attn_every
    self.cache_dims = (num_groups, cfg.cross_attn_every, cfg.num_kv_heads, d // cfg.num_heads)
    self.embed = layers.param(rngs, layers.normal(0.02), (v, d), ('vocab', 'embed'), param_dtype)
    self.added_embed = layers.param(rngs, layers.normal(0.02), (a, d), (None, 'embed'), param_dtype)
    self.groups = DecoderGroup(cfg, vision_width, stack=(num_groups,), attention=attention, **kw)
    self.norm = layers.RMSNorm(d, eps=cfg.norm_eps, **kw)
    self.tie_embeddings = cfg.tie_embeddings
    if not cfg.tie_embeddings:
      self.head = layers.param(rngs, layers.normal(0.02), (d, v), ('embed', 'vocab'), param_dtype)
      self.added_head = layers.param(rngs, layers.normal(0.02), (d, a), ('embed', None), param_dtype)

  def embed_tokens(self, tokens_bt: jax.Array) -> jax.Array:
    is_added = tokens_bt >= self.vocab_size
    # Gather whole rows: un-shard the width (fsdp) first, as for any fsdp weight at its use.
    table, added_table = constrain(self.embed[...], ('vocab', None)), constrain(self.added_embed[...], (None, None))
    base = jnp.take(table, jnp.where(is_added, 0, tokens_bt), axis=0)
    added = jnp.take(added_table, jnp.where(is_added, tokens_bt - self.vocab_size, 0), axis=0)
    return constrain(jnp.where(is_added[..., None], added, base).astype(self.dtype), ACT_BTD)

  def logits(self, x_btd: jax.Array) -> jax.Array:
    """float32 logits over [base vocabulary; added vocabulary]."""
    if self.tie_embeddings:
      head, added = self.embed[...].T, self.added_embed[...].T
    else:
      head, added = self.head[...], self.added_head[...]
    x = self.norm(x_btd)
    f32 = jnp.float32
    out = jnp.concatenate([
        jnp.einsum('btd,dv->btv', x, head.astype(self.dtype), preferred_element_type=f32),
        jnp.einsum('btd,dv->btv', x, added.astype(self.dtype), preferred_element_type=f32)], axis=-1)
    return constrain(out, ('act_batch', 'act_seq', 'act_vocab'))

  def __call__(self, x_btd, *, positions_bt, mask_bts, latents_bmd=None, cross_kv=None, cross_mask_btm=None,
               cache_kv=None, cache_index=None, dropout_key=None):
    """Runs every group. Image input is either `latents_bmd` (keys/values projected here) or `cross_kv`
    (projected earlier, [G, B, M, H, hd] pair); with neither, the cross-attention blocks are skipped and
    this is the plain text LM. `dropout_key` (training only) turns on `dropout`. Returns (hidden,
    self-attention caches, cross keys/values)."""
    embed_key, groups_key = layers.split_keys(dropout_key, 2)
    x_btd = layers.dropout(x_btd, self.dropout, embed_key)
    num_groups, per_group = self.cache_dims[:2]
    use_images = latents_bmd is not None or cross_kv is not None
    gate_bt = cross_mask_btm.any(-1) if use_images else None
    collect_cross = cache_kv is not None and cross_kv is None and use_images
    rope_tables = layers.rope_tables(positions_bt, layers.rope_frequencies(*self.rope))

    def group_step(group, x, xs):
      self_kv, group_cross_kv, group_key = xs
      cross_key, layers_key = layers.split_keys(group_key, 2)
      new_cross = None
      if use_images:
        k, v = group_cross_kv if group_cross_kv is not None else group.cross.project_kv(latents_bmd)
        x = group.cross(x, k, v, cross_mask_btm, gate_bt, cross_key)
        new_cross = (k, v) if collect_cross else None

      def layer_step(layer, x, xs):
        kv, key = xs
        return layer(x, rope_tables=rope_tables, mask_bts=mask_bts, cache_kv=kv, cache_index=cache_index,
                     dropout_key=key)

      layer_keys = None if layers_key is None else jax.random.split(layers_key, per_group)
      x, new_self_kv = layers.scan(group.layers, layer_step, x, (self_kv, layer_keys), unroll=self.unroll)
      return x, (new_self_kv, new_cross)

    group_keys = None if groups_key is None else jax.random.split(groups_key, num_groups)
    x_btd, (new_cache_kv, new_cross_kv) = layers.scan(
        self.groups, group_step, x_btd, (cache_kv, cross_kv, group_keys), remat=self.remat,
        unroll=self.unroll)
    return x_btd, new_cache_kv, new_cross_kv
