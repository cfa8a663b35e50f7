"""Task builders: one user + a target position -> one fixed-shape training or evaluation example.

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
with array operations over the assembled sequence (`answer_mask`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from unimp_jax.data import formats
from unimp_jax.data.tokenizer import TokenIds

TASKS = ('recommendation', 'search', 'preference', 'selection', 'generation')
INSTRUCTIONS = {
    'recommendation': 'What is the next item recommended to the user?',
    'search': 'Query: {query} What is the related item ID to the query based on the history?',
    'preference': 'What is the rating and explanation for the item?',
    'selection': 'Can you select the suitable item from above for the user?',
    'generation': 'Query: {query} What is the generated image ID to the query based on the history?',
}
FIELD_WORDS = {'category': 4, 'price': 1, 'brand': 4, 'title': 12}
EXPLANATION_TOKENS = 32
ITEM_CONTENTS = ('image+text', 'text', 'ids')
IGNORE = -1  # an empty image slot


class PromptTooLong(ValueError):
  """Even with no history the prompt does not fit; the message names the config key to raise."""


@dataclasses.dataclass(frozen=True)
class Example:
  tokens: np.ndarray        # int32 [seq_len], padded with the pad id
  answer_mask: np.ndarray   # bool [seq_len]: tokens that carry loss
  image_items: np.ndarray   # int32 [num_images]: item id shown in each slot, -1 = empty
  task: int                 # index into TASKS
  prompt_length: int        # tokens before the final answer (where generation starts)
  target: np.ndarray        # int32 [4]: item id | rating | positive slot bitmask, -1 where not used


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
  yield from (INSTRUCTIONS[t].format(query='') + ' Select from: Selection' for t in TASKS)
  for user in users:
    for inter in user.interactions:
      yield f'{inter.explanation} {inter.query}'


def _words(text: str, limit: int) -> str:
  words = str(text).split()
  return ' '.join(words[:limit]) if words else 'Unknown'


class TaskBuilder:
  """Builds examples for one dataset and tokenizer, at fixed `seq_len` and `num_images`."""

  def __init__(self, dataset: formats.UnifiedDataset, tokenizer, *, seq_len: int, num_images: int,
               history: int, image_codes: np.ndarray | None = None, item_codes: np.ndarray | None = None,
               item_content: str = 'image+text'):
    """`item_codes` [num_items, levels]: semantic ids (the tokenizer must carry their tokens, see
    `tokenizer.with_semantic_tokens`); None: atomic `item_i` tokens."""
    if item_content not in ITEM_CONTENTS:
      raise ValueError(f'config.data.item_content={item_content!r} is not one of {ITEM_CONTENTS}')
    self.dataset, self.tokenizer = dataset, tokenizer
    self.ids = TokenIds(tokenizer.unimp_layout)
    self.seq_len, self.num_images, self.history = seq_len, num_images, history
    self.pad, self.eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    self.image_codes, self.item_codes, self.item_content = image_codes, item_codes, item_content
    num_items = self.ids.num_items  # the catalogue; a prediction's new items (ids after it) have no id
    if item_codes is None:
      self.item_tokens = np.asarray(self.ids.item(np.arange(num_items)), np.int32)[:, None]
    elif len(item_codes) != num_items:
      raise ValueError(f'{len(item_codes)} semantic ids for the {num_items} items of {dataset.path}')
    else:
      self.item_tokens = self.ids.semantic(item_codes)
    self.uses_images = item_content == 'image+text'  # False: batches carry no pictures, the model none
    self._has_image = np.asarray([it.has_image and self.uses_images for it in dataset.items], bool)
    self._item_body = ([self._encode(self.item_line(it)) for it in dataset.items] if item_content != 'ids'
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

  def _encode(self, text: str) -> np.ndarray:
    return np.asarray(self.tokenizer.encode(text, add_special_tokens=False), np.int32)

  @staticmethod
  def item_line(item: formats.Item) -> str:
    price = 'Unknown' if item.price is None else f'{item.price:.2f}'
    return (f' Category {_words(item.category, FIELD_WORDS["category"])} Price {price}'
            f' Brand {_words(item.brand, FIELD_WORDS["brand"])} Title {_words(item.title, FIELD_WORDS["title"])}')

  def _text(self, text: str) -> np.ndarray:
    if text not in self._cache:
      self._cache[text] = self._encode(text)
    return self._cache[text]

  def chunk(self, item: int, answer: Sequence[int] = (), prefix: Sequence[int] = (), show_item: bool = True):
    """(token ids, image item or None) of one item chunk, with an optional answer span."""
    image = [self.ids.image] if self._has_image[item] else []
    answer_part = [self.ids.answer, *answer] if answer else []
    body = self._item_body[item] if show_item else np.zeros(0, np.int32)
    tokens = np.concatenate([np.asarray(image + list(prefix), np.int32), body,
                             np.asarray(answer_part + [self.ids.end_of_chunk], np.int32)])
    return tokens, (item if self._has_image[item] else None)

  def _explanation(self, text: str) -> np.ndarray:
    return self._encode(' ' + (text or 'Unknown'))[:EXPLANATION_TOKENS]

  def answer_budget(self, task: str) -> int:
    """Tokens reserved for the final answer and end-of-sequence, whatever the actual answer, so that
    the history kept (and hence the prompt) is the same with and without the answer."""
    codes = 0 if self.image_codes is None else self.image_codes.shape[1]
    item = self.item_tokens.shape[1]
    return 1 + {'recommendation': item, 'search': item, 'selection': self.ids.num_slots, 'generation': codes,
                'preference': 1 + EXPLANATION_TOKENS}[task]

  def _history_chunks(self, interactions, task: str):
    chunks = []
    answers_id = task not in ('preference', 'generation')
    for inter in interactions:
      # An answer the history does not know (a prediction's unrated item, a new item without an id) is
      # left out: the chunk still shows the item.
      if task == 'preference':
        answer = [] if inter.rating is None else [self.ids.rating(inter.rating), *self._explanation(inter.explanation)]
      elif task == 'generation':
        answer = list(self.ids.image_code(self.image_codes[inter.item]))
      else:
        answer = list(self.item_tokens[inter.item]) if inter.item < len(self.item_tokens) else []
      # With `ids` content an id-answering chunk writes the id once, as its answer.
      chunks.append(self.chunk(inter.item, answer, show_item=not (answers_id and self.item_content == 'ids')))
    return chunks

  def available(self, task: str, user: formats.User) -> bool:
    if task == 'preference':
      return all(i.rating is not None for i in user.interactions)
    if task == 'generation':
      return self.image_codes is not None
    return True

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
    tail, answer, goal = self._tail(task, user, target, target_inter, rng)
    chunks = self._history_chunks(history, task)
    instruction = self._instruction(task, target_inter)
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
    return Example(tokens=tokens, answer_mask=answer_mask(tokens, self.ids, self.pad), image_items=image_items,
                   task=TASKS.index(task), prompt_length=len(prompt), target=goal)

  def _instruction(self, task: str, inter: formats.Interaction) -> np.ndarray:
    before, has_query, after = INSTRUCTIONS[task].partition('{query}')
    if not has_query:
      return self._text(' ' + before)
    return np.concatenate([self._text(' ' + before.rstrip()), self._encode(' ' + self._query(inter)),
                           self._text(after)])

  def _query(self, inter: formats.Interaction) -> str:
    return inter.query or ' '.join(self.dataset.items[inter.item].keywords) or 'Unknown'

  def _tail(self, task, user, target, inter, rng):
    """Chunks after the history, the answer token ids, and the evaluation target."""
    goal = np.full(4, -1, np.int32)
    if task == 'preference':
      if inter.rating is None:  # a prediction: the rating is what is asked
        return [self.chunk(inter.item)], [], goal
      goal[1] = inter.rating
      return [self.chunk(inter.item)], [self.ids.rating(inter.rating), *self._explanation(inter.explanation)], goal
    if task == 'selection':
      selection = (user.selections[target % len(user.selections)] if user.selections
                   else self._selection_from(inter, rng))
      slots = sorted(selection.candidates.index(p) for p in selection.positives)
      goal[2] = sum(1 << s for s in slots)
      word = self._text(' Selection')
      chunks = [(self._text(' Select from:'), None)]
      chunks += [self.chunk(c, prefix=[*word, self.ids.slot(k)]) for k, c in enumerate(selection.candidates)]
      return chunks, [self.ids.slot(s) for s in slots], goal
    goal[0] = inter.item
    if task == 'generation':
      return [], list(self.ids.image_code(self.image_codes[inter.item])), goal
    return [], list(self.item_tokens[inter.item]), goal

  def _selection_from(self, inter: formats.Interaction, rng: np.random.Generator) -> formats.Selection:
    """For data without selection questions: the true next item among two random others, never cold
    items (`extra.cold_items`: released after the data's cut-off, so training must not show them)."""
    pool = np.flatnonzero(~formats.cold_mask(self.dataset))
    pool = pool[pool != inter.item]
    others = rng.choice(pool, 2, replace=False)
    candidates = rng.permutation(np.asarray([inter.item, *others]))
    return formats.Selection(tuple(int(c) for c in candidates), (inter.item,))
