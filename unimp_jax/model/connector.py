"""Perceiver resampler: every image becomes exactly `num_latents` tokens, whatever its patch count."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from unimp_jax.model import layers
from unimp_jax.sharding.mesh import constrain


class PerceiverBlock(nnx.Module):
  """Latents attend over [image tokens; latents] (Flamingo), then a ReLU MLP; both residual."""

  def __init__(self, cfg, width: int, *, dtype, param_dtype, stack, attention: str, rngs: nnx.Rngs):
    inner, hidden = cfg.num_heads * cfg.head_dim, cfg.mlp_ratio * width
    kw = dict(dtype=dtype, param_dtype=param_dtype, stack=stack, rngs=rngs)
    self.num_heads, self.attention = cfg.num_heads, attention
    self.context_norm = layers.LayerNorm(width, eps=cfg.norm_eps, **kw)
    self.latents_norm = layers.LayerNorm(width, eps=cfg.norm_eps, **kw)
    self.q = layers.Dense(width, inner, ('embed', 'heads'), **kw)
    self.k = layers.Dense(width, inner, ('embed', 'heads'), **kw)
    self.v = layers.Dense(width, inner, ('embed', 'heads'), **kw)
    self.o = layers.Dense(inner, width, ('heads', 'embed'), **kw)
    # Optional q/k layernorms (IDEFICS `qk_layer_norms_perceiver`) stabilise attention logits.
    self.q_norm = layers.LayerNorm(cfg.head_dim, eps=cfg.norm_eps, **kw) if cfg.qk_norm else None
    self.k_norm = layers.LayerNorm(cfg.head_dim, eps=cfg.norm_eps, **kw) if cfg.qk_norm else None
    self.mlp_norm = layers.LayerNorm(width, eps=cfg.norm_eps, **kw)
    self.fc = layers.Dense(width, hidden, ('embed', 'mlp'), **kw)
    self.proj = layers.Dense(hidden, width, ('mlp', 'embed'), **kw)

  def __call__(self, context_bpd: jax.Array, latents_bld: jax.Array) -> jax.Array:
    b, num_latents, _ = latents_bld.shape
    ctx, lat = self.context_norm(context_bpd), self.latents_norm(latents_bld)
    both = jnp.concatenate([ctx, lat], axis=1)
    q = self.q(lat).reshape(b, num_latents, self.num_heads, -1)
    k = self.k(both).reshape(b, both.shape[1], self.num_heads, -1)
    v = self.v(both).reshape(b, both.shape[1], self.num_heads, -1)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    out = layers.attention(q, k, v, implementation=self.attention)
    latents_bld = latents_bld + self.o(out.reshape(b, num_latents, -1))
    latents_bld = latents_bld + self.proj(jax.nn.relu(self.fc(self.mlp_norm(latents_bld))))
    return constrain(latents_bld, ('act_batch', 'act_seq', 'act_embed'))


class PerceiverResampler(nnx.Module):

  def __init__(self, cfg, width: int, *, dtype, param_dtype, remat: str, unroll: bool = False, attention: str = 'xla',
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype, self.remat, self.unroll = dtype, remat, unroll
    self.latents = layers.param(rngs, layers.normal(1.0), (cfg.num_latents, width), (None, 'embed'), param_dtype)
    self.blocks = PerceiverBlock(cfg, width, stack=(cfg.depth,), attention=attention, **kw)
    self.norm = layers.LayerNorm(width, eps=cfg.norm_eps, **kw)

  def __call__(self, context_bpd: jax.Array) -> jax.Array:
    """context [B, P, D] -> latents [B, num_latents, D]."""
    latents = jnp.broadcast_to(self.latents[...].astype(self.dtype), (context_bpd.shape[0], *self.latents.shape))
    latents, _ = layers.scan(self.blocks, lambda blk, lat, _: (blk(context_bpd, lat), None), latents,
                             remat=self.remat, unroll=self.unroll)
    return self.norm(latents)
