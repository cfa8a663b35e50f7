"""Run our model and its Hugging Face export on the same inputs and say how far apart they are.

  python -m unimp_jax.hf.verify --checkpoint WORKDIR --hf DIR [--long 512] [--dtype float32]

DIR is what `python -m unimp_jax.hf.export` wrote from WORKDIR (IDEFICS, or the LM alone). Inputs:
`short` = real evaluation prompts of test users (recommendation and preference, with their pictures),
`long` = a >= `--long`-token prompt with several pictures, its first row right-padded over its last quarter.
Printed per input, over real (unpadded) tokens: max |logit difference|, KL(ours || theirs) mean and max
(nats), and top-1 / top-5 agreement (fraction of positions whose top-k token sets are equal); then
whether 20 greedy tokens are the same in both. Exits non-zero when a difference exceeds `--atol` or the
greedy tokens differ. Needs PyTorch (`pip install -e '.[hf]'`).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

from unimp_jax.data import pipeline, splits
from unimp_jax.eval import generate
from unimp_jax.hf import files
from unimp_jax.model import unimp, vision


def load_hf(directory: str, dtype: str = 'float32'):
  """The exported model in transformers, refusing any missing, unexpected or mis-shaped tensor."""
  import torch
  import transformers
  architecture = files.read_json(directory)['architectures'][0]
  model, info = getattr(transformers, architecture).from_pretrained(
      directory, output_loading_info=True, dtype=getattr(torch, dtype), local_files_only=True)
  problems = {k: v for k, v in info.items() if v}
  if problems:
    raise files.CheckpointError(f'transformers loaded {directory} with {problems}')
  return model.eval()


def hf_logits(model, tokens, images, mask, model_cfg) -> np.ndarray:
  """transformers' logits [B, T, V] (float64 numpy); `images` normalised floats [B, N, H, W, C] or None;
  `model_cfg` our model's config (which token is `<image>`, which pictures a token sees)."""
  import torch
  kwargs = dict(input_ids=torch.from_numpy(np.asarray(tokens, np.int64)),
                attention_mask=torch.from_numpy(np.asarray(mask, np.int64)))
  if images is not None:
    dtype = next(model.parameters()).dtype
    media = unimp.media_index(tokens, model_cfg.image_token_id)
    image_mask = np.asarray(unimp.cross_attention_mask(media, images.shape[1], 1, model_cfg.lm.media_mask))
    kwargs.update(pixel_values=torch.from_numpy(np.ascontiguousarray(np.asarray(images).transpose(0, 1, 4, 2, 3))).to(dtype),
                  image_attention_mask=torch.from_numpy(image_mask.astype(np.int64)))
  with torch.no_grad():
    return model(**kwargs).logits.double().numpy()


def compare(ours: np.ndarray, theirs: np.ndarray, mask: np.ndarray) -> dict[str, float]:
  """Differences over the real positions of [B, T, V] logits."""
  a, b = np.asarray(ours, np.float64)[mask], np.asarray(theirs, np.float64)[mask]
  log_p = a - np.logaddexp.reduce(a, axis=-1, keepdims=True)
  log_q = b - np.logaddexp.reduce(b, axis=-1, keepdims=True)
  kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
  top = lambda x, k: np.sort(np.argsort(-x, axis=-1, kind='stable')[:, :k], axis=-1)
  return {'max_abs_diff': float(np.abs(a - b).max()), 'kl_mean': float(kl.mean()), 'kl_max': float(kl.max()),
          'top1_agreement': float((top(a, 1) == top(b, 1)).all(-1).mean()),
          'top5_agreement': float((top(a, 5) == top(b, 5)).all(-1).mean())}


def hf_greedy(model, tokens, images, prompt_length: int, model_cfg, steps: int) -> np.ndarray:
  """`steps` greedy tokens from transformers, one full forward per token (no cache: nothing shared with ours)."""
  sequence = np.asarray(tokens)[:, :prompt_length]
  out = []
  for _ in range(steps):
    logits = hf_logits(model, sequence, images, np.ones(sequence.shape, bool), model_cfg)
    out.append(logits[:, -1].argmax(-1))
    sequence = np.concatenate([sequence, out[-1][:, None]], axis=1)
  return np.stack(out, 1)


def our_greedy(graphdef, params, tokens, images, prompt_length: int, pad_id: int, steps: int) -> np.ndarray:
  """`steps` greedy tokens from our KV-cache generation (never stopping early: eos_id=-1)."""
  prompt = np.asarray(tokens)[:, :prompt_length]
  lengths = np.full(len(prompt), prompt_length, np.int32)
  return np.asarray(generate.sample(graphdef, params, prompt, images, lengths, jax.random.key(0), max_new=steps,
                                    pad_id=pad_id, eos_id=-1))


def inputs(builder, *, long: int, uses_images: bool, seed: int = 0):
  """{'short': ..., 'long': ...}: (tokens [B, T], normalised images [B, N, H, W, C] or None, mask [B, T])."""
  rng = np.random.default_rng(seed)
  dataset = builder.dataset
  users = splits.split_users(dataset, 'by_user', 'test')[:2]
  examples = []
  for task in ('recommendation', 'preference'):
    for u in users:
      user = dataset.user(int(u))
      examples.append(builder.build(task, user, len(user.interactions) - 1, with_answer=False))
  length = max(e.prompt_length for e in examples)
  tokens = np.stack([e.tokens[:length] for e in examples])
  pictures = np.stack([pipeline.gather_images(dataset, e.image_items) for e in examples])
  short = (tokens, pictures, tokens != builder.pad)

  # A long prompt: item chunks of random catalogue items until `long` tokens, pictures in every slot.
  num_images = builder.num_images
  rows = []
  for _ in range(2):
    pieces, shown = [], []
    while sum(map(len, pieces)) < long:
      item = int(rng.integers(len(dataset.items)))
      chunk, image = builder.chunk(item, list(builder.item_tokens[item]))
      if image is not None:
        if len(shown) == num_images:
          chunk = chunk[1:]  # no slot left: the item's text without its `<image>`
        else:
          shown.append(image)
      pieces.append(chunk)
    rows.append((np.concatenate(pieces)[:long], shown))
  tokens = np.stack([r[0] for r in rows])
  mask = np.ones(tokens.shape, bool)
  mask[0, long - long // 4:] = False
  tokens[~mask] = builder.pad
  pictures = np.stack([pipeline.gather_images(dataset, np.asarray(r[1] + [-1] * (num_images - len(r[1]))))
                       for r in rows])
  normalise = lambda p: np.asarray(vision.normalize(p)) if uses_images else None
  return {'short': (short[0], normalise(short[1]), short[2]), 'long': (tokens, normalise(pictures), mask)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True, help='The run directory the export came from.')
  parser.add_argument('--hf', required=True, help='The exported Hugging Face directory.')
  parser.add_argument('--step', type=int, default=None)
  parser.add_argument('--long', type=int, default=512, help='Tokens of the long prompt.')
  parser.add_argument('--dtype', default='float32', help="transformers' dtype: float32 or float64.")
  parser.add_argument('--atol', type=float, default=1e-3)
  parser.add_argument('--greedy', type=int, default=20, help='Greedy tokens compared (0: skip).')
  args = parser.parse_args(argv)
  from unimp_jax import runs
  from unimp_jax.eval.predictor import Predictor
  from unimp_jax.hf import export
  workdir = export.run_directory(args.checkpoint)
  lm_only = files.read_json(args.hf)['architectures'][0] != 'IdeficsForVisionText2Text'
  if not lm_only:  # before anything is loaded
    export.refuse_idefics_without_pictures(runs.saved_config(workdir, args.step).data.item_content)
  predictor = Predictor.from_workdir(workdir, args.step)
  hf = load_hf(args.hf, args.dtype)
  cfg, builder = predictor.cfg, predictor.builder
  uses_images = builder.uses_images and not lm_only
  forward = unimp.jit_forward(predictor.graphdef)
  ok = True
  print(f'{args.hf} ({hf.config.architectures[0]}, transformers in {args.dtype}) vs {args.checkpoint}')
  for name, (tokens, images, mask) in inputs(builder, long=args.long, uses_images=uses_images).items():
    ours = np.asarray(forward(predictor.params, tokens, images, mask))
    result = compare(ours, hf_logits(hf, tokens, images, mask, cfg.model), mask)
    ok &= result['max_abs_diff'] <= args.atol
    print(f'  {name:5s} {tokens.shape[0]} x {tokens.shape[1]} tokens, {0 if images is None else images.shape[1]} '
          'image slots: ' + ', '.join(f'{k} {v:.3g}' for k, v in result.items()))
    if name == 'short' and args.greedy:
      length = int(mask.sum(1).min())  # the shortest prompt, so that no row carries padding
      a = our_greedy(predictor.graphdef, predictor.params, tokens, images, length, builder.pad, args.greedy)
      b = hf_greedy(hf, tokens, images, length, cfg.model, args.greedy)
      same = bool(np.array_equal(a, b))
      ok &= same
      print(f'  greedy {args.greedy} tokens from a {length}-token prompt: {"same" if same else "DIFFERENT"} '
            f'in both ({(a == b).mean():.0%} of tokens agree)')
  print('OK' if ok else f'FAILED (atol {args.atol})')
  return 0 if ok else 1


if __name__ == '__main__':
  os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
  sys.exit(main())
