"""Paper-scale presets: a ViT-L/14 (224 px) tower, 64 perceiver latents and a Llama-family LM.

  --config configs/paper.py:1b   Llama-3.2-1B shape, cross-attention every layer
  --config configs/paper.py:3b   Llama-3.2-3B shape, every 2 layers ("OpenFlamingo-4B" class; paper default)
  --config configs/paper.py:7b   Llama-2-7B shape, every 4 layers ("9B" class)

Parameters are float32 (the optimizer's master copy), compute is bfloat16, and each scanned block is
rematerialised. Load pretrained towers rather than training these from scratch.
"""

from unimp_jax import config as config_lib

# Llama 3.2's rotary scaling (its config.json `rope_scaling`), which the 1b and 3b checkpoints were trained with.
LLAMA32_ROPE = dict(type='llama3', factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
LMS = {
    '1b': dict(vocab_size=128256, width=2048, mlp_dim=8192, num_layers=16, num_heads=32, num_kv_heads=8,
               rope_theta=500000.0, rope_scaling=LLAMA32_ROPE, norm_eps=1e-5, tie_embeddings=True, cross_attn_every=1),
    '3b': dict(vocab_size=128256, width=3072, mlp_dim=8192, num_layers=28, num_heads=24, num_kv_heads=8,
               rope_theta=500000.0, rope_scaling=LLAMA32_ROPE, norm_eps=1e-5, tie_embeddings=True, cross_attn_every=2),
    '7b': dict(vocab_size=32000, width=4096, mlp_dim=11008, num_layers=32, num_heads=32, num_kv_heads=32,
               rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False, cross_attn_every=4),
}


def get_config(arg='3b'):
  if arg not in LMS:
    raise ValueError(f'configs/paper.py:{arg}: unknown preset; choose one of {sorted(LMS)}')
  c = config_lib.base_config()
  c.model.update(dtype='bfloat16', param_dtype='float32', remat='full')
  c.model.vision.update(image_size=224, patch_size=14, width=1024, depth=24, mlp_dim=4096, num_heads=16,
                        act='quick_gelu')
  c.model.connector.update(num_latents=64, depth=6, num_heads=16, head_dim=64)
  c.model.lm.update(**LMS[arg])
  # One row per item, as the paper: content rows (tiny's default) run the ViT-L over the whole catalogue
  # every step; at this scale precompute item embeddings instead (data.item_ids=semantic).
  c.model.item_embeddings = 'learned'
  c.mesh.update(data=1, fsdp=-1)
  # Ten 224 px pictures per example are decoded and batched by Grain worker processes (per host), beside the step.
  c.data.update(batch_size=48, seq_len=1024, num_images=10, workers=8)
  # With data.item_ids=semantic: TIGER's 3 levels of 256 codes (+ the collision level) for real catalogues.
  c.data.semantic.update(levels=3, codebook=256, max_collisions=64)
  # The paper's recipe: AdamW 2e-4, cosine with 1% warm-up, clip 1.0, weight decay 0.1 on cross-attention
  # weights; vision tower and LM blocks frozen; perceiver, cross-attention, embeddings and head rows of the
  # added vocabulary trained.
  c.train.update(learning_rate=2e-4, freeze_patterns=(r'^vision/', r'^lm/groups/layers/', r'^lm/norm/', r'^lm/head$'))
  return c
