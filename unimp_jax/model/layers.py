"""Building blocks shared by the vision tower, the connector and the language model.

Parameters may carry leading *stack* dimensions (one per scanned layer axis): a module built with
``stack=(G,)`` holds G layers' weights in one array per parameter, and :func:`scan` runs them with
``jax.lax.scan``. Logical axis names for a stack dimension are ``layers``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from unimp_jax.sharding.mesh import constrain

Initializer = Callable[..., jax.Array]
normal = jax.nn.initializers.normal


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Sequence[str | None],
          dtype, stack: Sequence[int] = ()) -> nnx.Param:
  """An nnx.Param of shape (*stack, *shape) whose logical axes are ('layers', ..., *axes)."""
  if len(axes) != len(shape):
    raise ValueError(f'{len(axes)} logical axes {tuple(axes)} for shape {tuple(shape)}')
  value = init(rngs.params(), (*stack, *shape), dtype)
  return nnx.Param(value, logical_axes=(('layers',) * len(stack)) + tuple(axes))


class Dense(nnx.Module):
  """y = x @ kernel (+ bias); kernel is [in, out] (the transpose of torch.nn.Linear.weight)."""

  def __init__(self, d_in: int, d_out: int, axes: tuple[str | None, str | None], *, use_bias: bool = False,
               dtype=jnp.float32, param_dtype=jnp.float32, stack: Sequence[int] = (), rngs: nnx.Rngs):
    self.dtype = dtype
    self.kernel = param(rngs, normal(0.02), (d_in, d_out), axes, param_dtype, stack)
    self.bias = param(rngs, jax.nn.initializers.zeros, (d_out,), axes[1:], param_dtype, stack) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.einsum('...i,io->...o', x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class LayerNorm(nnx.Module):
  """LayerNorm with scale and bias, statistics in float32."""

  def __init__(self, dim: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32,
               stack: Sequence[int] = (), rngs: nnx.Rngs):
    self.eps, self.dtype = eps, dtype
    self.scale = param(rngs, jax.nn.initializers.ones, (dim,), (None,), param_dtype, stack)
    self.bias = param(rngs, jax.nn.initializers.zeros, (dim,), (None,), param_dtype, stack)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class RMSNorm(nnx.Module):
  """Llama's RMSNorm: x / rms(x) * scale, statistics in float32."""

  def __init__(self, dim: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32,
               stack: Sequence[int] = (), rngs: nnx.Rngs):
    self.eps, self.dtype = eps, dtype
    self.scale = param(rngs, jax.nn.initializers.ones, (dim,), (None,), param_dtype, stack)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),  # CLIP's original activation
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
}


ROPE_SCALINGS = ('default', 'linear', 'llama3')  # the rope_type values of Hugging Face configs we compute


class RopeScaling(NamedTuple):
  """`model.lm.rope_scaling`, hashable (a static attribute of the LM). Field names are Hugging Face's."""
  type: str = 'default'
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling = RopeScaling()) -> jax.Array:
  """The rotary inverse frequencies [head_dim / 2], optionally rescaled for a longer context as Hugging Face
  does: 'linear' divides every frequency by `factor`; 'llama3' (Llama 3.1/3.2) divides the low frequencies
  by `factor`, keeps the high ones, and interpolates between `low_freq_factor` and `high_freq_factor`."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  kind = scaling.type
  if kind == 'linear':
    return inv_freq / scaling.factor
  if kind == 'llama3':
    context, low, high = scaling.original_max_position_embeddings, scaling.low_freq_factor, scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (context / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    return jnp.where(wavelen > context / low, inv_freq / scaling.factor,
                     jnp.where(wavelen < context / high, inv_freq, interpolated))
  if kind != 'default':
    raise ValueError(f'rope scaling {kind!r} is not one of {ROPE_SCALINGS}')
  return inv_freq


def rope_tables(positions_bt: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos/sin [B, T, 1, head_dim] for the rotate-half layout of Hugging Face Llama checkpoints.

  Computed once per forward pass and shared by every layer.
  """
  angles_btf = positions_bt.astype(jnp.float32)[..., None] * inv_freq
  angles_btd = jnp.concatenate([angles_btf, angles_btf], -1)[:, :, None, :]
  return jnp.cos(angles_btd), jnp.sin(angles_btd)


def rope(x_bthd: jax.Array, tables: tuple[jax.Array, jax.Array]) -> jax.Array:
  cos, sin = tables
  x1, x2 = jnp.split(x_bthd.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], -1)
  return (x_bthd * cos + rotated * sin).astype(x_bthd.dtype)


ATTENTION = ('xla', 'cudnn')  # `model.attention`: jax.nn.dot_product_attention's implementations


def attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, mask_bts: jax.Array | None = None,
              implementation: str = 'xla') -> jax.Array:
  """Scaled dot-product attention with grouped-query heads (H = K * groups), by
  `jax.nn.dot_product_attention`: 'xla' everywhere, 'cudnn' (fused flash attention) on NVIDIA GPUs.

  A fully masked row gives a finite (uniform) average, not NaN; callers zero such rows where they matter
  (see the gated cross-attention). Tested against a float64 numpy reference (tests/test_model.py).
  """
  mask = None if mask_bts is None else mask_bts[:, None]
  return jax.nn.dot_product_attention(q_bthd, k_bskd, v_bskd, mask=mask, implementation=implementation)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; the identity without a key (inference) or at rate 0."""
  if key is None or rate == 0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def split_keys(key: jax.Array | None, num: int):
  """`num` dropout keys (for the branches of a layer, or one per scanned layer); Nones without a key."""
  return (None,) * num if key is None else jax.random.split(key, num)


REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_saveable,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _constrain_slice(var: nnx.Variable) -> nnx.Variable:
  """A scanned parameter's slice (its leading stack axes gone) constrained by its remaining logical axes."""
  axes = var.get_metadata().get('logical_axes')
  if axes is None:
    return var
  return var.replace(constrain(var[...], axes[len(axes) - len(var.shape):]))


def scan(stacked: nnx.Module, body: Callable, carry, xs=None, *, remat: str = 'none', unroll: bool = False):
  """Runs `body(layer, carry, x) -> (carry, y)` over the leading stack axis of `stacked`.

  The layer weights are split out of the module and scanned as ordinary arrays, so the compiled
  program holds one layer's code regardless of depth; `remat` selects what the backward pass keeps.
  `unroll` (config `model.scan_layers=False`) writes every layer out instead: longer compiles, no
  per-layer slicing and stacking, and XLA's cost analysis counts every layer (it counts a loop body once).
  Each layer's slice is constrained to its parameters' sharding: slicing drops it, and without it the
  gradients the backward scan stacks up are whole on every device (docs/SCALING.md).
  """
  graphdef, state = nnx.split(stacked)

  def step(carry, inputs):
    layer_state, x = inputs
    layer_state = jax.tree.map(_constrain_slice, layer_state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    return body(nnx.merge(graphdef, layer_state), carry, x)

  if remat != 'none':
    step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=False)
  return jax.lax.scan(step, carry, (state, xs), unroll=unroll)
