"""Prompts: one user + a target position + a task -> one fixed-shape training or evaluation example.

Every prompt is made of the same chunks (SPEC §2):

    <image> Category {c} Price {p} Brand {b} Title {t} [<answer> target] <|endofchunk|>

then an instruction, `<answer>`, and the answer (training) or nothing (evaluation). History chunks carry
their own answer spans in training *and* evaluation ("context reconstruction"): the history items'
ids are part of the input, so train and eval prompts are the same text up to the final answer.

An item is written as its id tokens wherever an id is asked for (`item_tokens`: one atomic `item_i`, or
the semantic code tokens of unimp_jax.data.semantic_ids). What an item chunk shows of the item is
`item_content`:

    image+text   <image> {text} [<answer> ...] <|endofchunk|>       (the paper's UniMP)
    text         {text} [<answer> ...] <|endofchunk|>               no pictures: the model runs without images
    ids          {id tokens} [<answer> ...] <|endofchunk|>          neither picture nor text

With `ids`, a recommendation/search history chunk is just `<answer> {id tokens} <|endofchunk|>`: the id
is both the item and its answer, so the history is the id sequence and every step of it is supervised
as a next-item prediction (writing the id twice would make its answer span a copy).

Text is tokenized once per item and once per instruction template; a prompt is assembled from token-id
pieces, and UniMP's added tokens are placed by id, never parsed out of strings. The loss mask is computed
with array operations over the assembled sequence (`answer_mask`). What differs between tasks (the
answers, what follows the history, the instruction) each task says for itself (unimp_jax.tasks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from unimp_jax import tasks
from unimp_jax.data import formats
from unimp_jax.data.tokenizer import TokenIds

FIELD_WORDS = {'category': 4, 'price': 1, 'brand': 4, 'title': 12}
ITEM_CONTENTS = ('image+text', 'text', 'ids')
IGNORE = -1  # an empty image slot


class PromptTooLong(ValueError):
  """Even with no history the prompt does not fit; the message names the config key to raise."""


@dataclasses.dataclass(frozen=True)
class Example:
  tokens: np.ndarray        # int32 [seq_len], padded with the pad id
  answer_mask: np.ndarray   # bool [seq_len]: tokens that carry loss
  image_items: np.ndarray   # int32 [num_images]: item id shown in each slot, -1 = empty
  task: int                 # index into unimp_jax.tasks.NAMES
  prompt_length: int        # tokens before the final answer (where generation starts)
  target: np.ndarray        # int32 [4]: item id | rating | positive slot bitmask, -1 where not used
  next_items: np.ndarray    # int32 [seq_len]: at each history chunk's `<|endofchunk|>`, the id token of the
                            # item bought next (the following chunk's, or the target's); -1 elsewhere


@dataclasses.dataclass(frozen=True)
class Catalogue:
  """Every item's content in item-id order, what content item rows are computed from
  (unimp_jax.model.items): `text` [N, L] int32 token ids padded with `pad_id`, `images` [N, H, W, 3]
  uint8 (None when the run shows no pictures), `has_image` [N] bool, and `first_row`, the
  added-vocabulary row of `item_0`."""
  text: np.ndarray
  has_image: np.ndarray
  images: np.ndarray | None
  first_row: int
  pad_id: int

  def arrays(self) -> dict[str, np.ndarray]:
    """What a jitted function takes (`pad_id` is the tokens' own pad id there)."""
    out = {'text': self.text, 'has_image': self.has_image, 'first_row': np.int32(self.first_row)}
    if self.images is not None:
      out['images'] = self.images
    return out


def answer_mask(tokens: np.ndarray, ids: TokenIds, pad_id: int) -> np.ndarray:
  """True for every token after an `<answer>` up to and including the next `<|endofchunk|>` (history
  spans) or through the end of sequence (the final answer); never `<answer>` itself or padding."""
  positions = np.arange(len(tokens))
  last_answer = np.maximum.accumulate(np.where(tokens == ids.answer, positions, -1))
  last_close = np.maximum.accumulate(np.where(tokens == ids.end_of_chunk, positions, -1))
  # Shift by one: a token is inside a span if the span opened before it and had not closed before it.
  opened_before = np.concatenate([[-1], last_answer[:-1]])
  closed_before = np.concatenate([[-1], last_close[:-1]])
  return (opened_before > closed_before) & (tokens != pad_id)


def tokenizer_corpus(items: Sequence[formats.Item], users: Sequence[formats.User]):
  """The text a prompt is made of, for training a dataset's own BPE: item lines exactly as chunks
  render them (and the keywords search queries default to), every instruction, and the users'
  explanations and queries."""
  yield from (f'{TaskBuilder.item_line(item)} {" ".join(item.keywords)}' for item in items)
  # Stage 1's caption task has no instruction: it adds nothing (so stage 2's tokenizer does not depend on it).
  yield from (t.instruction.format(query='') + ' Select from: Selection' for t in tasks.TASKS.values() if t.instruction)
  for user in users:
    for inter in user.interactions:
      yield f'{inter.explanation} {inter.query}'


def _words(text: str, limit: int) -> str:
  words = str(text).split()
  return ' '.join(words[:limit]) if words else 'Unknown'


class TaskBuilder:
  """Builds examples for one dataset and tokenizer, at fixed `seq_len` and `num_images`."""

  def __init__(self, dataset: formats.UnifiedDataset, tokenizer, *, seq_len: int, num_images: int,
               history: int, image_codes=None, item_codes: np.ndarray | None = None,
               item_content: str = 'image+text'):
    """`image_codes`: the catalogue pictures' unimp_jax.vq.codes.ImageCodes (the tokenizer must carry their
    `img_k` tokens, see `tokenizer.with_image_code_tokens`), for the generation task. `item_codes`
    [num_items, levels]: semantic ids (the tokenizer must carry their tokens, see
    `tokenizer.with_semantic_tokens`); None: atomic `item_i` tokens."""
    if item_content not in ITEM_CONTENTS:
      raise ValueError(f'config.data.item_content={item_content!r} is not one of {ITEM_CONTENTS}')
    self.dataset, self.tokenizer = dataset, tokenizer
    self.ids = TokenIds(tokenizer.unimp_layout)
    self.seq_len, self.num_images, self.history = seq_len, num_images, history
    self.pad, self.eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    self.item_codes, self.item_content = item_codes, item_content
    self.image_codes = None if image_codes is None else image_codes.codes  # int32 [num_items, h * w]
    self.image_codes_path = None if image_codes is None else image_codes.path
    num_items = self.ids.num_items  # the catalogue; a prediction's new items (ids after it) have no id
    if item_codes is None:
      self.item_tokens = np.asarray(self.ids.item(np.arange(num_items)), np.int32)[:, None]
    elif len(item_codes) != num_items:
      raise ValueError(f'{len(item_codes)} semantic ids for the {num_items} items of {dataset.path}')
    else:
      self.item_tokens = self.ids.semantic(item_codes)
    self.uses_images = item_content == 'image+text'  # False: batches carry no pictures, the model none
    self._has_image = np.asarray([it.has_image and self.uses_images for it in dataset.items], bool)
    self._item_body = ([self.encode(self.item_line(it)) for it in dataset.items] if item_content != 'ids'
                       else list(self.item_tokens))
    self._cache: dict[str, np.ndarray] = {}  # fixed strings only: instructions and headers

  def catalogue(self) -> Catalogue:
    """The catalogue's pictures and item-line tokens, as the item chunks show them."""
    if self.item_content == 'ids':
      raise ValueError("content item rows need the items' text or pictures; data.item_content is 'ids'")
    bodies = self._item_body[:self.ids.num_items]  # items with an id token (not a prediction's new items)
    text = np.full((len(bodies), max(len(b) for b in bodies)), self.pad, np.int32)
    for i, body in enumerate(bodies):
      text[i, :len(body)] = body
    images = self.dataset.images(np.arange(len(bodies))) if self.uses_images else None
    return Catalogue(text=text, has_image=self._has_image[:len(bodies)].copy(), images=images,
                     first_row=self.ids.item_range[0] - self.ids.base_vocab_size, pad_id=self.pad)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.tokenizer.encode(text, add_special_tokens=False), np.int32)

  @staticmethod
  def item_line(item: formats.Item) -> str:
    price = 'Unknown' if item.price is None else f'{item.price:.2f}'
    return (f' Category {_words(item.category, FIELD_WORDS["category"])} Price {price}'
            f' Brand {_words(item.brand, FIELD_WORDS["brand"])} Title {_words(item.title, FIELD_WORDS["title"])}')

  def text(self, text: str) -> np.ndarray:
    if text not in self._cache:
      self._cache[text] = self.encode(text)
    return self._cache[text]

  def chunk(self, item: int, answer: Sequence[int] = (), prefix: Sequence[int] = (), show_item: bool = True):
    """(token ids, image item or None) of one item chunk, with an optional answer span."""
    image = [self.ids.image] if self._has_image[item] else []
    answer_part = [self.ids.answer, *answer] if answer else []
    body = self._item_body[item] if show_item else np.zeros(0, np.int32)
    tokens = np.concatenate([np.asarray(image + list(prefix), np.int32), body,
                             np.asarray(answer_part + [self.ids.end_of_chunk], np.int32)])
    return tokens, (item if self._has_image[item] else None)

  def answer_budget(self, task: str) -> int:
    """Tokens reserved for the final answer and end-of-sequence, whatever the actual answer, so that
    the history kept (and hence the prompt) is the same with and without the answer."""
    return 1 + tasks.TASKS[task].answer_length(self)

  def build(self, task: str, user: formats.User, target: int, *, with_answer: bool,
            rng: np.random.Generator | None = None) -> Example:
    """The example at the moment of `user.interactions[target]`: the history is what came before it.

    Its answer is that interaction's item (recommendation, search, generation), its rating and
    explanation (preference), or for selection one of the user's selection questions (chosen by
    `target`), made from the target interaction and two random items when the user has none.
    """
    inters = user.interactions
    target_inter = inters[target]
    history = list(inters[max(0, target - self.history):target])
    if task not in tasks.TASKS:
      raise ValueError(f'unknown task {task!r}; the tasks are {tasks.NAMES}')
    kind = tasks.TASKS[task]
    tail, answer, goal = kind.tail(self, user, target, target_inter, rng)
    # A history chunk always shows its item; with `ids` content an id-answering chunk writes the id
    # once, as its answer. An answer the history does not know is left out.
    show_item = kind.shows_item_text and not (kind.history_answers_ids and self.item_content == 'ids')
    chunks = [self.chunk(i.item, kind.history_answer(self, i), show_item=show_item) for i in history]
    instruction = self._instruction(kind.instruction, target_inter)
    while True:
      pieces = [c[0] for c in chunks] + [t[0] for t in tail] + [instruction, np.asarray([self.ids.answer], np.int32)]
      prompt = np.concatenate(pieces)
      images = [c[1] for c in chunks + tail if c[1] is not None]
      total = len(prompt) + self.answer_budget(task)
      if total <= self.seq_len and len(images) <= self.num_images:
        break
      if not chunks:
        raise PromptTooLong(f'a {task} prompt needs {total} tokens and {len(images)} images without any history; '
                            f'raise config.data.seq_len ({self.seq_len}) or config.data.num_images ({self.num_images})')
      chunks = chunks[1:]  # drop the oldest history item
    tokens = np.full(self.seq_len, self.pad, np.int32)
    full = np.concatenate([prompt, np.asarray([*answer, self.eos], np.int32)]) if with_answer else prompt
    tokens[:len(full)] = full
    image_items = np.full(self.num_images, IGNORE, np.int32)
    image_items[:len(images)] = images
    kept = history[len(history) - len(chunks):]
    return Example(tokens=tokens, answer_mask=answer_mask(tokens, self.ids, self.pad), image_items=image_items,
                   task=tasks.NAMES.index(task), prompt_length=len(prompt), target=goal,
                   next_items=self.next_items(kept, [len(c[0]) for c in chunks], target_inter.item))

  def next_items(self, history: Sequence[formats.Interaction], chunk_lengths: Sequence[int], target_item: int):
    """`Example.next_items`: the labels of the history's next-item loss (`train.next_item_weight`). Only
    single-token ids have one; an item without an id (a prediction's new item) has none."""
    labels = np.full(self.seq_len, IGNORE, np.int32)
    if self.item_tokens.shape[1] != 1:
      return labels
    following = [i.item for i in history[1:]] + [target_item]
    for end, item in zip(np.cumsum(chunk_lengths) - 1, following):
      if item < len(self.item_tokens):
        labels[end] = self.item_tokens[item, 0]
    return labels

  def _instruction(self, template: str, inter: formats.Interaction) -> np.ndarray:
    before, has_query, after = template.partition('{query}')
    if not template:  # captions: the answer follows the picture
      return np.zeros(0, np.int32)
    if not has_query:
      return self.text(' ' + before)
    return np.concatenate([self.text(' ' + before.rstrip()), self.encode(' ' + self.query_text(inter)),
                           self.text(after)])

  def query_text(self, inter: formats.Interaction) -> str:
    """The words a prompt asks with: the interaction's query, else the item's keywords."""
    return inter.query or ' '.join(self.dataset.items[inter.item].keywords) or 'Unknown'
