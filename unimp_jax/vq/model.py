"""A VQGAN-style image tokenizer in Flax NNX: a convolutional encoder, a codebook, a convolutional decoder.

    codes = tokenizer.encode(images)      # uint8 [B, H, W, 3] -> int32 [B, H/f, W/f], each in [0, K)
    images = tokenizer.decode(codes)      # -> float32 [B, H, W, 3] in [0, 1]

The encoder downsamples by f = `downsample` (stride-2 convolutions between residual blocks) to a grid of
`code_dim`-vectors; each is replaced by its nearest codebook row (squared L2), with the straight-through
gradient; the decoder mirrors the encoder (nearest-neighbour upsampling and convolutions). The objective
(`losses`) is reconstruction MSE plus the VQ-VAE codebook and commitment terms,
||sg(z) - e||^2 + beta ||z - sg(e)||^2. The adversarial and perceptual terms of VQGAN are left out: at
32 px the pictures are flat colour over a shape, which MSE reconstructs. Codebook usage is kept high by
dead-code restarts in the train step (unimp_jax.vq.train): a code unused for a while is moved onto an
encoder output of the current batch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def _channels(cfg, level: int) -> int:
  return cfg.channels * min(2 ** level, 4)


class ResBlock(nnx.Module):
  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    groups = math.gcd(8, channels)
    self.norm1 = nnx.GroupNorm(channels, num_groups=groups, rngs=rngs)
    self.conv1 = nnx.Conv(channels, channels, (3, 3), rngs=rngs)
    self.norm2 = nnx.GroupNorm(channels, num_groups=groups, rngs=rngs)
    self.conv2 = nnx.Conv(channels, channels, (3, 3), rngs=rngs)

  def __call__(self, x):
    h = self.conv1(nnx.swish(self.norm1(x)))
    return x + self.conv2(nnx.swish(self.norm2(h)))


class Encoder(nnx.Module):
  def __init__(self, cfg, *, rngs: nnx.Rngs):
    levels = int(math.log2(cfg.downsample))
    self.stem = nnx.Conv(3, _channels(cfg, 0), (3, 3), rngs=rngs)
    self.blocks = nnx.List([ResBlock(_channels(cfg, i), rngs=rngs) for i in range(levels)])
    self.downs = nnx.List([nnx.Conv(_channels(cfg, i), _channels(cfg, i + 1), (4, 4), strides=(2, 2), rngs=rngs)
                           for i in range(levels)])
    self.mid = ResBlock(_channels(cfg, levels), rngs=rngs)
    self.norm = nnx.GroupNorm(_channels(cfg, levels), num_groups=math.gcd(8, _channels(cfg, levels)), rngs=rngs)
    self.out = nnx.Conv(_channels(cfg, levels), cfg.code_dim, (1, 1), rngs=rngs)

  def __call__(self, x):
    x = self.stem(x)
    for block, down in zip(self.blocks, self.downs):
      x = down(block(x))
    return self.out(nnx.swish(self.norm(self.mid(x))))


class Decoder(nnx.Module):
  def __init__(self, cfg, *, rngs: nnx.Rngs):
    levels = int(math.log2(cfg.downsample))
    self.stem = nnx.Conv(cfg.code_dim, _channels(cfg, levels), (3, 3), rngs=rngs)
    self.mid = ResBlock(_channels(cfg, levels), rngs=rngs)
    self.ups = nnx.List([nnx.Conv(_channels(cfg, i + 1), _channels(cfg, i), (3, 3), rngs=rngs)
                         for i in reversed(range(levels))])
    self.blocks = nnx.List([ResBlock(_channels(cfg, i), rngs=rngs) for i in reversed(range(levels))])
    self.norm = nnx.GroupNorm(_channels(cfg, 0), num_groups=math.gcd(8, _channels(cfg, 0)), rngs=rngs)
    self.out = nnx.Conv(_channels(cfg, 0), 3, (3, 3), rngs=rngs)

  def __call__(self, z):
    x = self.mid(self.stem(z))
    for up, block in zip(self.ups, self.blocks):
      b, h, w, c = x.shape
      x = block(up(jax.image.resize(x, (b, 2 * h, 2 * w, c), 'nearest')))
    return self.out(nnx.swish(self.norm(x)))


class Tokenizer(nnx.Module):
  """Encoder, codebook [K, code_dim] and decoder. Pictures are uint8 in, [0, 1] floats out; inside, [-1, 1]."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    if cfg.downsample < 2 or cfg.downsample & (cfg.downsample - 1):
      raise ValueError(f'config.model.downsample={cfg.downsample}: must be a power of 2, at least 2')
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)
    self.codebook = nnx.Param(jax.random.normal(rngs.params(), (cfg.codebook_size, cfg.code_dim)))

  def embed(self, images_u8: jax.Array) -> jax.Array:
    """Encoder outputs z [B, h, w, code_dim] before quantisation."""
    return self.encoder(images_u8.astype(jnp.float32) / 127.5 - 1.0)

  def nearest(self, z: jax.Array) -> jax.Array:
    """The index of the nearest codebook row (squared L2) of every vector of z [..., code_dim]."""
    book = self.codebook[...]
    distance = (z * z).sum(-1, keepdims=True) - 2 * z @ book.T + (book * book).sum(-1)
    return jnp.argmin(distance, axis=-1).astype(jnp.int32)

  def encode(self, images_u8: jax.Array) -> jax.Array:
    return self.nearest(self.embed(images_u8))

  def decode(self, codes: jax.Array) -> jax.Array:
    return self._pixels(self.decoder(jnp.take(self.codebook[...], codes, axis=0)))

  @staticmethod
  def _pixels(x: jax.Array) -> jax.Array:
    return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)

  def losses(self, images_u8: jax.Array, beta: float):
    """(objective, {reconstruction, codebook, commitment}, z, codes) of a batch, straight-through."""
    target = images_u8.astype(jnp.float32) / 127.5 - 1.0
    z = self.encoder(target)
    codes = self.nearest(z)
    e = jnp.take(self.codebook[...], codes, axis=0)
    quantised = z + jax.lax.stop_gradient(e - z)
    out = self.decoder(quantised)
    terms = {'reconstruction': jnp.mean((out - target) ** 2),
             'codebook': jnp.mean((jax.lax.stop_gradient(z) - e) ** 2),
             'commitment': jnp.mean((z - jax.lax.stop_gradient(e)) ** 2)}
    return terms['reconstruction'] + terms['codebook'] + beta * terms['commitment'], terms, z, codes


def init(cfg, seed: int):
  """(graphdef, parameters as a pure dict) of a fresh tokenizer, initialised in one compiled call with
  the RBG generator: built eagerly, every initialiser compiles on its own, and threefry's bits for every
  kernel made that one call far slower to compile than RBG's (a throw-away timing on 2 CPU cores)."""
  make = lambda: Tokenizer(cfg, rngs=nnx.Rngs(jax.random.key(seed, impl='rbg')))
  graphdef, _ = nnx.split(nnx.eval_shape(make))
  return graphdef, jax.jit(lambda: nnx.to_pure_dict(nnx.state(make())))()
