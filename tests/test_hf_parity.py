"""Numerical parity with transformers' PyTorch reference modules (fp32, max abs difference <= 1e-4).

Each test builds a tiny randomly initialised HF model, perturbs every parameter (so zero-initialised
biases, unit norms and zero gates are exercised too), loads its state dict into our model through the
explicit mapping in `unimp_jax.hf.mapping`, and compares outputs on the same inputs, including a batch
with right padding and a prompt of >= 256 tokens with several images (short prompts hide rotary bugs).

Our model runs in float32. The reference runs the same float32-representable weights in float64, so
the tolerance measures our error alone, not the sum of two float32 errors (typically ~5e-6 here).
"""

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip('torch', reason='parity tests need the `hf` extra (torch==2.13.0)')
transformers = pytest.importorskip('transformers')

from unimp_jax import config as config_lib  # noqa: E402
from unimp_jax.hf import mapping  # noqa: E402
from unimp_jax.model import unimp  # noqa: E402
from unimp_jax.sharding import mesh as mesh_lib  # noqa: E402

TOL = 1e-4

# The reference runs single-threaded without oneDNN: in this suite's CI, transformers' multi-threaded
# CPU path once returned logits off by ~1e-4 (ours matched the value it gives on every other run).
torch.set_num_threads(1)
torch.backends.mkldnn.enabled = False


def _perturb(model, seed=0):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return model.double().eval()


def _tensors(model):
  return {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}


def _ours(model_cfg):
  cfg = config_lib.base_config()
  mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1])  # numerics, not sharding: one device is enough
  return unimp.create_sharded(model_cfg, mesh, cfg.mesh.rules)


def _forward(model, tokens, images=None, mask=None):
  graphdef, state = nnx.split(model)
  return np.asarray(unimp.jit_forward(graphdef)(state, tokens, images, mask))


def _prompt(rng, batch, length, vocab, image_id, images_per_row):
  """Random text with `<image>` tokens; row 0 is right-padded over its last quarter."""
  tokens = rng.integers(0, vocab, (batch, length))
  for row, n in enumerate(images_per_row):
    starts = np.sort(rng.choice(np.arange(1, length - 1), n, replace=False))
    tokens[row, starts] = image_id
  mask = np.ones((batch, length), bool)
  mask[0, length - length // 4:] = False
  return tokens, mask


def test_clip_vision_parity():
  hf_cfg = transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=32, patch_size=8)
  torch.manual_seed(0)
  hf = _perturb(transformers.CLIPVisionModel(hf_cfg))
  model_cfg = config_lib.base_config().model
  mapping.update_vision_config(model_cfg, hf_cfg)
  assert model_cfg.vision.act == 'quick_gelu'
  model = _ours(model_cfg)
  mapping.load_clip_vision(model, _tensors(hf), model_cfg)

  images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    out = hf(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)).double())
  tokens, pooled = jax.jit(lambda m, x: m.vision(x))(model, images)
  np.testing.assert_allclose(tokens, out.last_hidden_state.numpy(), atol=TOL, rtol=0)
  np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize('kv_heads,tied,theta', [(4, False, 10000.0), (2, True, 500000.0)])
def test_llama_parity(kv_heads, tied, theta):
  hf_cfg = transformers.LlamaConfig(
      vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
      num_key_value_heads=kv_heads, tie_word_embeddings=tied, max_position_embeddings=1024,
      rope_parameters={'rope_type': 'default', 'rope_theta': theta}, attn_implementation='eager')
  torch.manual_seed(1)
  hf = _perturb(transformers.LlamaForCausalLM(hf_cfg))
  model_cfg = config_lib.base_config().model
  mapping.update_llama_config(model_cfg, hf_cfg)
  assert (model_cfg.lm.num_kv_heads, model_cfg.lm.rope_theta) == (kv_heads, theta)
  model = _ours(model_cfg)
  mapping.load_llama(model, _tensors(hf), model_cfg)

  tokens, mask = _prompt(np.random.default_rng(1), 2, 300, 512, 0, [0, 0])
  with torch.no_grad():
    expected = hf(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask)).logits.numpy()
  logits = _forward(model, tokens, None, mask)[..., :512]
  np.testing.assert_allclose(logits[mask], expected[mask], atol=TOL, rtol=0)


def _idefics(qk_norm: bool, interval: int, tied: bool, alpha_type: str, media: str, seed: int):
  hf_cfg = transformers.IdeficsConfig(
      vocab_size=384, additional_vocab_size=8, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
      num_attention_heads=4, cross_layer_interval=interval, qk_layer_norms=qk_norm, alpha_type=alpha_type,
      tie_word_embeddings=tied, use_resampler=True, max_position_embeddings=1024,
      vision_config=dict(embed_dim=32, image_size=16, patch_size=4, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4),
      perceiver_config=dict(use_resampler=True, resampler_n_latents=4, resampler_depth=2, resampler_n_heads=2,
                            resampler_head_dim=8, qk_layer_norms_perceiver=qk_norm),
      attn_implementation='eager')
  torch.manual_seed(seed)
  hf = _perturb(transformers.IdeficsForVisionText2Text(hf_cfg), seed)
  model_cfg = mapping.model_config_from_idefics(hf_cfg)
  model_cfg.lm.media_mask = media
  model = _ours(model_cfg)
  mapping.load_idefics(model, _tensors(hf), model_cfg)
  return hf, model, model_cfg


def _idefics_logits(hf, tokens, images, mask, image_mask_btn):
  with torch.no_grad():
    return hf(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask),
              pixel_values=torch.from_numpy(images.transpose(0, 1, 4, 2, 3)).double(),
              image_attention_mask=torch.from_numpy(image_mask_btn.astype(np.int64))).logits.numpy()


@pytest.mark.parametrize('qk_norm,interval,tied,alpha_type,media', [
    (False, 1, False, 'float', 'previous'),
    (True, 2, True, 'vector', 'previous'),
    (True, 1, False, 'vector', 'all'),
])
def test_idefics_parity(qk_norm, interval, tied, alpha_type, media):
  hf, model, model_cfg = _idefics(qk_norm, interval, tied, alpha_type, media, seed=2)
  rng = np.random.default_rng(2)
  num_images = 4
  tokens, mask = _prompt(rng, 2, 288, 384, model_cfg.image_token_id, [num_images, 2])
  images = rng.normal(size=(2, num_images, 16, 16, 3)).astype(np.float32)
  media_bt = unimp.media_index(tokens, model_cfg.image_token_id)
  image_mask_btn = np.asarray(unimp.cross_attention_mask(media_bt, num_images, 1, media))

  expected = _idefics_logits(hf, tokens, images, mask, image_mask_btn)
  logits = _forward(model, tokens, images, mask)
  assert logits.shape == expected.shape == (2, 288, 384 + 8)
  np.testing.assert_allclose(logits[mask], expected[mask], atol=TOL, rtol=0)


def test_checkpoint_problems_name_the_tensor():
  hf_cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, tie_word_embeddings=False)
  tensors = _tensors(transformers.LlamaForCausalLM(hf_cfg))
  model_cfg = config_lib.base_config().model
  mapping.update_llama_config(model_cfg, hf_cfg)
  model = _ours(model_cfg)
  initial = np.asarray(model.lm.embed[...])

  missing = {k: v for k, v in tensors.items() if k != 'model.layers.1.mlp.up_proj.weight'}
  with pytest.raises(mapping.MappingError, match=r"no tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
    mapping.load_llama(model, missing, model_cfg)
  with pytest.raises(mapping.MappingError, match=r"'model\.layers\.0\.self_attn\.rotary\.extra' has no place"):
    mapping.load_llama(model, {**tensors, 'model.layers.0.self_attn.rotary.extra': np.zeros(3)}, model_cfg)
  wrong = dict(tensors, **{'model.embed_tokens.weight': np.zeros((300, 32), np.float32)})
  with pytest.raises(mapping.MappingError, match=r"'model\.embed_tokens\.weight' gives shape \(300, 32\)"):
    mapping.load_llama(model, wrong, model_cfg)
  np.testing.assert_array_equal(np.asarray(model.lm.embed[...]), initial)  # failed loads change nothing
  mapping.load_llama(model, tensors, model_cfg)
  np.testing.assert_array_equal(np.asarray(model.lm.embed[...]), tensors['model.embed_tokens.weight'])
