"""small (SPEC §7): the CPU benchmark size, compared against transformers' IDEFICS at equal dimensions."""

from unimp_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.model.vision.update(image_size=64, patch_size=8, width=256, depth=4, mlp_dim=1024, num_heads=4)
  c.model.connector.update(num_latents=32, depth=2, num_heads=8, head_dim=32)
  c.model.lm.update(vocab_size=8192, width=512, mlp_dim=1408, num_layers=8, num_heads=8, num_kv_heads=8,
                    cross_attn_every=2)
  c.data.seq_len = 256
  c.data.path = 'data/generated/fashion-64px'  # pictures stored at the tower's 64 px
  return c
