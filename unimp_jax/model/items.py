"""Item tokens whose embeddings are the items' content (`model.item_embeddings = 'content'`).

With learned rows (`'learned'`, the paper's default) each `item_i` token has its own input-embedding and
output-head row. They are trained only by the few examples that name the item, so at CPU scale they stay
close to random: the model cannot tell two items apart by what they look like, every user gets the same
popular items, and an item no training example named (a new, "cold" item) can never be ranked.

With content rows, the row of `item_i` is computed from the item itself, through the model's own towers:

    row_i = text_proj(standardise(mean of the LM's embeddings of the item's text))
            + image_proj(standardise(mean of the connector's latents of the item's picture))

and the same row is both the input embedding and the output-head row of `item_i` (the added-vocabulary
rows of other tokens stay learned). A history chunk's `<answer> item_i` then carries the item's colour
and kind into the LM's residual stream, and the recommendation logit of an item is the dot product of
the answer position's state with that item's content: the model ranks items by what they are, the
gradient of every item's logit trains the projections and the text embeddings (the picture towers
learn from the pictures in prompts; see `content_rows`), and cold items are ranked like every other. The catalogue (every item's picture and text tokens) is an input of the train step; for
inference `with_item_rows` writes the rows into the ordinary parameters once, so decoding, export and
Hugging Face models see a plain embedding table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from unimp_jax.model import layers

ITEM_EMBEDDINGS = ('learned', 'content', 'content+id')


class ItemEncoder(nnx.Module):
  """Projects an item's pooled text embeddings and pooled picture latents into LM-width rows.

  The text projection's bias is a direction every item row shares. The pooled features are centred over
  the catalogue (`standardise`), so without it nothing would mark an item token as an item: attention
  could not gather the history's items in one step.

  With `id_rows` (`model.item_embeddings = 'content+id'`) each row also adds a learned row of its own,
  indexed like the added vocabulary and zero at the start: what the item's content does not say (its
  popularity, what it is bought with) is learned from the examples that name it. An item no training
  example names (a cold item: never in a history, and out of the training softmax) gets no gradient, so
  its row stays its content.
  """

  def __init__(self, lm_width: int, vision_width: int, *, id_rows: int = 0, dtype, param_dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.text_proj = layers.Dense(lm_width, lm_width, ('embed', 'mlp'), use_bias=True, **kw)
    self.image_proj = layers.Dense(vision_width, lm_width, ('embed', 'mlp'), **kw)
    self.id_rows = (layers.param(rngs, jax.nn.initializers.zeros, (id_rows, lm_width), (None, 'embed'), param_dtype)
                    if id_rows else None)

  def __call__(self, text_nd: jax.Array, image_nd: jax.Array | None, first_row=0) -> jax.Array:
    """Rows of N items whose tokens are added-vocabulary rows first_row .. first_row + N - 1."""
    rows = self.text_proj(text_nd)
    if image_nd is not None:
      rows = rows + self.image_proj(image_nd)
    if self.id_rows is not None:
      rows = rows + jax.lax.dynamic_slice_in_dim(self.id_rows[...], first_row, rows.shape[0]).astype(rows.dtype)
    return rows


def standardise(x_nd: jax.Array) -> jax.Array:
  """Each feature centred and scaled over the catalogue, each row then of expected norm 1.

  Pooled features are dominated by what every item shares (the words `Category ... Price ... Brand`,
  the black background): raw, every item's row points the same way and the model cannot tell a red
  coat from a blue one by its row. Centred over the catalogue, what is left is what tells items apart.
  """
  x_nd = x_nd - x_nd.mean(0)
  return x_nd / (x_nd.std(0) + 1e-6) / jnp.sqrt(x_nd.shape[-1])


def content_rows(model, arrays: dict[str, jax.Array], *, pad_id: int) -> jax.Array:
  """[N, LM width] content rows of every item of the catalogue `arrays` (unimp_jax.data.prompts.Catalogue)."""
  text_nl = arrays['text']
  valid = (text_nl != pad_id)[..., None].astype(jnp.float32)
  words = model.lm.embed_tokens(jnp.where(text_nl != pad_id, text_nl, 0)).astype(jnp.float32)
  text = standardise((words * valid).sum(1) / jnp.maximum(valid.sum(1), 1.0))
  image = None
  if 'images' in arrays:
    # Forward only: the towers learn from the pictures in prompts (cross-attention); a backward pass
    # through every catalogue picture each step would cost more than the rest of the step.
    latents = jax.lax.stop_gradient(model.encode_images(arrays['images'][:, None]))
    image = standardise(latents.astype(jnp.float32).mean(1)) * arrays['has_image'][:, None]
  return model.items(text, image, arrays['first_row']).astype(jnp.float32)


def with_item_rows(graphdef, params: dict, catalogue: dict[str, jax.Array] | None, *, pad_id: int) -> dict:
  """`params` with the item tokens' added-embedding (and head) rows replaced by their content rows.

  Differentiable: the train step calls it inside the loss, so gradients reach the projections and the
  text embeddings through every item row. A model with learned rows (no `items` encoder) is returned as it
  is; a model with content rows needs the `catalogue` arrays (unimp_jax.data.prompts.Catalogue.arrays).
  """
  if 'items' not in params:
    return params
  if catalogue is None:
    raise ValueError("model.item_embeddings='content' needs the catalogue (TaskBuilder.catalogue().arrays())")
  rows = content_rows(nnx.merge(graphdef, params), catalogue, pad_id=pad_id)
  start = catalogue['first_row']
  lm = dict(params['lm'])
  lm['added_embed'] = jax.lax.dynamic_update_slice(lm['added_embed'], rows.astype(lm['added_embed'].dtype), (start, 0))
  if 'added_head' in lm:
    lm['added_head'] = jax.lax.dynamic_update_slice(lm['added_head'], rows.T.astype(lm['added_head'].dtype), (0, start))
  return dict(params, lm=lm)


def inference_params(graphdef, params: dict, builder) -> dict:
  """`with_item_rows` computed once, for evaluation, prediction and export (a `TaskBuilder` supplies
  the catalogue); the parameters themselves for a model with learned rows."""
  if 'items' not in params:
    return params
  fn = jax.jit(lambda p, c: with_item_rows(graphdef, p, c, pad_id=builder.pad))
  return fn(params, builder.catalogue().arrays())
