"""CLIP-style ViT vision tower (the structure of HF `CLIPVisionModel` and IDEFICS' vision tower)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from unimp_jax.model import layers
from unimp_jax.sharding.mesh import constrain

# CLIP's pixel statistics (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD), used by CLIP and IDEFICS.
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(images_uint8: jax.Array, dtype=jnp.float32) -> jax.Array:
  """uint8 pixels (as stored in the dataset) -> the normalised floats the tower expects; runs on device."""
  x = images_uint8.astype(jnp.float32) / 255.0
  return ((x - jnp.asarray(PIXEL_MEAN)) / jnp.asarray(PIXEL_STD)).astype(dtype)


class VisionLayer(nnx.Module):
  """Pre-LN transformer block: x + attn(ln1(x)); x + mlp(ln2(x))."""

  def __init__(self, cfg, *, dtype, param_dtype, stack, attention: str, rngs: nnx.Rngs):
    d, f = cfg.width, cfg.mlp_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, stack=stack, rngs=rngs)
    self.num_heads, self.act, self.attention = cfg.num_heads, cfg.act, attention
    self.norm1 = layers.LayerNorm(d, eps=cfg.norm_eps, **kw)
    self.q = layers.Dense(d, d, ('embed', 'heads'), use_bias=True, **kw)
    self.k = layers.Dense(d, d, ('embed', 'heads'), use_bias=True, **kw)
    self.v = layers.Dense(d, d, ('embed', 'heads'), use_bias=True, **kw)
    self.o = layers.Dense(d, d, ('heads', 'embed'), use_bias=True, **kw)
    self.norm2 = layers.LayerNorm(d, eps=cfg.norm_eps, **kw)
    self.fc1 = layers.Dense(d, f, ('embed', 'mlp'), use_bias=True, **kw)
    self.fc2 = layers.Dense(f, d, ('mlp', 'embed'), use_bias=True, **kw)

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    b, t, d = x_btd.shape
    h = self.norm1(x_btd)
    q, k, v = (proj(h).reshape(b, t, self.num_heads, -1) for proj in (self.q, self.k, self.v))
    x_btd = x_btd + self.o(layers.attention(q, k, v, implementation=self.attention).reshape(b, t, d))
    h = self.fc2(layers.ACTIVATIONS[self.act](self.fc1(self.norm2(x_btd))))
    return constrain(x_btd + h, ('act_batch', 'act_seq', 'act_embed'))


class VisionEncoder(nnx.Module):
  """Patchify -> [class; patches] + positions -> pre-LN -> blocks.

  Returns the last hidden state *without* the post-layernorm, which CLIP applies to the pooled class
  token only; Flamingo and IDEFICS feed that unnormalised last hidden state to the resampler.
  """

  def __init__(self, cfg, *, dtype, param_dtype, remat: str, unroll: bool = False, attention: str = 'xla',
               rngs: nnx.Rngs):
    d, p, c = cfg.width, cfg.patch_size, cfg.channels
    num_patches = (cfg.image_size // p) ** 2
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.patch_size, self.dtype, self.remat, self.unroll = p, dtype, remat, unroll
    self.patch_embed = layers.Dense(p * p * c, d, (None, 'embed'), **kw)
    self.class_embed = layers.param(rngs, layers.normal(1.0), (d,), ('embed',), param_dtype)
    self.pos_embed = layers.param(rngs, layers.normal(0.02), (num_patches + 1, d), (None, 'embed'), param_dtype)
    self.pre_norm = layers.LayerNorm(d, eps=cfg.norm_eps, **kw)
    self.blocks = VisionLayer(cfg, stack=(cfg.depth,), attention=attention, **kw)
    self.post_norm = layers.LayerNorm(d, eps=cfg.norm_eps, **kw)

  def __call__(self, images_bhwc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images [B, H, W, C] -> (tokens [B, 1 + patches, D], pooled [B, D]). Pictures are uint8 pixels as the
    dataset stores them (a quarter of float32's bytes to move to the devices), normalised here; floats are
    taken as already normalised (a Hugging Face processor's `pixel_values`)."""
    if jnp.issubdtype(images_bhwc.dtype, jnp.integer):
      images_bhwc = normalize(images_bhwc, self.dtype)
    b, height, width, c = images_bhwc.shape
    p = self.patch_size
    patches = images_bhwc.reshape(b, height // p, p, width // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = self.patch_embed(patches.reshape(b, -1, p * p * c))
    cls = jnp.broadcast_to(self.class_embed[...].astype(self.dtype), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(self.dtype)
    x = self.pre_norm(x)
    x, _ = layers.scan(self.blocks, lambda blk, h, _: (blk(h), None), x, remat=self.remat, unroll=self.unroll)
    return x, self.post_norm(x[:, 0])
