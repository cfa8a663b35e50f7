"""Hugging Face import and export as a user runs them: files on disk, transformers on the other side.

Round trips JAX -> HF -> JAX must be bit-identical (fp32). Exported models are run in transformers'
PyTorch modules (float64, single-threaded: the independent reference, as in test_hf_parity.py) by the
verify tool, which must find logits within 1e-4 and the same 20 greedy tokens.
"""

import json
import os
import pickle

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from flax.nnx import traversals

from unimp_jax import config as config_lib, runs
from unimp_jax.data import datasets, formats, synthetic
from unimp_jax.hf import export, files, mapping, pretrained
from unimp_jax.model import unimp, vision
from unimp_jax.sharding import mesh as mesh_lib
from unimp_jax.train import checkpoint as checkpoint_lib


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('hf') / 'fashion')
  synthetic.build(path, num_items=40, num_users=30, seed=1, image_size=32, bpe_vocab=400)
  return path


def _model(cfg, seed=0):
  mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1])  # layouts, not sharding: one device is enough
  return unimp.create_sharded(cfg.model, mesh, cfg.mesh.rules, seed=seed)


def _config(data, every=2, qk_norm=False, tied=False, kv_heads=4):
  cfg = config_lib.base_config()
  cfg.data.path = data
  cfg.model.lm.update(cross_attn_every=every, qk_norm=qk_norm, tie_embeddings=tied, num_kv_heads=kv_heads)
  cfg.model.connector.qk_norm = qk_norm
  datasets.fit_model_to_dataset(cfg, formats.UnifiedDataset(data))
  return cfg


def _trained_run(tmp_path, cfg):
  """A run directory holding a checkpoint of a model whose every parameter is perturbed (open gates, norms
  away from 1), as a trained one would be."""
  rng = np.random.default_rng(7)
  params = jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype),
                        jax.device_get(nnx.to_pure_dict(nnx.state(_model(cfg)))))
  workdir = str(tmp_path / 'run')
  with checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), save_every=1, keep=1,
                                   async_save=False) as ckpt:
    ckpt.save(3, {'params': params}, config=cfg, force=True)
  return workdir, traversals.flatten_mapping(params)


ROUND_TRIPS = [  # cross-attention every, q/k norms, tied, kv heads, LM alone, run in transformers too
    (1, False, False, 4, False, False),
    (2, True, True, 4, False, True),
    (2, False, False, 2, True, True),   # GQA: IDEFICS cannot hold it, the LM alone can
    (1, True, True, 4, True, False),
]


@pytest.mark.parametrize('every,qk_norm,tied,kv_heads,lm_only,in_transformers', ROUND_TRIPS)
def test_export_round_trip_is_bit_identical(tmp_path, data, capsys, every, qk_norm, tied, kv_heads, lm_only,
                                            in_transformers):
  """JAX -> HF -> JAX gives every parameter back bit for bit (a GQA model's IDEFICS export is refused first,
  leaving nothing behind). `in_transformers`: the verify tool also runs
  the export in transformers and must find logits within 1e-4 on short prompts and a 512-token prompt with
  pictures and padding, and the same 20 greedy tokens (transformers without a cache, ours with)."""
  cfg = _config(data, every, qk_norm, tied, kv_heads)
  workdir, ours = _trained_run(tmp_path, cfg)
  out = str(tmp_path / 'hf')
  if kv_heads != cfg.model.lm.num_heads:  # IDEFICS cannot hold GQA: refused before anything is written
    with pytest.raises(mapping.MappingError, match='no grouped-query attention.*--lm_only'):
      export.export(workdir, out)
    assert os.listdir(tmp_path) == ['run']
  export.export(workdir, out, lm_only=lm_only, max_shard_bytes=400_000)

  with open(os.path.join(out, files.INDEX)) as f:
    shards = set(json.load(f)['weight_map'].values())
  assert len(shards) > 1 and all(os.path.exists(os.path.join(out, s)) for s in shards)
  hf_config = files.read_json(out)
  assert hf_config['architectures'] == (['LlamaForCausalLM'] if lm_only else ['IdeficsForVisionText2Text'])
  card = open(os.path.join(out, 'README.md')).read()
  assert 'fashion-synthetic' in card and 'step 3' in card and 'mean [0.48145466, 0.4578275, 0.40821073]' in card
  assert files.read_json(out, 'generation_config.json')['eos_token_id'] == 2
  if not lm_only:  # AutoProcessor loads, and normalises pictures as training did
    from transformers import AutoProcessor
    pictures = formats.UnifiedDataset(data).images(np.arange(3))
    pixels = np.asarray(AutoProcessor.from_pretrained(out, local_files_only=True).image_processor(
        list(pictures), return_tensors='np'))
    expected = np.asarray(vision.normalize(pictures)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(pixels, expected, atol=1e-5)

  from transformers import AutoConfig, AutoTokenizer
  tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
  ours_tokenizer = datasets.make_builder(cfg, formats.UnifiedDataset(data), workdir).tokenizer
  added = ours_tokenizer.get_added_vocab()
  assert len(added) > 40 and tokenizer.get_added_vocab() == added  # every added token, at its id
  assert len(tokenizer) == len(ours_tokenizer) == cfg.model.lm.vocab_size + cfg.model.lm.added_vocab_size

  back = _model(cfg, seed=1)  # other random values everywhere
  if lm_only:
    vocab = AutoConfig.from_pretrained(out, local_files_only=True).vocab_size
    assert vocab == cfg.model.lm.vocab_size + cfg.model.lm.added_vocab_size  # added tokens as ordinary rows
    mapping.load_llama(back, files.Checkpoint(out), cfg.model)
  else:  # as a run starting from it reads it: the architecture from its config.json, then the tensors
    start = config_lib.base_config()
    start.data.path, start.pretrained.idefics = data, out
    pretrained.fit_config(start, formats.UnifiedDataset(data))
    datasets.fit_model_to_dataset(start, formats.UnifiedDataset(data))
    assert start.model.to_dict() == cfg.model.to_dict()
    back = _model(start, seed=1)
    pretrained.load_pretrained(back, start)
  loaded = traversals.flatten_mapping(jax.device_get(nnx.to_pure_dict(nnx.state(back))))
  compared = [p for p in ours if not lm_only or (p[0] == 'lm' and p[:3] != ('lm', 'groups', 'cross'))]
  assert len(compared) > 10
  for path in compared:
    np.testing.assert_array_equal(loaded[path], ours[path], err_msg='/'.join(path))

  if in_transformers:
    _torch()
    from unimp_jax.hf import verify
    code = verify.main(['--checkpoint', workdir, '--hf', out, '--dtype', 'float64', '--atol', '1e-4'])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert 'greedy 20 tokens' in printed and 'same in both' in printed and '2 x 512 tokens' in printed
    assert ('0 image slots' in printed) == lm_only


def test_a_bfloat16_export_holds_each_weight_rounded_to_bfloat16(tmp_path, data):
  """`--dtype bfloat16`: every weight is the float32 export's, rounded to nearest (ml_dtypes, as numpy casts);
  the config says so, and transformers loads the weights as bfloat16."""
  workdir, _ = _trained_run(tmp_path, _config(data, 2, False, False, 4))
  export.main(['--checkpoint', workdir, '--out', str(tmp_path / 'f32')])
  export.main(['--checkpoint', workdir, '--out', str(tmp_path / 'bf16'), '--dtype', 'bfloat16'])
  full, half = files.Checkpoint(str(tmp_path / 'f32')), files.Checkpoint(str(tmp_path / 'bf16'))
  assert sorted(full) == sorted(half) and len(full) > 20
  for name in full:
    rounded = np.asarray(half[name])
    assert rounded.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(rounded, np.asarray(full[name]).astype(ml_dtypes.bfloat16), err_msg=name)
  assert files.read_json(str(tmp_path / 'bf16'))['dtype'] == 'bfloat16'
  torch = _torch()
  import transformers
  model = transformers.IdeficsForVisionText2Text.from_pretrained(str(tmp_path / 'bf16'), dtype='auto')
  assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_a_run_that_never_read_pictures_exports_as_the_lm_alone(tmp_path, data):
  """Our `images=None` forward skips the gated blocks; IDEFICS runs their MLP half on every token and needs
  picture inputs. So a text-only run's IDEFICS export is refused (naming --lm_only) before anything is
  written or loaded, by export and by verify; the LM alone exports."""
  cfg = _config(data, 2, False, False, 4)
  cfg.data.item_content = 'text'
  workdir, _ = _trained_run(tmp_path, cfg)
  with pytest.raises(mapping.MappingError, match=r"never read pictures \(data.item_content='text'\).*--lm_only"):
    export.export(workdir, str(tmp_path / 'hf'))
  assert os.listdir(tmp_path) == ['run']
  idefics = tmp_path / 'idefics'
  idefics.mkdir()
  (idefics / 'config.json').write_text(json.dumps({'architectures': ['IdeficsForVisionText2Text']}))
  from unimp_jax.hf import verify
  with pytest.raises(mapping.MappingError, match='never read pictures'):
    verify.main(['--checkpoint', workdir, '--hf', str(idefics)])
  export.export(workdir, str(tmp_path / 'lm'), lm_only=True)
  assert files.read_json(str(tmp_path / 'lm'))['architectures'] == ['LlamaForCausalLM']


def test_the_export_and_its_card_are_the_step_the_run_hands_on(tmp_path, data):
  """Without --step, export takes the step a run hands on: with validation, the best-scored one, here the
  first of two. Its card names that step (it used to name the newest)."""
  cfg = _config(data, 2, False, False, 4)
  cfg.eval.every = 1
  key = f'valid/{cfg.eval.metric}'
  params = jax.device_get(nnx.to_pure_dict(nnx.state(_model(cfg))))
  workdir = str(tmp_path / 'run')
  with checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), save_every=1, keep=2, best_metric=key,
                                   async_save=False) as ckpt:
    for step, score in ((1, 0.9), (2, 0.1)):
      ckpt.save(step, {'params': params}, config=cfg, metrics={key: score}, force=True)
  out = export.export(workdir, str(tmp_path / 'hf'), lm_only=True)
  with open(os.path.join(out, 'README.md')) as f:
    assert 'at training step 1.' in f.read()


def test_a_run_with_the_item_pool_is_refused_before_anything_is_written(tmp_path, data):
  cfg = _config(data, 2, False, False, 4)
  cfg.model.item_pool = True  # no Hugging Face model adds the mean item embedding to its inputs
  workdir, _ = _trained_run(tmp_path, cfg)
  for lm_only in (False, True):
    with pytest.raises(mapping.MappingError, match='model.item_pool.*cannot be exported'):
      export.export(workdir, str(tmp_path / 'hf'), lm_only=lm_only)
  assert os.listdir(tmp_path) == ['run']


def test_a_run_reads_back_as_trained_and_is_refused_on_a_changed_dataset(tmp_path, data):
  """`runs.load` gives the saved config and parameters. A dataset whose tokenizer changed since the run
  trained (here another dataset at the run's data.path) is refused, naming the key and both values."""
  cfg = _config(data, 2, False, False, 4)
  workdir, params = _trained_run(tmp_path, cfg)
  run = runs.load(workdir)
  assert run.step == 3 and config_lib.flat(run.cfg) == config_lib.flat(cfg)
  restored = traversals.flatten_mapping(jax.device_get(run.params))
  assert restored.keys() == params.keys()
  for key, value in params.items():
    np.testing.assert_array_equal(restored[key], value)
  other = str(tmp_path / 'other')
  synthetic.build(other, num_items=40, num_users=30, seed=1, image_size=32, bpe_vocab=300)
  cfg.data.path = other
  (tmp_path / 'b').mkdir()
  moved, _ = _trained_run(tmp_path / 'b', cfg)
  vocab = cfg.model.lm.vocab_size  # <image> is the first added token: its id is the base vocabulary's size
  with pytest.raises(config_lib.ConfigError, match=rf'config.model.image_token_id: set to {vocab} when the run was '
                                                   rf'trained, but the dataset at {other} gives (?!{vocab}\b)\d+'):
    runs.load(moved)


def test_pickles_are_refused_never_loaded(tmp_path):
  marker = tmp_path / 'unpickled'

  class Payload:
    def __reduce__(self):
      return os.mkdir, (str(marker),)

  (tmp_path / 'pytorch_model.bin').write_bytes(pickle.dumps(Payload()))
  (tmp_path / 'config.json').write_text('{"model_type": "llama"}')
  with pytest.raises(files.CheckpointError, match=r'pytorch_model\.bin is a pickle.*never loaded'):
    files.Checkpoint(str(tmp_path))
  assert not marker.exists()


# ---- importing checkpoints written by transformers --------------------------------------------------------

def _torch():
  torch = pytest.importorskip('torch', reason='needs the `hf` extra (torch==2.13.0)')
  torch.set_num_threads(1)
  torch.backends.mkldnn.enabled = False
  return torch


def _llama_family(kind: str, vocab: int, **overrides):
  import transformers
  common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=kind == 'qwen2',
                rope_parameters={'rope_type': 'default', 'rope_theta': 1e6 if kind == 'qwen2' else 1e4},
                attn_implementation='eager')
  common.update(overrides)
  config_cls, model_cls = {'llama': (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                           'mistral': (transformers.MistralConfig, transformers.MistralForCausalLM),
                           'qwen2': (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
  return model_cls(config_cls(**common))


def _perturbed_and_saved(model, directory, torch, max_shard_size='100KB'):
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  model.save_pretrained(directory, max_shard_size=max_shard_size)  # safetensors, sharded with an index
  return model.double().eval()


LLAMA3_ROPE = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
               'original_max_position_embeddings': 64, 'rope_theta': 5e5}


@pytest.mark.parametrize('kind,rope', [
    ('qwen2', None), ('mistral', None),
    # Scaled rotary embeddings, as Llama 3.2 (llama3) and long-context fine-tunes (linear) ship them. The
    # 96-token prompt is longer than llama3's original context here, so every frequency band is exercised.
    ('llama', LLAMA3_ROPE), ('llama', {'rope_type': 'linear', 'factor': 4.0, 'rope_theta': 1e4})])
def test_sharded_llama_family_checkpoints_import_with_parity(tmp_path, data, kind, rope):
  torch = _torch()
  directory = str(tmp_path / kind)
  overrides = dict(sliding_window=None) if kind == 'mistral' else {}
  if rope:
    overrides['rope_parameters'] = dict(rope)
  hf = _perturbed_and_saved(_llama_family(kind, 300, **overrides), directory, torch)
  assert os.path.exists(os.path.join(directory, files.INDEX))
  tensors = files.Checkpoint(directory)
  cfg = config_lib.base_config()
  mapping.update_llama_config(cfg.model, hf.config, seq_len=cfg.data.seq_len)
  assert cfg.model.lm.qkv_bias == (kind == 'qwen2') and cfg.model.lm.num_kv_heads == 2
  assert cfg.model.lm.rope_scaling.type == (rope or {}).get('rope_type', 'default')
  # Exported again, the scaling is written as transformers reads it.
  assert mapping.causal_lm_config(cfg.model)['rope_parameters'] == (rope or hf.config.rope_parameters)
  model = _model(cfg)
  mapping.load_llama(model, tensors, cfg.model)

  tokens = np.random.default_rng(0).integers(3, 300, (2, 96))
  mask = np.ones(tokens.shape, bool)
  mask[0, 70:] = False
  with torch.no_grad():
    expected = hf(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask)).logits.numpy()
  logits = np.asarray(unimp.jit_forward(nnx.split(model)[0])(nnx.state(model), tokens, None, mask))[..., :300]
  np.testing.assert_allclose(logits[mask], expected[mask], atol=1e-4, rtol=0)
  if rope:  # the scaling matters at these positions: the unscaled model is far off
    cfg.model.lm.rope_scaling.type = 'default'
    plain = _model(cfg)
    mapping.load_llama(plain, tensors, cfg.model)
    unscaled = np.asarray(unimp.jit_forward(nnx.split(plain)[0])(nnx.state(plain), tokens, None, mask))[..., :300]
    assert np.abs(unscaled[mask] - expected[mask]).max() > 0.1


def test_sliding_window_shorter_than_the_sequence_is_refused(data):
  _torch()
  hf = _llama_family('mistral', 300, sliding_window=64)
  cfg = config_lib.base_config()
  with pytest.raises(mapping.MappingError, match='sliding_window=64 < config.data.seq_len=128'):
    mapping.update_llama_config(cfg.model, hf.config, seq_len=cfg.data.seq_len)


@pytest.mark.parametrize('overrides,says', [
    (dict(hidden_act='gelu'), "hidden_act='gelu'"),
    (dict(rope_parameters={'rope_type': 'dynamic', 'factor': 2.0, 'rope_theta': 1e4}), "rope_type='dynamic'"),
    (dict(rope_parameters={'rope_type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 128,
                           'rope_theta': 1e4}), "rope_type='yarn'"),
    (dict(rope_parameters={'rope_type': 'default', 'rope_theta': 1e4, 'partial_rotary_factor': 0.5}),
     'partial_rotary_factor=0.5'),
])
def test_lm_configs_this_model_would_compute_differently_are_refused(overrides, says):
  import transformers
  cfg = config_lib.base_config()
  hf_cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                                    num_attention_heads=4, max_position_embeddings=512, **overrides)
  with pytest.raises(mapping.MappingError, match=says):
    mapping.update_llama_config(cfg.model, hf_cfg)


def test_pretrained_towers_fill_the_model_and_the_rest_stays_fresh(tmp_path, data):
  """`config.pretrained.*` as training reads it: the architecture from config.json, the tensors streamed in,
  the connector and cross-attention (gates at 0) left as initialised; a vocabulary that is not the
  dataset's is a clear error."""
  torch = _torch()
  import transformers
  dataset = formats.UnifiedDataset(data)
  base_vocab = datasets.token_ids(config_lib.base_config(), dataset).base_vocab_size
  lm_dir, clip_dir, wrong_dir = (str(tmp_path / n) for n in ('lm', 'clip', 'wrong'))
  lm = _perturbed_and_saved(_llama_family('llama', base_vocab, hidden_size=96, num_hidden_layers=2), lm_dir, torch)
  clip = transformers.CLIPModel(transformers.CLIPConfig(
      vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         image_size=32, patch_size=8),
      text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)))
  clip = _perturbed_and_saved(clip, clip_dir, torch, max_shard_size='2GB')

  cfg = config_lib.base_config()
  cfg.data.path = data
  cfg.pretrained.update(lm=lm_dir, vision=clip_dir)
  explicit = cfg.copy_and_resolve_references()
  explicit.model.lm.width = 100  # as --config.model.lm.width=100 would: config.json says 96
  with pytest.raises(config_lib.ConfigError, match=r'config.model.lm.width: set to 100 on the command line, but '
                                                   r'the pretrained checkpoint or the dataset gives 96'):
    runs.resolve(explicit, dataset, {'model.lm.width'})
  runs.resolve(cfg, dataset, {'train.steps'})  # the preset's width (128) is not an override: config.json's wins
  assert (cfg.model.lm.width, cfg.model.lm.num_layers, cfg.model.vision.width) == (96, 2, 48)
  model = _model(cfg)
  fresh_alpha = np.asarray(model.lm.groups.cross.alpha_attn[...])
  lines = pretrained.load_pretrained(model, cfg)
  assert [line.split(':')[0] for line in lines] == ['vision', 'lm']
  np.testing.assert_array_equal(model.lm.embed[...], lm.model.embed_tokens.weight.detach().float().numpy())
  np.testing.assert_array_equal(model.vision.pos_embed[...],
                                clip.vision_model.embeddings.position_embedding.weight.detach().float().numpy())
  np.testing.assert_array_equal(model.lm.groups.cross.alpha_attn[...], fresh_alpha)
  assert not fresh_alpha.any()

  _perturbed_and_saved(_llama_family('llama', base_vocab + 5), wrong_dir, torch)
  wrong = config_lib.base_config()
  wrong.data.path = data
  wrong.pretrained.lm = wrong_dir
  with pytest.raises(config_lib.ConfigError, match=rf'vocab_size={base_vocab + 5}, but the dataset .* gives '
                                                   rf'{base_vocab} .*--tokenizer'):
    pretrained.fit_config(wrong, dataset)


# ---- real checkpoint layouts: a tokenizer that already has <image>, a vocabulary padded past the tokenizer ------

def _base_tokenizer(directory, extra_special=()):
  """A 300-token BPE saved as a Hugging Face tokenizer, with `extra_special` tokens after it (as IDEFICS's)."""
  from unimp_jax.data import tokenizer as tokenizer_lib
  base = tokenizer_lib.train_bpe([f'a red shirt number {i} and a blue bag' for i in range(50)], 300)
  if extra_special:
    base.add_special_tokens({'additional_special_tokens': list(extra_special)})
  base.save_pretrained(directory)
  return len(base)


def _convert_with(tokenizer_dir, out):
  from unimp_jax.data import convert
  raw = os.path.join(os.path.dirname(__file__), 'fixtures', 'raw', 'movielens', 'ml-100k')
  convert.main(['movielens', '--root', raw, '--out', out, '--min_user_interactions', '3',
                '--min_item_interactions', '2', '--image_size', '32', '--tokenizer', tokenizer_dir])
  return formats.UnifiedDataset(out)


def test_a_real_idefics_whose_tokenizer_has_image_tokens_imports_with_parity(tmp_path):
  """idefics-9b's layout: a base vocabulary, then `<fake_token_around_image>` and `<image>` as its 2
  additional rows. Our tokenizer keeps them (our `<image>` is theirs) and adds its tokens after them; the
  import fills the first 2 added rows, leaves ours fresh, and the logits match transformers'."""
  torch = _torch()
  import transformers
  from unimp_jax.hf import verify
  directory = str(tmp_path / 'idefics')
  assert _base_tokenizer(directory, ('<fake_token_around_image>', '<image>')) == 302
  hf_cfg = transformers.IdeficsConfig(
      vocab_size=300, additional_vocab_size=2, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
      num_attention_heads=4, cross_layer_interval=1, use_resampler=True, max_position_embeddings=512,
      vision_config=dict(embed_dim=32, image_size=32, patch_size=8, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4),
      perceiver_config=dict(use_resampler=True, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                            resampler_head_dim=8), attn_implementation='eager')
  hf = _perturbed_and_saved(transformers.IdeficsForVisionText2Text(hf_cfg), directory, torch)

  dataset = _convert_with(directory, str(tmp_path / 'data'))
  layout = dataset.tokenizer().unimp_layout
  assert (layout['base_vocab_size'], layout['reserved'], layout['image']) == (300, 2, 301)
  cfg = config_lib.base_config()
  cfg.data.path, cfg.pretrained.idefics = dataset.path, directory
  pretrained.fit_config(cfg, dataset)
  datasets.fit_model_to_dataset(cfg, dataset)
  assert (cfg.model.image_token_id, cfg.model.lm.vocab_size) == (301, 300)
  ids = datasets.token_ids(cfg, dataset)
  assert ids.end_of_chunk == 302 and cfg.model.lm.added_vocab_size == ids.added_vocab_size > 2
  model = _model(cfg)
  fresh = np.asarray(model.lm.added_embed[...])
  pretrained.load_pretrained(model, cfg)
  added = np.asarray(model.lm.added_embed[...])
  np.testing.assert_array_equal(added[:2], hf.model.embed_tokens.additional_embedding.weight.detach().float().numpy())
  np.testing.assert_array_equal(added[2:], fresh[2:])
  workdir, _ = _trained_run(tmp_path, cfg)  # a run whose <image> is not its first added token, read back
  saved = runs.saved_config(workdir)
  assert (saved.model.image_token_id, saved.model.lm.vocab_size) == (301, 300)  # as saved, before any fitting

  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 300, (2, 80))
  tokens[:, [5, 40]] = 301  # two pictures per row, named by IDEFICS's own <image>
  mask = np.ones(tokens.shape, bool)
  mask[0, 60:] = False
  images = rng.normal(size=(2, 2, 32, 32, 3)).astype(np.float32)
  expected = verify.hf_logits(hf, tokens, images, mask, cfg.model)
  logits = np.asarray(unimp.jit_forward(nnx.split(model)[0])(nnx.state(model), tokens, images, mask))[..., :302]
  np.testing.assert_allclose(logits[mask], expected[mask], atol=1e-4, rtol=0)


def test_a_vocabulary_padded_past_its_tokenizer_imports(tmp_path):
  """Qwen2's layout: 151,936 embedding rows for a 151,665-token tokenizer. The dataset's tokenizer is
  padded to the model's rows, so that our added tokens land past them; the LM imports with parity."""
  torch = _torch()
  directory = str(tmp_path / 'qwen2')
  assert _base_tokenizer(directory) == 300
  hf = _perturbed_and_saved(_llama_family('qwen2', 320), directory, torch)
  dataset = _convert_with(directory, str(tmp_path / 'data'))
  tok = dataset.tokenizer()
  assert tok.unimp_layout['base_vocab_size'] == 320 and len(tok.get_vocab()) == len(tok)
  assert tok.convert_tokens_to_ids(['<unimp_pad_0>', '<unimp_pad_19>', '<image>']) == [300, 319, 320]
  cfg = config_lib.base_config()
  cfg.data.path, cfg.pretrained.lm = dataset.path, directory
  pretrained.fit_config(cfg, dataset)
  datasets.fit_model_to_dataset(cfg, dataset)
  assert (cfg.model.lm.vocab_size, cfg.model.image_token_id) == (320, 320)
  model = _model(cfg)
  pretrained.load_pretrained(model, cfg)
  tokens = np.random.default_rng(0).integers(3, 300, (2, 64))
  mask = np.ones(tokens.shape, bool)
  with torch.no_grad():
    expected = hf(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask)).logits.numpy()
  logits = np.asarray(unimp.jit_forward(nnx.split(model)[0])(nnx.state(model), tokens, None, mask))[..., :320]
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
