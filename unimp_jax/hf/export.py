"""Export a trained UniMP to a Hugging Face directory that transformers loads.

  python -m unimp_jax.hf.export --checkpoint WORKDIR --out DIR [--lm_only] [--step N] [--max_shard_size 2GB]
      [--dtype float32|bfloat16]

WORKDIR is a main-job or benchmark run directory (its `checkpoints/`, or that directory itself). Writes

  config.json                         IdeficsConfig: base vocabulary + `additional_vocab_size` added tokens
  model-0000k-of-0000N.safetensors    the weights (HF names and layouts, unimp_jax.hf.mapping), sharded
  model.safetensors.index.json
  tokenizer.json, tokenizer_config.json ...   the run's tokenizer, every added token at its id
  processor_config.json, preprocessor_config.json   (IDEFICS) `AutoProcessor`: the tokenizer and an image
                                      processor that resizes and normalises pictures as the model was trained
  generation_config.json              pad / bos / eos ids, greedy
  README.md                           a model card: what the model was trained on and how to prompt it

for `IdeficsForVisionText2Text.from_pretrained(DIR)`, or with `--lm_only` the language model alone as
`LlamaForCausalLM` (`Qwen2ForCausalLM` when it has q/k/v biases) with the added tokens as ordinary rows after
the base vocabulary. Nothing is padded for sharding in this codebase (every array has its logical size), so
there is nothing to trim. The directory is written beside DIR and renamed into place: a failed export leaves
no half-written DIR.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax.nnx import traversals

from unimp_jax import tasks
from unimp_jax.hf import files, mapping
from unimp_jax.model import vision

_UNITS = {'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'KIB': 2**10, 'MIB': 2**20, 'GIB': 2**30, 'B': 1}


def parse_size(text: str) -> int:
  """'2GB', '500MiB', '4096' -> bytes."""
  upper = text.strip().upper()
  for unit in sorted(_UNITS, key=len, reverse=True):
    if upper.endswith(unit):
      return int(float(upper[:-len(unit)]) * _UNITS[unit])
  return int(upper)


def run_directory(checkpoint: str) -> str:
  """The run directory of `checkpoint` (a run directory or its `checkpoints/`)."""
  checkpoint = os.path.normpath(checkpoint)
  return os.path.dirname(checkpoint) if os.path.basename(checkpoint) == 'checkpoints' else checkpoint


DTYPES = ('float32', 'bfloat16')


def hf_config(model_cfg, tokenizer, *, lm_only: bool, dtype: str = 'float32'):
  """The transformers config object of the export (`dtype`: what its weights are stored in)."""
  import transformers
  special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                 eos_token_id=tokenizer.eos_token_id)
  if lm_only:
    kwargs = mapping.causal_lm_config(model_cfg, **special)
    model_type = kwargs.pop('model_type')
    config = (transformers.Qwen2Config if model_type == 'qwen2' else transformers.LlamaConfig)(**kwargs)
    config.architectures = ['Qwen2ForCausalLM' if model_type == 'qwen2' else 'LlamaForCausalLM']
  else:
    config = transformers.IdeficsConfig(**mapping.idefics_config(model_cfg, **special))
    config.architectures = ['IdeficsForVisionText2Text']
  config.dtype = dtype
  return config


def processor(model_cfg, tokenizer):
  """An `IdeficsProcessor`: the tokenizer, and pictures resized to the tower's size and normalised with
  CLIP's statistics, exactly as training normalised them (unimp_jax.model.vision.normalize)."""
  import transformers
  size = model_cfg.vision.image_size
  # The PIL implementation needs no torchvision; it saves itself as `IdeficsImageProcessor`.
  images = transformers.IdeficsImageProcessorPil(image_size=size, image_mean=list(vision.PIXEL_MEAN),
                                                 image_std=list(vision.PIXEL_STD))
  return transformers.IdeficsProcessor(images, tokenizer, image_size=size)


def refuse_idefics_without_pictures(item_content: str) -> None:
  """A run that never saw a picture runs its LM alone: `images=None` skips the gated cross-attention blocks
  (model.lm), so they are never trained. IDEFICS runs every gated block's MLP half on every token, picture
  or not (its gate only zeroes the attention half), and needs picture inputs: such a run is exported, and
  agrees with transformers, as the LM alone."""
  if item_content != 'image+text':
    raise mapping.MappingError(f"this run never read pictures (data.item_content={item_content!r}), so its "
                               'gated cross-attention blocks are untrained and IDEFICS would run them; export the '
                               'LM alone (--lm_only)')


def hf_tensors(model_cfg, params, *, lm_only: bool, dtype: str = 'float32'):
  """(HF name, array) pairs for our params (a nested pure dict); a parameter without an HF name is an error.

  With content item rows the params must be the Predictor's, whose item rows hold the content rows: the
  item encoder that made them (`items/...`) is then not needed by the exported model and stays behind."""
  flat = {k: v for k, v in traversals.flatten_mapping(params).items() if k[0] != 'items'}
  if lm_only:  # the added rows join the base ones; the towers and the cross-attention stay behind
    rules, flat = mapping.causal_lm_rules(model_cfg.lm), mapping.causal_lm_params(flat, model_cfg.lm)
    flat = {k: v for k, v in flat.items() if k[0] == 'lm' and k[:3] != ('lm', 'groups', 'cross')
            and k[1] not in ('added_embed', 'added_head')}
  else:
    rules = mapping.idefics_rules(model_cfg)
  lost = sorted(set(flat) - {r.path for r in rules})
  if lost:
    raise mapping.MappingError(f'parameter {"/".join(lost[0])} has no Hugging Face name; the export would lose it')
  cast = np.dtype(jnp.bfloat16) if dtype == 'bfloat16' else np.dtype(np.float32)
  return ((name, array.astype(cast, copy=False) if np.issubdtype(array.dtype, np.floating) else array)
          for name, array in mapping.export(rules, flat))


def model_card(cfg, dataset, step: int, architecture: str, tokenizer) -> str:
  manifest = dataset.manifest
  layout = tokenizer.unimp_layout
  mixture = ', '.join(f'{t} {w:g}' for t, w in cfg.data.tasks.items() if w > 0)
  instructions = '\n'.join(f'- {name}: "{task.instruction}"' for name, task in tasks.TASKS.items()
                           if cfg.data.tasks[name] > 0)
  return f"""---
library_name: transformers
tags: [unimp, recommendation, idefics, jax]
---

# UniMP ({architecture}), exported from unimp_jax

A UniMP model (vision encoder, perceiver resampler, gated cross-attention, Llama decoder) trained with
unimp_jax (JAX / Flax NNX) and exported by `python -m unimp_jax.hf.export` at training step {step}.

## Training data

- dataset: `{manifest.get('name', 'unknown')}` ({dataset.path}), {manifest.get('counts', {})}
- split: {cfg.data.split}; history of at most {cfg.data.history} items, {cfg.data.seq_len} tokens,
  {cfg.data.num_images} images of {cfg.model.vision.image_size} px
- task mixture: {mixture}; item ids: {cfg.data.item_ids}; item content: {cfg.data.item_content}
- {cfg.train.steps} steps of batch {cfg.data.batch_size}, learning rate {cfg.train.learning_rate}, focal gamma
  {cfg.train.focal_gamma}

## Prompts

Every prompt is a sequence of item chunks, then an instruction, then `<answer>`:

    <image> Category {{c}} Price {{p}} Brand {{b}} Title {{t}} <answer> {{item id}} <|endofchunk|> ...
    What is the next item recommended to the user? <answer>

Instructions (`{{query}}`: the search words):

{instructions}

The tokenizer's {len(tokenizer) - layout['base_vocab_size']} added tokens (`<image>`, `<|endofchunk|>`,
`<answer>`, ratings, slots, item ids) follow its base vocabulary of {layout['base_vocab_size']}. The k-th
`<image>` of a row is image k of `pixel_values`; in `image_attention_mask` a token sees
{'only the most recent image' if cfg.model.lm.media_mask == 'previous' else 'every image'} at or before it
(`media_mask={cfg.model.lm.media_mask}`).

## Pictures

`pixel_values` are RGB pictures of {cfg.model.vision.image_size} x {cfg.model.vision.image_size} pixels, scaled
to [0, 1] and normalised with CLIP's statistics: mean {list(vision.PIXEL_MEAN)}, standard deviation
{list(vision.PIXEL_STD)} (per channel). The IDEFICS export's `AutoProcessor` does this; the dataset's pictures
were centre-cropped to a square before resizing.

```python
from transformers import {architecture}
model, info = {architecture}.from_pretrained(DIR, output_loading_info=True)
```
"""


def export(checkpoint: str, out: str, *, step: int | None = None, lm_only: bool = False,
           max_shard_bytes: int = 2 * 10**9, overwrite: bool = False, dtype: str = 'float32') -> str:
  from unimp_jax import runs
  from unimp_jax.eval.predictor import Predictor
  from transformers import GenerationConfig
  out = os.path.abspath(out)
  if dtype not in DTYPES:
    raise ValueError(f'--dtype {dtype}: choose one of {DTYPES}')
  if os.path.exists(out) and os.listdir(out) and not overwrite:
    raise FileExistsError(f'{out} exists and is not empty; pass --overwrite to replace it')
  workdir = run_directory(checkpoint)
  saved = runs.saved_config(workdir, step)  # what Hugging Face cannot hold fails here, before the weights
  model_cfg = saved.model
  if model_cfg.item_pool:
    raise mapping.MappingError('model.item_pool (the pooled user tower beside the LM) has no Hugging Face '
                               'equivalent; this run cannot be exported')
  if not lm_only:
    mapping.idefics_config(model_cfg)
    refuse_idefics_without_pictures(saved.data.item_content)
  predictor = Predictor.from_workdir(workdir, step)
  cfg, tokenizer = predictor.cfg, predictor.builder.tokenizer
  config = hf_config(cfg.model, tokenizer, lm_only=lm_only, dtype=dtype)
  params = jax.tree.map(np.asarray, jax.device_get(predictor.params))
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.', dir=parent)
  try:
    config.save_pretrained(tmp)
    shards = files.write_sharded(tmp, hf_tensors(cfg.model, params, lm_only=lm_only, dtype=dtype),
                                 max_shard_bytes=max_shard_bytes)
    (tokenizer if lm_only else processor(cfg.model, tokenizer)).save_pretrained(tmp)
    GenerationConfig(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, do_sample=False).save_pretrained(tmp)
    with open(os.path.join(tmp, 'README.md'), 'w') as f:
      f.write(model_card(cfg, predictor.dataset, predictor.step, config.architectures[0], tokenizer))
    if os.path.exists(out):
      shutil.rmtree(out)
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  print(f'wrote {out}: {config.architectures[0]}, step {predictor.step}, {shards} shard(s)')
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True, help='A run directory (or its checkpoints/).')
  parser.add_argument('--out', required=True)
  parser.add_argument('--step', type=int, default=None,
                      help='Default: the step the run hands on (the best validated with eval.every, else the newest).')
  parser.add_argument('--lm_only', action='store_true', help='The language model alone (LlamaForCausalLM).')
  parser.add_argument('--max_shard_size', default='2GB')
  parser.add_argument('--overwrite', action='store_true')
  parser.add_argument('--dtype', choices=DTYPES, default='float32', help='What the weights are stored in.')
  args = parser.parse_args(argv)
  export(args.checkpoint, args.out, step=args.step, lm_only=args.lm_only,
         max_shard_bytes=parse_size(args.max_shard_size), overwrite=args.overwrite, dtype=args.dtype)


if __name__ == '__main__':
  main()
