"""Explicit name and layout mapping between our parameters and Hugging Face checkpoints.

One table per tower says, for every parameter of ours, which HF tensor it comes from and how its layout
changes (torch Linear weights are [out, in]; ours are [in, out]; a patch convolution becomes a matmul over
flattened patches). Stacked (scanned) parameters gather one HF tensor per layer. Loading checks the table
both ways: a parameter of ours with no tensor, a tensor nobody consumed, or a shape that differs is an
error that names it. The HF models covered are `CLIPVisionModel`, `LlamaForCausalLM` and
`IdeficsForVisionText2Text` (IDEFICS v1).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx
from flax.nnx import traversals

from unimp_jax import config as config_lib


class Rule(NamedTuple):
  path: tuple[str, ...]          # our parameter
  hf_name: str                   # HF tensor name; '{}' is the HF layer index of a stacked parameter
  transform: Callable[[np.ndarray], np.ndarray]
  stack: int = 0                 # leading stack dimensions of our parameter
  layer_index: Callable[..., int] = lambda i: i  # stack indices -> HF layer index


def _same(w):
  return w


def _linear(w):
  return w.T


def _flat(w):
  return w.reshape(-1)


def _patch_conv(w):  # [D, C, p, p] -> [p * p * C, D], patches flattened as (row, col, channel)
  return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])


def vision_rules(prefix: str) -> list[Rule]:
  """`prefix` is 'vision_model.' for CLIPVisionModel, 'model.vision_model.' inside IDEFICS."""
  rules = [
      Rule(('vision', 'patch_embed', 'kernel'), prefix + 'embeddings.patch_embedding.weight', _patch_conv),
      Rule(('vision', 'class_embed'), prefix + 'embeddings.class_embedding', _same),
      Rule(('vision', 'pos_embed'), prefix + 'embeddings.position_embedding.weight', _same),
  ]
  for ours, theirs in (('pre_norm', 'pre_layrnorm'), ('post_norm', 'post_layernorm')):
    rules += [Rule(('vision', ours, 'scale'), f'{prefix}{theirs}.weight', _same),
              Rule(('vision', ours, 'bias'), f'{prefix}{theirs}.bias', _same)]
  block = prefix + 'encoder.layers.{}.'
  for ours, theirs in (('q', 'self_attn.q_proj'), ('k', 'self_attn.k_proj'), ('v', 'self_attn.v_proj'),
                       ('o', 'self_attn.out_proj'), ('fc1', 'mlp.fc1'), ('fc2', 'mlp.fc2')):
    rules += [Rule(('vision', 'blocks', ours, 'kernel'), f'{block}{theirs}.weight', _linear, 1),
              Rule(('vision', 'blocks', ours, 'bias'), f'{block}{theirs}.bias', _same, 1)]
  for ours, theirs in (('norm1', 'layer_norm1'), ('norm2', 'layer_norm2')):
    rules += [Rule(('vision', 'blocks', ours, 'scale'), f'{block}{theirs}.weight', _same, 1),
              Rule(('vision', 'blocks', ours, 'bias'), f'{block}{theirs}.bias', _same, 1)]
  return rules


def connector_rules(qk_norm: bool, prefix: str = 'model.perceiver_resampler.') -> list[Rule]:
  rules = [Rule(('connector', 'latents'), prefix + 'latents', _same),
           Rule(('connector', 'norm', 'scale'), prefix + 'layer_norm.weight', _same),
           Rule(('connector', 'norm', 'bias'), prefix + 'layer_norm.bias', _same)]
  attn, mlp = prefix + 'blocks.{}.0.', prefix + 'blocks.{}.1.'
  norms = [('context_norm', attn + 'context_layer_norm'), ('latents_norm', attn + 'latents_layer_norm'),
           ('mlp_norm', mlp + 'ln')]
  if qk_norm:
    norms += [('q_norm', attn + 'q_layer_norm'), ('k_norm', attn + 'k_layer_norm')]
  for ours, theirs in norms:
    rules += [Rule(('connector', 'blocks', ours, 'scale'), theirs + '.weight', _same, 1),
              Rule(('connector', 'blocks', ours, 'bias'), theirs + '.bias', _same, 1)]
  for ours, theirs in (('q', attn + 'q_proj'), ('k', attn + 'k_proj'), ('v', attn + 'v_proj'),
                       ('o', attn + 'output_proj'), ('fc', mlp + 'fc'), ('proj', mlp + 'c_proj')):
    rules.append(Rule(('connector', 'blocks', ours, 'kernel'), theirs + '.weight', _linear, 1))
  return rules


def _attention_and_mlp(path, prefix: str, attn: str, *stacking) -> list[Rule]:
  rules = [Rule((*path, ours, 'kernel'), f'{prefix}{attn}.{ours}_proj.weight', _linear, *stacking)
           for ours in ('q', 'k', 'v', 'o')]
  rules += [Rule((*path, 'mlp', ours, 'kernel'), f'{prefix}mlp.{ours}_proj.weight', _linear, *stacking)
            for ours in ('gate', 'up', 'down')]
  rules += [Rule((*path, 'attn_norm', 'scale'), prefix + 'input_layernorm.weight', _same, *stacking),
            Rule((*path, 'mlp_norm', 'scale'), prefix + 'post_attention_layernorm.weight', _same, *stacking)]
  return rules


def lm_rules(lm_cfg, *, cross_attention: bool, added_vocab: bool) -> list[Rule]:
  """Llama decoder layers, and for IDEFICS also the gated cross-attention layers and added rows."""
  per_group = lm_cfg.cross_attn_every
  rules = [Rule(('lm', 'embed'), 'model.embed_tokens.weight', _same),
           Rule(('lm', 'norm', 'scale'), 'model.norm.weight', _same)]
  rules += _attention_and_mlp(('lm', 'groups', 'layers'), 'model.layers.{}.', 'self_attn',
                              2, lambda g, j: g * per_group + j)
  if not lm_cfg.tie_embeddings:
    rules.append(Rule(('lm', 'head'), 'lm_head.weight', _linear))
  if added_vocab:
    rules.append(Rule(('lm', 'added_embed'), 'model.embed_tokens.additional_embedding.weight', _same))
    if not lm_cfg.tie_embeddings:
      rules.append(Rule(('lm', 'added_head'), 'lm_head.additional_fc.weight', _linear))
  if cross_attention:
    block = 'model.gated_cross_attn_layers.{}.'
    rules += _attention_and_mlp(('lm', 'groups', 'cross'), block, 'cross_attn', 1)
    rules += [Rule(('lm', 'groups', 'cross', 'alpha_attn'), block + 'alpha_cross_attn', _flat, 1),
              Rule(('lm', 'groups', 'cross', 'alpha_mlp'), block + 'alpha_dense', _flat, 1)]
    if lm_cfg.qk_norm:
      rules += [Rule(('lm', 'groups', 'cross', 'q_norm', 'scale'), block + 'cross_attn.q_layer_norm.weight',
                     _same, 1),
                Rule(('lm', 'groups', 'cross', 'k_norm', 'scale'), block + 'cross_attn.k_layer_norm.weight',
                     _same, 1)]
  return rules


def idefics_rules(model_cfg) -> list[Rule]:
  return (vision_rules('model.vision_model.') + connector_rules(model_cfg.connector.qk_norm)
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


def convert(rules: list[Rule], tensors: Mapping[str, np.ndarray], shapes: Mapping[tuple, tuple],
            *, ignore: Callable[[str], bool] = lambda name: False,
            tied: Mapping[str, str] | None = None) -> dict[tuple, np.ndarray]:
  """HF `tensors` -> {our path: array}, checked against our `shapes`; every tensor must be consumed."""
  out, used = {}, set()
  for rule in rules:
    if rule.path not in shapes:
      raise MappingError(f'mapping names {"/".join(rule.path)}, which the model does not have')
    shape = tuple(shapes[rule.path])
    stack = shape[:rule.stack]
    names = ([rule.hf_name.format(rule.layer_index(*idx)) for idx in itertools.product(*map(range, stack))]
             if rule.stack else [rule.hf_name])
    values = []
    for name in names:
      if name not in tensors:
        raise MappingError(f'checkpoint has no tensor {name!r} (needed for {"/".join(rule.path)})')
      values.append(rule.transform(np.asarray(tensors[name])))
      if values[-1].shape != shape[rule.stack:]:
        raise MappingError(f'tensor {name!r} gives shape {values[-1].shape} for {"/".join(rule.path)}, '
                           f'which the config expects to be {shape[rule.stack:]}')
    out[rule.path] = np.stack(values).reshape(shape) if rule.stack else values[0]
    used.update(names)
  for alias, source in (tied or {}).items():
    if alias in tensors and source in tensors:
      if not np.array_equal(np.asarray(tensors[alias]), np.asarray(tensors[source])):
        raise MappingError(f'{alias!r} differs from {source!r}, but the config ties embeddings '
                           '(model.lm.tie_embeddings=True)')
      used.add(alias)
  unexpected = sorted(n for n in tensors if n not in used and not ignore(n))
  if unexpected:
    raise MappingError(f'checkpoint tensor {unexpected[0]!r} has no place in the model '
                       f'({len(unexpected)} unused in all)')
  return out


def param_shapes(model) -> dict[tuple, tuple]:
  return {k: v.shape for k, v in traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}


def assign(model, values: Mapping[tuple, np.ndarray]) -> None:
  """Writes host arrays into the model's parameters, each placed with that parameter's sharding."""
  state = nnx.state(model, nnx.Param)
  flat = traversals.flatten_mapping(nnx.to_pure_dict(state))
  for path, value in values.items():
    current = flat[path]
    flat[path] = jax.device_put(value.astype(current.dtype), current.sharding)
  nnx.replace_by_pure_dict(state, traversals.unflatten_mapping(flat))
  nnx.update(model, state)


def load_idefics(model, tensors: Mapping[str, np.ndarray], model_cfg) -> None:
  assign(model, convert(idefics_rules(model_cfg), tensors, param_shapes(model), tied=_tied_aliases(model_cfg)))


def load_llama(model, tensors: Mapping[str, np.ndarray], model_cfg) -> None:
  """The LM of a `LlamaForCausalLM`; cross-attention and added rows keep their fresh initialisation."""
  rules = lm_rules(model_cfg.lm, cross_attention=False, added_vocab=False)
  assign(model, convert(rules, tensors, param_shapes(model), tied=_tied_aliases(model_cfg)))


def load_clip_vision(model, tensors: Mapping[str, np.ndarray]) -> None:
  """A `CLIPVisionModel` (or the vision half of a `CLIPModel`) into the vision tower.

  Checkpoint files name the tower `vision_model.*`; transformers 5's in-memory `CLIPVisionModel` drops
  that prefix. Both are accepted.
  """
  prefix = 'vision_model.' if any(name.startswith('vision_model.') for name in tensors) else ''
  ignore = lambda name: not name.startswith(prefix)  # the text half and projections of a CLIPModel
  assign(model, convert(vision_rules(prefix), tensors, param_shapes(model), ignore=ignore))


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------

def _rope_theta(hf_cfg) -> float:
  params = getattr(hf_cfg, 'rope_parameters', None) or {}
  return float(params.get('rope_theta', getattr(hf_cfg, 'rope_theta', 10000.0)))


def update_vision_config(model_cfg, hf_vision) -> None:
  width = getattr(hf_vision, 'embed_dim', None) or hf_vision.hidden_size
  model_cfg.vision.update(
      image_size=hf_vision.image_size, patch_size=hf_vision.patch_size, channels=hf_vision.num_channels,
      width=width, depth=hf_vision.num_hidden_layers, mlp_dim=hf_vision.intermediate_size,
      num_heads=hf_vision.num_attention_heads, act=hf_vision.hidden_act, norm_eps=hf_vision.layer_norm_eps)


def update_llama_config(model_cfg, hf_llama) -> None:
  for flag in ('attention_bias', 'mlp_bias'):
    if getattr(hf_llama, flag, False):
      raise MappingError(f'Llama config has {flag}=True, which this model does not support')
  head_dim = getattr(hf_llama, 'head_dim', None) or hf_llama.hidden_size // hf_llama.num_attention_heads
  if head_dim * hf_llama.num_attention_heads != hf_llama.hidden_size:
    raise MappingError(f'Llama head_dim={head_dim} x heads != hidden_size={hf_llama.hidden_size}')
  model_cfg.lm.update(
      vocab_size=hf_llama.vocab_size, width=hf_llama.hidden_size, mlp_dim=hf_llama.intermediate_size,
      num_layers=hf_llama.num_hidden_layers, num_heads=hf_llama.num_attention_heads,
      num_kv_heads=getattr(hf_llama, 'num_key_value_heads', None) or hf_llama.num_attention_heads,
      rope_theta=_rope_theta(hf_llama), norm_eps=hf_llama.rms_norm_eps,
      tie_embeddings=bool(hf_llama.tie_word_embeddings))


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
      rope_theta=_rope_theta(hf_cfg), norm_eps=hf_cfg.rms_norm_eps,
      tie_embeddings=bool(hf_cfg.tie_word_embeddings), cross_attn_every=hf_cfg.cross_layer_interval,
      alpha_type=hf_cfg.alpha_type, qk_norm=bool(hf_cfg.qk_layer_norms))
  return model_cfg
