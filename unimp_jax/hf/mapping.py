"""Explicit name and layout mapping between our parameters and Hugging Face checkpoints, both ways.

One table per tower says, for every parameter of ours, which HF tensor it comes from and how its layout
changes (`Layout`: torch Linear weights are [out, in], ours [in, out]; a patch convolution becomes a matmul
over flattened patches). Stacked (scanned) parameters gather one HF tensor per layer. Loading checks the
table both ways from shapes alone before reading anything: a parameter of ours with no tensor, a tensor
nobody consumed, or a shape that differs is an error that names it; then each parameter is read and placed
on its sharding one at a time (`load`). `export` runs the same rules backwards. The HF models covered are
`CLIPVisionModel`, Llama-family `*ForCausalLM` (Llama, Mistral, Qwen2) and `IdeficsForVisionText2Text`
(IDEFICS v1).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx
from flax.nnx import traversals

from unimp_jax import config as config_lib
from unimp_jax.model import layers


class Layout(NamedTuple):
  """How one HF tensor becomes our array, and back."""
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


SAME = Layout(lambda w: w, lambda w: w)
LINEAR = Layout(lambda w: w.T, lambda w: w.T)  # torch Linear [out, in] <-> our kernel [in, out]
# IDEFICS' gates: [1] ('float') or [1, 1, D] ('vector') <-> ours [1] or [D].
ALPHA = Layout(lambda w: w.reshape(-1), lambda w: w.reshape(1) if w.size == 1 else w.reshape(1, 1, -1))


def patch_layout(channels: int) -> Layout:
  """Patch convolution [D, C, p, p] <-> our matmul over flattened patches [p * p * C, D], (row, col, channel)."""
  def to_hf(w):
    p = int(round((w.shape[0] // channels) ** 0.5))
    return w.reshape(p, p, channels, w.shape[1]).transpose(3, 2, 0, 1)
  return Layout(lambda w: w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]), to_hf)


class Rule(NamedTuple):
  path: tuple[str, ...]          # our parameter
  hf_name: str                   # HF tensor name; '{}' is the HF layer index of a stacked parameter
  layout: Layout
  stack: int = 0                 # leading stack dimensions of our parameter
  layer_index: Callable[..., int] = lambda i: i  # stack indices -> HF layer index

  def hf_names(self, shape: tuple[int, ...]) -> list[str]:
    """The HF tensors of our parameter of `shape`: one, or one per stacked layer (in stack order)."""
    if not self.stack:
      return [self.hf_name]
    return [self.hf_name.format(self.layer_index(*idx)) for idx in itertools.product(*map(range, shape[:self.stack]))]


def vision_rules(prefix: str, channels: int) -> list[Rule]:
  """`prefix` is 'vision_model.' for CLIPVisionModel, 'model.vision_model.' inside IDEFICS."""
  rules = [
      Rule(('vision', 'patch_embed', 'kernel'), prefix + 'embeddings.patch_embedding.weight', patch_layout(channels)),
      Rule(('vision', 'class_embed'), prefix + 'embeddings.class_embedding', SAME),
      Rule(('vision', 'pos_embed'), prefix + 'embeddings.position_embedding.weight', SAME),
  ]
  for ours, theirs in (('pre_norm', 'pre_layrnorm'), ('post_norm', 'post_layernorm')):
    rules += [Rule(('vision', ours, 'scale'), f'{prefix}{theirs}.weight', SAME),
              Rule(('vision', ours, 'bias'), f'{prefix}{theirs}.bias', SAME)]
  block = prefix + 'encoder.layers.{}.'
  for ours, theirs in (('q', 'self_attn.q_proj'), ('k', 'self_attn.k_proj'), ('v', 'self_attn.v_proj'),
                       ('o', 'self_attn.out_proj'), ('fc1', 'mlp.fc1'), ('fc2', 'mlp.fc2')):
    rules += [Rule(('vision', 'blocks', ours, 'kernel'), f'{block}{theirs}.weight', LINEAR, 1),
              Rule(('vision', 'blocks', ours, 'bias'), f'{block}{theirs}.bias', SAME, 1)]
  for ours, theirs in (('norm1', 'layer_norm1'), ('norm2', 'layer_norm2')):
    rules += [Rule(('vision', 'blocks', ours, 'scale'), f'{block}{theirs}.weight', SAME, 1),
              Rule(('vision', 'blocks', ours, 'bias'), f'{block}{theirs}.bias', SAME, 1)]
  return rules


def connector_rules(qk_norm: bool, prefix: str = 'model.perceiver_resampler.') -> list[Rule]:
  rules = [Rule(('connector', 'latents'), prefix + 'latents', SAME),
           Rule(('connector', 'norm', 'scale'), prefix + 'layer_norm.weight', SAME),
           Rule(('connector', 'norm', 'bias'), prefix + 'layer_norm.bias', SAME)]
  attn, mlp = prefix + 'blocks.{}.0.', prefix + 'blocks.{}.1.'
  norms = [('context_norm', attn + 'context_layer_norm'), ('latents_norm', attn + 'latents_layer_norm'),
           ('mlp_norm', mlp + 'ln')]
  if qk_norm:
    norms += [('q_norm', attn + 'q_layer_norm'), ('k_norm', attn + 'k_layer_norm')]
  for ours, theirs in norms:
    rules += [Rule(('connector', 'blocks', ours, 'scale'), theirs + '.weight', SAME, 1),
              Rule(('connector', 'blocks', ours, 'bias'), theirs + '.bias', SAME, 1)]
  for ours, theirs in (('q', attn + 'q_proj'), ('k', attn + 'k_proj'), ('v', attn + 'v_proj'),
                       ('o', attn + 'output_proj'), ('fc', mlp + 'fc'), ('proj', mlp + 'c_proj')):
    rules.append(Rule(('connector', 'blocks', ours, 'kernel'), theirs + '.weight', LINEAR, 1))
  return rules


def _attention_and_mlp(path, prefix: str, attn: str, *stacking, qkv_bias: bool = False) -> list[Rule]:
  rules = [Rule((*path, ours, 'kernel'), f'{prefix}{attn}.{ours}_proj.weight', LINEAR, *stacking)
           for ours in ('q', 'k', 'v', 'o')]
  rules += [Rule((*path, ours, 'bias'), f'{prefix}{attn}.{ours}_proj.bias', SAME, *stacking)
            for ours in ('q', 'k', 'v') if qkv_bias]
  rules += [Rule((*path, 'mlp', ours, 'kernel'), f'{prefix}mlp.{ours}_proj.weight', LINEAR, *stacking)
            for ours in ('gate', 'up', 'down')]
  rules += [Rule((*path, 'attn_norm', 'scale'), prefix + 'input_layernorm.weight', SAME, *stacking),
            Rule((*path, 'mlp_norm', 'scale'), prefix + 'post_attention_layernorm.weight', SAME, *stacking)]
  return rules


def lm_rules(lm_cfg, *, cross_attention: bool, added_vocab: bool) -> list[Rule]:
  """Llama decoder layers, and for IDEFICS also the gated cross-attention layers and added rows."""
  per_group = lm_cfg.cross_attn_every
  rules = [Rule(('lm', 'embed'), 'model.embed_tokens.weight', SAME),
           Rule(('lm', 'norm', 'scale'), 'model.norm.weight', SAME)]
  rules += _attention_and_mlp(('lm', 'groups', 'layers'), 'model.layers.{}.', 'self_attn',
                              2, lambda g, j: g * per_group + j, qkv_bias=lm_cfg.qkv_bias)
  if not lm_cfg.tie_embeddings:
    rules.append(Rule(('lm', 'head'), 'lm_head.weight', LINEAR))
  if added_vocab:
    rules.append(Rule(('lm', 'added_embed'), 'model.embed_tokens.additional_embedding.weight', SAME))
    if not lm_cfg.tie_embeddings:
      rules.append(Rule(('lm', 'added_head'), 'lm_head.additional_fc.weight', LINEAR))
  if cross_attention:
    block = 'model.gated_cross_attn_layers.{}.'
    rules += _attention_and_mlp(('lm', 'groups', 'cross'), block, 'cross_attn', 1)
    rules += [Rule(('lm', 'groups', 'cross', 'alpha_attn'), block + 'alpha_cross_attn', ALPHA, 1),
              Rule(('lm', 'groups', 'cross', 'alpha_mlp'), block + 'alpha_dense', ALPHA, 1)]
    if lm_cfg.qk_norm:
      rules += [Rule(('lm', 'groups', 'cross', 'q_norm', 'scale'), block + 'cross_attn.q_layer_norm.weight',
                     SAME, 1),
                Rule(('lm', 'groups', 'cross', 'k_norm', 'scale'), block + 'cross_attn.k_layer_norm.weight',
                     SAME, 1)]
  return rules


def idefics_rules(model_cfg) -> list[Rule]:
  return (vision_rules('model.vision_model.', model_cfg.vision.channels) + connector_rules(model_cfg.connector.qk_norm)
          + lm_rules(model_cfg.lm, cross_attention=True, added_vocab=True))


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

class MappingError(ValueError):
  """A tensor that is missing, unexpected or mis-shaped; the message names it."""


def _tied_aliases(model_cfg) -> dict[str, str]:
  """HF tensors that are tied copies of another tensor when our config ties embeddings."""
  if not model_cfg.lm.tie_embeddings:
    return {}
  return {'lm_head.weight': 'model.embed_tokens.weight',
          'lm_head.additional_fc.weight': 'model.embed_tokens.additional_embedding.weight'}


def _shape_as_ours(rule: Rule, hf_shape) -> tuple[int, ...]:
  """The shape `rule.layout` gives a tensor of `hf_shape`, worked out on a zero-stride view (reads nothing)."""
  return rule.layout.to_ours(np.broadcast_to(np.zeros((), np.int8), tuple(hf_shape))).shape


def check(rules: list[Rule], tensors: Mapping, shapes: Mapping[tuple, tuple], *,
          ignore: Callable[[str], bool] = lambda name: False, tied: Mapping[str, str] | None = None) -> None:
  """Checks the whole mapping from tensor shapes alone, before anything is read or changed: every tensor a
  rule needs exists and has the shape our parameter needs, and every tensor has a place."""
  used = set()
  for rule in rules:
    if rule.path not in shapes:
      raise MappingError(f'mapping names {"/".join(rule.path)}, which the model does not have')
    want = tuple(shapes[rule.path])[rule.stack:]
    for name in rule.hf_names(tuple(shapes[rule.path])):
      if name not in tensors:
        raise MappingError(f'checkpoint has no tensor {name!r} (needed for {"/".join(rule.path)})')
      got = _shape_as_ours(rule, tensors[name].shape)
      if got != want:
        raise MappingError(f'tensor {name!r} gives shape {got} for {"/".join(rule.path)}, '
                           f'which the config expects to be {want}')
      used.add(name)
  used.update(alias for alias, source in (tied or {}).items() if alias in tensors and source in tensors)
  unexpected = sorted(n for n in tensors if n not in used and not ignore(n))
  if unexpected:
    raise MappingError(f'checkpoint tensor {unexpected[0]!r} has no place in the model '
                       f'({len(unexpected)} unused in all)')


def read(rule: Rule, tensors: Mapping, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
  """Our parameter of `shape` from its HF tensor(s), written layer by layer into one `dtype` array;
  `np.asarray` on a lazy tensor reads it from disk."""
  names = rule.hf_names(shape)
  if not rule.stack:
    return rule.layout.to_ours(np.asarray(tensors[names[0]])).astype(dtype, copy=False)
  out = np.empty(shape, dtype)
  layers = out.reshape(-1, *shape[rule.stack:])
  for i, name in enumerate(names):
    layers[i] = rule.layout.to_ours(np.asarray(tensors[name]))
  return out


def param_shapes(model) -> dict[tuple, tuple]:
  return {k: v.shape for k, v in traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}


def load(model, rules: list[Rule], tensors: Mapping, *, ignore: Callable[[str], bool] = lambda name: False,
         tied: Mapping[str, str] | None = None) -> None:
  """Streams HF `tensors` into the model's parameters, one parameter at a time, each placed with its
  sharding: host memory holds one parameter beyond the model. Nothing changes unless `check` passes."""
  shapes = param_shapes(model)
  check(rules, tensors, shapes, ignore=ignore, tied=tied)
  for alias, source in (tied or {}).items():
    if alias in tensors and source in tensors and not np.array_equal(np.asarray(tensors[alias]),
                                                                     np.asarray(tensors[source])):
      raise MappingError(f'{alias!r} differs from {source!r}, but the config ties embeddings '
                         '(model.lm.tie_embeddings=True)')
  for rule in rules:
    variable = functools.reduce(getattr, rule.path, model)
    current = variable.get_value()
    value = read(rule, tensors, shapes[rule.path], current.dtype)
    variable.set_value(jax.device_put(value, current.sharding))
    del current, value


ADDED_ROWS = {('lm', 'added_embed'): 0, ('lm', 'added_head'): 1}  # our added-vocabulary tables: their row axis


def load_idefics(model, tensors: Mapping, model_cfg) -> None:
  """A whole IDEFICS. A real one has fewer added rows than we need (idefics-9b: 2, for its tokenizer's
  `<fake_token_around_image>` and `<image>`, which our tokenizer keeps as its first added tokens): they fill
  our first added rows, and the rest stay freshly initialised."""
  rules, shapes = idefics_rules(model_cfg), param_shapes(model)
  leading = [r for r in rules if r.path in ADDED_ROWS and r.hf_name in tensors
             and _shape_as_ours(r, tensors[r.hf_name].shape)[ADDED_ROWS[r.path]] < shapes[r.path][ADDED_ROWS[r.path]]]
  load(model, [r for r in rules if r not in leading], tensors, tied=_tied_aliases(model_cfg),
       ignore=lambda name: name in {r.hf_name for r in leading})
  for rule in leading:
    variable = functools.reduce(getattr, rule.path, model)
    current = variable.get_value()
    value = np.array(jax.device_get(current))
    rows = rule.layout.to_ours(np.asarray(tensors[rule.hf_name]))
    where = (slice(None),) * ADDED_ROWS[rule.path] + (slice(0, rows.shape[ADDED_ROWS[rule.path]]),)
    if value[where].shape != rows.shape:
      raise MappingError(f'tensor {rule.hf_name!r} gives shape {rows.shape}; {"/".join(rule.path)} needs '
                         f'{value[where].shape} for its leading rows')
    value[where] = rows
    variable.set_value(jax.device_put(value.astype(current.dtype), current.sharding))


def causal_lm_rules(lm_cfg, *, with_added: bool = False) -> list[Rule]:
  """A Llama-family `*ForCausalLM`. `with_added`: its vocabulary is ours followed by our added tokens (as
  `export` writes the LM alone), so its embedding and head rows split between our base and added arrays."""
  rules = lm_rules(lm_cfg, cross_attention=False, added_vocab=False)
  if not with_added:
    return rules
  v = lm_cfg.vocab_size
  rows = lambda part: Layout(lambda w: w[part], None)
  rules = [r for r in rules if r.path not in (('lm', 'embed'), ('lm', 'head'))]
  rules += [Rule(('lm', 'embed'), 'model.embed_tokens.weight', rows(slice(None, v))),
            Rule(('lm', 'added_embed'), 'model.embed_tokens.weight', rows(slice(v, None)))]
  if not lm_cfg.tie_embeddings:
    rules += [Rule(('lm', 'head'), 'lm_head.weight', Layout(lambda w: w[:v].T, None)),
              Rule(('lm', 'added_head'), 'lm_head.weight', Layout(lambda w: w[v:].T, None))]
  return rules


def load_llama(model, tensors: Mapping, model_cfg) -> None:
  """The LM of a Llama-family `*ForCausalLM`. A checkpoint with our base vocabulary leaves the added rows,
  the cross-attention and the rest freshly initialised; one with base + added rows (an exported LM) fills
  the added rows too."""
  lm = model_cfg.lm
  embed = tensors.get('model.embed_tokens.weight')
  with_added = embed is not None and embed.shape[0] == lm.vocab_size + lm.added_vocab_size != lm.vocab_size
  load(model, causal_lm_rules(lm, with_added=with_added), tensors, tied=_tied_aliases(model_cfg))


def causal_lm_params(params: Mapping[tuple, np.ndarray], lm_cfg) -> dict[tuple, np.ndarray]:
  """Our flat params with the added rows appended to the base ones: what `export` needs for the LM alone."""
  out = dict(params)
  out['lm', 'embed'] = np.concatenate([params['lm', 'embed'], params['lm', 'added_embed']])
  if not lm_cfg.tie_embeddings:
    out['lm', 'head'] = np.concatenate([params['lm', 'head'], params['lm', 'added_head']], axis=1)
  return out


def load_clip_vision(model, tensors: Mapping, model_cfg) -> None:
  """A `CLIPVisionModel` (or the vision half of a `CLIPModel`) into the vision tower.

  Checkpoint files name the tower `vision_model.*`; transformers 5's in-memory `CLIPVisionModel` drops
  that prefix. Both are accepted.
  """
  prefix = 'vision_model.' if any(name.startswith('vision_model.') for name in tensors) else ''
  ignore = lambda name: not name.startswith(prefix)  # the text half and projections of a CLIPModel
  load(model, vision_rules(prefix, model_cfg.vision.channels), tensors, ignore=ignore)


def export(rules: list[Rule], params: Mapping[tuple, np.ndarray]):
  """Yields (HF name, tensor) for our flat `params` ({path: array}), layer by layer: the inverse of `read`."""
  for rule in rules:
    value = np.asarray(params[rule.path])
    names = rule.hf_names(value.shape)
    layers = value.reshape(-1, *value.shape[rule.stack:]) if rule.stack else value[None]
    for name, layer in zip(names, layers, strict=True):
      yield name, np.ascontiguousarray(rule.layout.to_hf(layer))


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------

def _rope_theta(hf_cfg) -> float:
  params = getattr(hf_cfg, 'rope_parameters', None) or {}
  return float(params.get('rope_theta', getattr(hf_cfg, 'rope_theta', 10000.0)))


def _rope_scaling(hf_cfg) -> dict:
  """`model.lm.rope_scaling` from a config's `rope_parameters` (transformers 5) or `rope_scaling` (older files);
  a scheme we do not compute is an error naming it."""
  rope = getattr(hf_cfg, 'rope_parameters', None) or getattr(hf_cfg, 'rope_scaling', None) or {}
  kind = rope.get('rope_type', rope.get('type', 'default'))
  name = getattr(hf_cfg, 'model_type', 'llama')
  if kind not in layers.ROPE_SCALINGS:
    raise MappingError(f'{name} config has rope_type={kind!r}; this model computes {layers.ROPE_SCALINGS} rotary '
                       'embeddings only, and would give other logits')
  if rope.get('partial_rotary_factor', 1.0) != 1.0:
    raise MappingError(f'{name} config has partial_rotary_factor={rope["partial_rotary_factor"]}; this model '
                       'rotates the whole head')
  scaling = dict(config_lib.base_config().model.lm.rope_scaling, type=kind)
  scaling.update({key: rope[key] for key in scaling if key in rope and key != 'type'})
  return scaling


def _rope_parameters(lm) -> dict:
  """Hugging Face's `rope_parameters` for our `model.lm`: only the keys its rope_type reads."""
  scaling = lm.rope_scaling
  params = {'rope_type': scaling.type, 'rope_theta': lm.rope_theta}
  if scaling.type != 'default':
    params['factor'] = scaling.factor
  if scaling.type == 'llama3':
    params.update(low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor,
                  original_max_position_embeddings=scaling.original_max_position_embeddings)
  return params


def update_vision_config(model_cfg, hf_vision) -> None:
  width = getattr(hf_vision, 'embed_dim', None) or hf_vision.hidden_size
  model_cfg.vision.update(
      image_size=hf_vision.image_size, patch_size=hf_vision.patch_size, channels=hf_vision.num_channels,
      width=width, depth=hf_vision.num_hidden_layers, mlp_dim=hf_vision.intermediate_size,
      num_heads=hf_vision.num_attention_heads, act=hf_vision.hidden_act, norm_eps=hf_vision.layer_norm_eps)


LM_TYPES = ('llama', 'mistral', 'qwen2')  # Llama-family `*ForCausalLM` model types the LM imports


def update_llama_config(model_cfg, hf_llama, *, seq_len: int | None = None) -> None:
  """Our `model.lm` architecture from a Llama, Mistral or Qwen2 config (Qwen2: biases on q/k/v).
  `seq_len`: a sliding attention window shorter than it is an error (our attention is full)."""
  model_type = getattr(hf_llama, 'model_type', 'llama')
  if model_type not in LM_TYPES:
    raise MappingError(f'model_type={model_type!r} is not a Llama-family LM this model imports ({LM_TYPES})')
  for flag in ('attention_bias', 'mlp_bias'):
    if getattr(hf_llama, flag, False):
      raise MappingError(f'{model_type} config has {flag}=True, which this model does not support')
  act = getattr(hf_llama, 'hidden_act', 'silu')
  if act != 'silu':
    raise MappingError(f'{model_type} config has hidden_act={act!r}; the LM MLP is SwiGLU (silu)')
  window = getattr(hf_llama, 'sliding_window', None)
  if window is not None and seq_len is not None and window < seq_len:
    raise MappingError(f'{model_type} config has sliding_window={window} < config.data.seq_len={seq_len}; this '
                       'model attends over the whole sequence')
  head_dim = getattr(hf_llama, 'head_dim', None) or hf_llama.hidden_size // hf_llama.num_attention_heads
  if head_dim * hf_llama.num_attention_heads != hf_llama.hidden_size:
    raise MappingError(f'{model_type} head_dim={head_dim} x heads != hidden_size={hf_llama.hidden_size}')
  model_cfg.lm.update(
      vocab_size=hf_llama.vocab_size, width=hf_llama.hidden_size, mlp_dim=hf_llama.intermediate_size,
      num_layers=hf_llama.num_hidden_layers, num_heads=hf_llama.num_attention_heads,
      num_kv_heads=getattr(hf_llama, 'num_key_value_heads', None) or hf_llama.num_attention_heads,
      rope_theta=_rope_theta(hf_llama), rope_scaling=_rope_scaling(hf_llama), norm_eps=hf_llama.rms_norm_eps,
      tie_embeddings=bool(hf_llama.tie_word_embeddings), qkv_bias=model_type == 'qwen2')


def model_config_from_idefics(hf_cfg):
  """Our `model` config section for an `IdeficsConfig` (a resampler is required)."""
  if not hf_cfg.use_resampler:
    raise MappingError('IDEFICS config has use_resampler=False; UniMP always uses the perceiver resampler')
  if hf_cfg.hidden_act != 'silu':
    raise MappingError(f'IDEFICS hidden_act={hf_cfg.hidden_act!r}; the LM MLP is SwiGLU (silu)')
  model_cfg = config_lib.base_config().model
  update_vision_config(model_cfg, hf_cfg.vision_config)
  p = hf_cfg.perceiver_config
  model_cfg.connector.update(num_latents=p.resampler_n_latents, depth=p.resampler_depth,
                             num_heads=p.resampler_n_heads, head_dim=p.resampler_head_dim,
                             qk_norm=bool(p.qk_layer_norms_perceiver), mlp_ratio=4, norm_eps=1e-5)
  model_cfg.lm.update(
      vocab_size=hf_cfg.vocab_size, added_vocab_size=hf_cfg.additional_vocab_size, width=hf_cfg.hidden_size,
      mlp_dim=hf_cfg.intermediate_size, num_layers=hf_cfg.num_hidden_layers,
      num_heads=hf_cfg.num_attention_heads, num_kv_heads=hf_cfg.num_attention_heads,
      rope_theta=_rope_theta(hf_cfg), rope_scaling=_rope_scaling(hf_cfg), norm_eps=hf_cfg.rms_norm_eps,
      tie_embeddings=bool(hf_cfg.tie_word_embeddings), cross_attn_every=hf_cfg.cross_layer_interval,
      alpha_type=hf_cfg.alpha_type, qk_norm=bool(hf_cfg.qk_layer_norms))
  return model_cfg


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise MappingError(message)


def idefics_config(model_cfg, **special_tokens) -> dict:
  """`IdeficsConfig` keyword arguments for our `model` config; an error names what IDEFICS cannot hold."""
  lm, v, c = model_cfg.lm, model_cfg.vision, model_cfg.connector
  _require(lm.num_kv_heads == lm.num_heads, f'IDEFICS has no grouped-query attention (model.lm.num_kv_heads='
           f'{lm.num_kv_heads}, num_heads={lm.num_heads}); export the LM alone (--lm_only)')
  _require(not lm.qkv_bias, 'IDEFICS has no q/k/v biases (model.lm.qkv_bias); export the LM alone (--lm_only)')
  _require(lm.num_layers % lm.cross_attn_every == 0, 'model.lm.num_layers is not a multiple of cross_attn_every')
  _require(c.mlp_ratio == 4 and c.norm_eps == 1e-5,
           'IDEFICS fixes the perceiver MLP ratio (4) and LayerNorm eps (1e-5): model.connector differs')
  return dict(
      vocab_size=lm.vocab_size, additional_vocab_size=lm.added_vocab_size, hidden_size=lm.width,
      intermediate_size=lm.mlp_dim, num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_heads,
      hidden_act='silu', rms_norm_eps=lm.norm_eps, tie_word_embeddings=lm.tie_embeddings,
      rope_parameters=_rope_parameters(lm),
      cross_layer_interval=lm.cross_attn_every, qk_layer_norms=lm.qk_norm, alpha_type=lm.alpha_type,
      alpha_initializer='zeros',  # transformers crashes on 'normal' with alpha_type='float'
      use_resampler=True, freeze_text_layers=False, freeze_vision_layers=False,
      vision_config=dict(embed_dim=v.width, image_size=v.image_size, patch_size=v.patch_size,
                         num_channels=v.channels, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
                         num_attention_heads=v.num_heads, hidden_act=v.act, layer_norm_eps=v.norm_eps),
      perceiver_config=dict(use_resampler=True, resampler_n_latents=c.num_latents, resampler_depth=c.depth,
                            resampler_n_heads=c.num_heads, resampler_head_dim=c.head_dim,
                            qk_layer_norms_perceiver=c.qk_norm),
      **special_tokens)


def causal_lm_config(model_cfg, **special_tokens) -> dict:
  """`LlamaConfig` (or `Qwen2Config` with q/k/v biases) keyword arguments for the LM alone; the added
  vocabulary becomes ordinary rows after the base ones, so the vocabulary is their sum."""
  lm = model_cfg.lm
  return dict(
      model_type='qwen2' if lm.qkv_bias else 'llama', vocab_size=lm.vocab_size + lm.added_vocab_size,
      hidden_size=lm.width, intermediate_size=lm.mlp_dim, num_hidden_layers=lm.num_layers,
      num_attention_heads=lm.num_heads, num_key_value_heads=lm.num_kv_heads, hidden_act='silu',
      rms_norm_eps=lm.norm_eps, tie_word_embeddings=lm.tie_embeddings,
      rope_parameters=_rope_parameters(lm), **special_tokens)
