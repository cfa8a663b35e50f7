"""The dataset's tokenizer: a base text vocabulary plus UniMP's added tokens, saved with the dataset.

The added tokens come after the model's base vocabulary (its `vocab_size` rows), always in this order:

    [reserved]  <image> <|endofchunk|> <answer>  rate_1..rate_5  s_0..s_{K-1}  item_0..item_{N-1}
      img_0..img_{C-1}  [sid_0_0..sid_0_{K0-1}  sid_1_0..  ...]

`reserved` are tokens a base tokenizer already has past its model's base rows: a real IDEFICS tokenizer's
`<fake_token_around_image>` and `<image>` (its `additional_vocab_size` rows). A base tokenizer that has
`<image>` keeps it, and it is not added again; otherwise `<image>` is the first added id (= the base
vocabulary size), the model's `image_token_id` either way. A base tokenizer shorter than its model's
vocabulary (Qwen2: 151,665 tokens, 151,936 rows) is padded with `<unimp_pad_k>` tokens up to it, so that
the added tokens land past every base row.

Item and image-code counts come from the data, never from a constant. The semantic item-id tokens
`sid_{level}_{code}` (unimp_jax.data.semantic_ids) are added by a run that uses them, after the dataset's
own tokens; their count is a function of the config alone (`data.semantic`), so the model's vocabulary
is sized before any item embedding exists. The base vocabulary is either a
byte-level BPE trained on the dataset's own text (the embedded default) or a tokenizer loaded from a
local Hugging Face directory (never from a hub), whose `config.json`, when the directory has one, gives
the model's base vocabulary size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIAL = ('<image>', '<|endofchunk|>', '<answer>')
BASE_SPECIAL = ('<pad>', '<s>', '</s>', '<unk>')
LAYOUT_FILE = 'unimp_tokens.json'


def added_tokens(num_items: int, num_slots: int, num_image_codes: int) -> list[str]:
  return (list(SPECIAL) + [f'rate_{r}' for r in range(1, 6)] + [f's_{k}' for k in range(num_slots)]
          + [f'item_{i}' for i in range(num_items)] + [f'img_{c}' for c in range(num_image_codes)])


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
  """A byte-level BPE trained on `texts` (deterministic for the same texts and size)."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BASE_SPECIAL), show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token='<pad>', bos_token='<s>', eos_token='</s>',
                                 unk_token='<unk>')


def load_base(path: str) -> PreTrainedTokenizerFast:
  """A base vocabulary from a local directory; nothing is downloaded. Its `model_vocab_size` attribute is
  the number of base rows of the model it belongs to (None: its length).

  A Hugging Face directory (tokenizer.json etc.) is loaded as it is; a `config.json` beside it gives the
  model's `vocab_size`. A unified dataset's `tokenizer/` (it has LAYOUT_FILE) gives its base vocabulary
  (and reserved tokens) without UniMP's added tokens, so that another dataset (a stage-1 corpus, a second
  catalogue) can share it and re-add its own.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f'tokenizer directory {path} does not exist')
  if not os.path.exists(os.path.join(path, LAYOUT_FILE)):
    base = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
    config = os.path.join(path, 'config.json')
    base.model_vocab_size = None
    if os.path.exists(config):
      with open(config) as f:
        base.model_vocab_size = json.load(f).get('vocab_size')
    return base
  full = load(path)
  ids = TokenIds(full.unimp_layout)
  keep = ids.base_vocab_size + ids.reserved
  spec = json.loads(full.backend_tokenizer.to_str())
  spec['added_tokens'] = [t for t in spec['added_tokens'] if t['id'] < keep]
  base = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), pad_token=full.pad_token,
                                 bos_token=full.bos_token, eos_token=full.eos_token, unk_token=full.unk_token)
  if len(base) != keep:
    raise ValueError(f'{path}: stripping the added tokens left {len(base)} tokens, its layout says '
                     f'base_vocab_size={ids.base_vocab_size} and {ids.reserved} reserved')
  base.model_vocab_size = ids.base_vocab_size
  return base


def with_unimp_tokens(base: PreTrainedTokenizerFast, *, num_items: int, num_slots: int,
                      num_image_codes: int) -> PreTrainedTokenizerFast:
  """Adds UniMP's tokens after the model's base vocabulary (`base.model_vocab_size`, default its length)
  and the tokens the tokenizer already has past it, and records the layout in the tokenizer itself."""
  rows = getattr(base, 'model_vocab_size', None) or len(base)
  if len(base) < rows:  # rows the tokenizer never produces (padding for sharding): fill them with names
    padding = [f'<unimp_pad_{k}>' for k in range(rows - len(base))]
    base.add_tokens(padding, special_tokens=False)
    if len(base) != rows or base.convert_tokens_to_ids(padding[-1]) != rows - 1:
      raise ValueError(f'padding the tokenizer to its model\'s {rows} rows failed: some <unimp_pad_k> exist')
  reserved = len(base) - rows
  image = base.get_vocab().get(SPECIAL[0])
  if image is not None and image < rows:
    raise ValueError(f'the base tokenizer has {SPECIAL[0]} at id {image}, inside its model\'s {rows} base rows; '
                     'put the model\'s config.json (its vocab_size) beside the tokenizer')
  names = added_tokens(num_items, num_slots, num_image_codes)[int(image is not None):]
  first = len(base)
  base.add_tokens(names, special_tokens=False)
  if base.convert_tokens_to_ids(names[0]) != first or len(base) != first + len(names):
    raise ValueError(f'added tokens did not land after the base vocabulary ({first}): some already exist')
  base.unimp_layout = dict(base_vocab_size=rows, reserved=reserved, image=first if image is None else image,
                           num_items=num_items, num_slots=num_slots, num_image_codes=num_image_codes)
  return base


def semantic_tokens(codebook_sizes) -> list[str]:
  return [f'sid_{level}_{code}' for level, size in enumerate(codebook_sizes) for code in range(size)]


def _append(tokenizer: PreTrainedTokenizerFast, names: list[str], what: str, **layout) -> PreTrainedTokenizerFast:
  """Adds `names` after the existing added tokens (in place) and updates the layout with `layout`."""
  end = len(tokenizer)
  expected_end = TokenIds(tokenizer.unimp_layout).added_range[1]
  tokenizer.add_tokens(names, special_tokens=False)
  if end != expected_end or tokenizer.convert_tokens_to_ids(names[0]) != end or len(tokenizer) != end + len(names):
    raise ValueError(f'{what} tokens did not land after the added tokens ({expected_end}): some already exist')
  tokenizer.unimp_layout = dict(tokenizer.unimp_layout, **layout)
  return tokenizer


def with_image_code_tokens(tokenizer: PreTrainedTokenizerFast, codebook_size: int) -> PreTrainedTokenizerFast:
  """Adds `img_0..img_{K-1}` after the item tokens (in place). They come before any semantic id tokens, so
  add these first; datasets are stored without them, since the codes come from a separately trained image
  tokenizer (unimp_jax.vq.codes)."""
  layout = tokenizer.unimp_layout
  if layout['num_image_codes'] or layout.get('semantic_codebooks'):
    raise ValueError('image-code tokens go right after the item tokens: the tokenizer already has image-code '
                     'or semantic id tokens')
  return _append(tokenizer, [f'img_{c}' for c in range(codebook_size)], 'image-code',
                 num_image_codes=int(codebook_size))


def with_semantic_tokens(tokenizer: PreTrainedTokenizerFast, codebook_sizes) -> PreTrainedTokenizerFast:
  """Adds `sid_{level}_{code}` for every level's codebook after the existing added tokens (in place)."""
  if tokenizer.unimp_layout.get('semantic_codebooks'):
    raise ValueError('the tokenizer already has semantic item-id tokens')
  return _append(tokenizer, semantic_tokens(codebook_sizes), 'semantic id',
                 semantic_codebooks=[int(k) for k in codebook_sizes])


def save(tokenizer: PreTrainedTokenizerFast, path: str) -> None:
  tokenizer.save_pretrained(path)
  with open(os.path.join(path, LAYOUT_FILE), 'w') as f:
    json.dump(tokenizer.unimp_layout, f, indent=2)


def load(path: str) -> PreTrainedTokenizerFast:
  tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
  with open(os.path.join(path, LAYOUT_FILE)) as f:
    tokenizer.unimp_layout = json.load(f)
  return tokenizer


class TokenIds:
  """Ids of UniMP's added tokens, by arithmetic on the layout (no string lookups in the hot path)."""

  def __init__(self, layout: dict):
    self.base_vocab_size = layout['base_vocab_size']
    self.reserved = layout.get('reserved', 0)  # tokens of the base tokenizer past the model's base rows
    self.num_items, self.num_slots = layout['num_items'], layout['num_slots']
    self.num_image_codes = layout['num_image_codes']
    self.semantic_codebooks = tuple(layout.get('semantic_codebooks', ()))  # per level; () = atomic ids only
    first = self.base_vocab_size + self.reserved
    self.image = layout.get('image', first)
    if self.image == first:  # added by us, first; otherwise one of the reserved tokens
      first += 1
    self.end_of_chunk, self.answer = first, first + 1
    self._rating0 = first + 2
    self._slot0 = self._rating0 + 5
    self._item0 = self._slot0 + self.num_slots
    self._code0 = self._item0 + self.num_items
    self._semantic0 = self._code0 + self.num_image_codes
    self._level0 = self._semantic0 + np.concatenate([[0], np.cumsum(self.semantic_codebooks, dtype=np.int64)])
    self.added_vocab_size = int(self._level0[-1]) - self.base_vocab_size

  def rating(self, r: int) -> int:
    if not 1 <= r <= 5:
      raise ValueError(f'rating {r} is not in 1..5')
    return self._rating0 + r - 1

  def slot(self, k: int) -> int:
    return self._slot0 + k

  def item(self, i):
    return self._item0 + i

  def image_code(self, c):
    return self._code0 + c

  def semantic(self, codes) -> np.ndarray:
    """int32 token ids of semantic codes [..., levels] (level l's code c is `sid_l_c`)."""
    codes = np.asarray(codes)
    levels = len(self.semantic_codebooks)
    if codes.shape[-1:] != (levels,):
      raise ValueError(f'semantic codes of shape {codes.shape} do not have the layout\'s {levels} levels')
    if (codes < 0).any() or (codes >= np.asarray(self.semantic_codebooks, np.int64)).any():
      raise ValueError(f'semantic codes outside the codebooks {self.semantic_codebooks}')
    return (self._level0[:-1] + codes).astype(np.int32)

  @property
  def item_range(self) -> tuple[int, int]:
    return self._item0, self._item0 + self.num_items

  def semantic_range(self, level: int) -> tuple[int, int]:
    """Token ids [first, last) of one level's codebook."""
    return int(self._level0[level]), int(self._level0[level + 1])

  @property
  def added_range(self) -> tuple[int, int]:
    return self.base_vocab_size, self.base_vocab_size + self.added_vocab_size
