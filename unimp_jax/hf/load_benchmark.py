"""Peak host memory of importing a ~1B-parameter Llama checkpoint: streamed vs read-everything-first.

  python -m unimp_jax.hf.load_benchmark --dir /tmp/llama-1b [--layers 18]

Writes a randomly initialised Llama checkpoint (bfloat16, sharded safetensors + index, one shard in memory at
a time) unless DIR already holds one, then imports it twice, each in a fresh process on the CPU:

  streamed   unimp_jax.hf.mapping.load_llama over files.Checkpoint: tensors read one parameter at a time
  baseline   every tensor read into a dict first (safetensors' load_file per shard), then the same mapping

and prints each process's peak resident memory during the import (Linux VmHWM, reset after the model is
created) next to the model's size (float32 parameters, resident throughout: on a CPU the device memory is
host memory). Both create the same model, so the difference is what holding the checkpoint costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

ARCH = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_attention_heads=16,
            num_key_value_heads=8, rms_norm_eps=1e-5, tie_word_embeddings=False, model_type='llama',
            architectures=['LlamaForCausalLM'], rope_theta=10000.0, max_position_embeddings=2048)


def write_random_llama(directory: str, layers: int, seed: int = 0) -> int:
  """A random Llama checkpoint in HF layout; returns its parameter count."""
  import ml_dtypes
  from unimp_jax.hf import files
  arch = dict(ARCH, num_hidden_layers=layers)
  d, f, v = arch['hidden_size'], arch['intermediate_size'], arch['vocab_size']
  kv = d // arch['num_attention_heads'] * arch['num_key_value_heads']
  shapes = {'model.embed_tokens.weight': (v, d), 'model.norm.weight': (d,), 'lm_head.weight': (v, d)}
  for i in range(layers):
    p = f'model.layers.{i}.'
    shapes.update({p + 'self_attn.q_proj.weight': (d, d), p + 'self_attn.k_proj.weight': (kv, d),
                   p + 'self_attn.v_proj.weight': (kv, d), p + 'self_attn.o_proj.weight': (d, d),
                   p + 'mlp.gate_proj.weight': (f, d), p + 'mlp.up_proj.weight': (f, d),
                   p + 'mlp.down_proj.weight': (d, f), p + 'input_layernorm.weight': (d,),
                   p + 'post_attention_layernorm.weight': (d,)})
  rng = np.random.default_rng(seed)
  tensors = ((name, (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16))
             for name, shape in shapes.items())
  os.makedirs(directory, exist_ok=True)
  files.write_sharded(directory, tensors, max_shard_bytes=500 * 10**6)
  with open(os.path.join(directory, 'config.json'), 'w') as out:
    json.dump(arch, out, indent=2)
  return sum(int(np.prod(s)) for s in shapes.values())


def _import(directory: str, mode: str) -> None:
  """The child process: build the model the checkpoint describes, import it, print a JSON line."""
  import jax
  from flax import nnx
  from transformers import AutoConfig

  from unimp_jax import config as config_lib
  from unimp_jax.hf import files, mapping, pretrained
  from unimp_jax.model import unimp
  from unimp_jax.sharding import mesh as mesh_lib
  cfg = config_lib.base_config()
  mapping.update_llama_config(cfg.model, AutoConfig.from_pretrained(directory, local_files_only=True))
  mesh = mesh_lib.make_mesh(cfg.mesh)
  model = unimp.create_sharded(cfg.model, mesh, cfg.mesh.rules)
  model_bytes = sum(x.nbytes for x in jax.tree.leaves(jax.block_until_ready(nnx.state(model, nnx.Param))))
  created = pretrained.peak_host_bytes()  # random initialisation's own peak, before the window below
  if not pretrained.reset_peak_host_bytes():
    raise SystemExit('this benchmark needs Linux /proc/self/clear_refs to measure the import on its own')
  if mode == 'streamed':
    tensors = files.Checkpoint(directory)
  else:
    from safetensors.numpy import load_file
    tensors = {}
    for name in sorted(os.listdir(directory)):
      if name.endswith('.safetensors'):
        tensors.update(load_file(os.path.join(directory, name)))
  mapping.load_llama(model, tensors, cfg.model)
  jax.block_until_ready(nnx.state(model))
  print(json.dumps(dict(mode=mode, model_bytes=model_bytes, peak_creating=created, peak=pretrained.peak_host_bytes())))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--dir', required=True)
  parser.add_argument('--layers', type=int, default=18, help='18 layers: 0.98B parameters.')
  parser.add_argument('--child', choices=('streamed', 'baseline'), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    return _import(args.dir, args.child)
  if not os.path.exists(os.path.join(args.dir, 'config.json')):
    count = write_random_llama(args.dir, args.layers)
    print(f'wrote {args.dir}: random Llama, {count / 1e9:.2f}B parameters in bfloat16')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one CPU device
  results = {}
  for mode in ('streamed', 'baseline'):
    out = subprocess.run([sys.executable, '-m', 'unimp_jax.hf.load_benchmark', '--dir', args.dir, '--child', mode],
                         env=env, capture_output=True, text=True, check=True).stdout
    results[mode] = json.loads(out.strip().splitlines()[-1])
  gib = 2**30
  model = results['streamed']['model_bytes']
  print(f'model parameters (float32): {model / gib:.2f} GiB')
  for mode, r in results.items():
    print(f'{mode:9s} peak host memory while importing {r["peak"] / gib:.2f} GiB = {r["peak"] / model:.2f} x the '
          f'model (peak while creating it, before: {r["peak_creating"] / gib:.2f} GiB)')
  print(f'baseline / streamed peak: {results["baseline"]["peak"] / results["streamed"]["peak"]:.2f}x')


if __name__ == '__main__':
  main()
