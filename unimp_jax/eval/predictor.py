"""Recommendations, ratings and selections from a trained UniMP, for one user history
(command line: unimp_jax.predict).

A history is a list of catalogue item ids and/or new items (a picture and text fields). New items are
shown to the model exactly like catalogue items, except that they carry no ID of their own (the model
has no token for them); they can be in the history, not among the answers. The same calls are available
from Python:

  predictor = Predictor.from_workdir('workdir/tiny')  # unimp_jax.eval.predictor
  predictor.recommend([12, 57, NewItem('photo.png', 'Linen shirt', 'shirt')], k=10)
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from unimp_jax import runs
from unimp_jax.data import datasets, formats, images as images_lib, pipeline, prompts
from unimp_jax.eval import generate
from unimp_jax.model import items
from unimp_jax.tasks import base, generation, preference, recommendation, search, selection


@dataclasses.dataclass(frozen=True)
class NewItem:
  """An item that is not in the catalogue: a picture (path, or '' for none) and its text fields."""
  image_path: str
  title: str
  category: str = ''
  brand: str = ''
  price: float | None = None


class _CatalogueView:
  """The dataset's catalogue followed by a history's new items (ids from `num_items` on)."""

  def __init__(self, dataset: formats.UnifiedDataset, new_items: list[NewItem]):
    self._dataset, self.path, self.image_size = dataset, dataset.path, dataset.image_size
    self.manifest, self.num_catalogue = dataset.manifest, len(dataset.items)
    self.items = list(dataset.items) + [
        formats.Item(source_id=f'new:{i}', title=n.title, brand=n.brand, category=n.category, price=n.price,
                     has_image=bool(n.image_path)) for i, n in enumerate(new_items)]
    self._pictures = [self._load(n.image_path) for n in new_items]

  def _load(self, path: str) -> np.ndarray | None:
    if not path:
      return None
    with open(path, 'rb') as f:
      return images_lib.decode(f.read(), self.image_size, path)

  def images(self, item_ids) -> np.ndarray:
    item_ids = np.asarray(item_ids, np.int64)
    out = np.zeros((len(item_ids), self.image_size, self.image_size, 3), np.uint8)
    old = item_ids < self.num_catalogue
    if old.any():
      out[old] = self._dataset.images(item_ids[old])
    for row in np.flatnonzero(~old):
      picture = self._pictures[item_ids[row] - self.num_catalogue]
      if picture is not None:  # a new item without a picture stays black, as a catalogue one does
        out[row] = picture
    return out

  def tokenizer(self):
    return self._dataset.tokenizer()


class InputError(ValueError):
  """A request the model cannot answer for; the message names the command-line flag."""


def _item_id(flag: str, text, num_items: int) -> int:
  try:
    item = int(text)
  except ValueError:
    raise InputError(f'{flag} {text!r}: not an item id') from None
  if not 0 <= item < num_items:
    raise InputError(f'{flag} {item}: not an item id of this catalogue (0 to {num_items - 1})')
  return item


def new_item(spec: str) -> NewItem:
  """A `--new_item 'image|title|category|brand|price'` (image and the last three may be empty)."""
  parts = spec.split('|')
  if not 2 <= len(parts) <= 5:
    raise InputError(f"--new_item {spec!r}: expected 'image|title|category|brand|price'")
  parts += [''] * (5 - len(parts))
  if parts[0] and not os.path.isfile(parts[0]):
    raise InputError(f'--new_item {spec!r}: no picture at {parts[0]!r}')
  try:
    price = float(parts[4]) if parts[4] else None
  except ValueError:
    raise InputError(f'--new_item {spec!r}: price {parts[4]!r} is not a number') from None
  return NewItem(parts[0], parts[1], parts[2], parts[3], price)


def check_request(num_items: int, num_slots: int, *, history=(), new_items=(), top_k: int = 10, rate=None,
                  select=(), generate: str = '', generate_out: str = '', image_codes: bool = False) -> dict:
  """A prediction request (strings as the command line gives them) checked against the catalogue, before
  any model is loaded: {'history': ids then NewItems, 'rate': id or None, 'select': ids}. `image_codes`:
  whether the model was trained with them (it can generate pictures)."""
  history = [_item_id('--history', h, num_items) for h in history] + [new_item(s) for s in new_items]
  unseen = num_items - len({h for h in history if isinstance(h, int)})
  if not 1 <= top_k <= unseen:
    raise InputError(f'--top_k {top_k}: must be between 1 and {unseen}, the catalogue items not in the history')
  rate = None if rate is None else _item_id('--rate', rate, num_items)
  select = [_item_id('--select', c, num_items) for c in select]
  if select and len(select) != num_slots:
    raise InputError(f'--select: {len(select)} candidates; selection takes exactly {num_slots}')
  if bool(generate) != bool(generate_out):
    raise InputError('--generate QUERY and --generate_out FILE.png go together')
  if generate and not image_codes:
    raise InputError('--generate: this run was trained without image codes (config.data.image_codes)')
  if generate and any(isinstance(h, NewItem) for h in history):
    raise InputError('--generate: a new item has no image codes; give catalogue items only')
  return {'history': history, 'rate': rate, 'select': select}


class Predictor:
  """A trained model, its task builder and compiled functions, ready to answer for any history."""

  def __init__(self, cfg, graphdef, params, dataset: formats.UnifiedDataset, workdir: str, step: int | None = None):
    """`params` as trained (a checkpoint's, of `step`); content item rows are written in here (model.items)."""
    self.cfg, self.graphdef, self.dataset, self.workdir, self.step = cfg, graphdef, dataset, workdir, step
    self.builder = datasets.make_builder(cfg, dataset, workdir)
    self.params = items.inference_params(graphdef, params, self.builder)

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None) -> 'Predictor':
    """A main-job or benchmark run directory's checkpoint at `step` (default: the step the run hands on;
    unimp_jax.runs.load)."""
    run = runs.load(workdir, step)
    return cls(run.cfg, run.graphdef, run.params, run.dataset, workdir, run.step)

  # ---- one example from a history ------------------------------------------------------------------
  def history_view(self, history: list):
    """(the catalogue with the history's new items after it, the history as item ids of that view)."""
    new = [h for h in history if isinstance(h, NewItem)]
    view = _CatalogueView(self.dataset, new) if new else self.dataset
    ids, next_new = [], len(self.dataset.items)
    for h in history:
      if isinstance(h, NewItem):
        ids.append(next_new)
        next_new += 1
      else:
        if not 0 <= int(h) < len(self.dataset.items):
          raise ValueError(f'history item {h} is not in the catalogue (0..{len(self.dataset.items) - 1})')
        ids.append(int(h))
    return view, ids

  def _example(self, task: str, history: list, target: formats.Interaction, selections=()):
    view, ids = self.history_view(history)
    new = [h for h in history if isinstance(h, NewItem)]
    builder = self.builder
    if new:
      if builder.item_content == 'ids':
        raise ValueError('this model reads item ids only (config.data.item_content=ids): new items cannot be shown')
      builder = prompts.TaskBuilder(view, builder.tokenizer, seq_len=builder.seq_len, num_images=builder.num_images,
                                    history=builder.history, item_codes=builder.item_codes,
                                    item_content=builder.item_content)
    user = formats.User('predict', tuple(formats.Interaction(item=i) for i in ids) + (target,), tuple(selections))
    example = builder.build(task, user, len(ids), with_answer=False, rng=np.random.default_rng(0))
    width = generate.bucket_length(example.prompt_length, builder.seq_len)
    tokens = example.tokens[None, :width]
    images = None
    if builder.uses_images:
      images = pipeline.gather_images(view, example.image_items)[None]
    return builder, example, tokens, images, np.asarray([example.prompt_length], np.int32)

  def _answer_logits(self, tokens, images, lengths) -> np.ndarray:
    return np.asarray(base.answer_logits(self.graphdef, self.params, tokens, images, lengths,
                                         pad_id=self.builder.pad))[0]

  def recommend(self, history: list, k: int = 10, query: str = '') -> list[tuple[int, float]]:
    """The k most likely next items (probabilities over the catalogue), history items excluded; a
    query turns it into search."""
    task = (search.TASK if query else recommendation.TASK).name
    builder, _, tokens, images, lengths = self._example(task, history, formats.Interaction(item=0, query=query))
    item_tokens = builder.item_tokens
    if item_tokens.shape[1] == 1:
      logits = self._answer_logits(tokens, images, lengths)[item_tokens[:, 0]]
      seen = [h for h in history if not isinstance(h, NewItem)]
      logits[seen] = -np.inf
      probs = np.exp(logits - logits.max())
      probs /= probs.sum()
      top = np.argsort(-probs)[:k]
      return [(int(i), float(probs[i])) for i in top]
    banned = np.zeros((1, len(item_tokens)), bool)
    banned[0, [h for h in history if not isinstance(h, NewItem)]] = True
    trie = base.item_trie(self.builder)
    out, scores = generate.beam_search(self.graphdef, self.params, tokens, images, lengths, banned, num_beams=k,
                                       max_new=item_tokens.shape[1], pad_id=builder.pad, eos_id=builder.eos, trie=trie)
    items = trie.items(np.asarray(out)[0])
    return [(int(i), float(np.exp(s))) for i, s in zip(items, np.asarray(scores)[0]) if i >= 0]

  def rate(self, history: list, item: int) -> dict:
    """Rating probabilities for `item`, the argmax and expected rating, and the explanation generated
    after the argmax rating."""
    builder, _, tokens, images, lengths = self._example(preference.TASK.name, history,
                                                        formats.Interaction(item=int(item)))
    probs, text = preference.rating_and_explanation(self.graphdef, self.params, builder, tokens, images, lengths)
    probs = probs[0]
    return {'rating': int(probs.argmax()) + 1, 'expected_rating': float(np.dot(probs, np.arange(1, 6))),
            'probabilities': probs.tolist(), 'explanation': base.decode_text(builder, text[0])}

  def generate(self, history: list, query: str, decoding: str = 'greedy', seed: int = 0) -> np.ndarray:
    """The picture (uint8 [H, W, 3]) of the item `query` asks for, given this history: image codes generated
    under the code constraint (unimp_jax.tasks.generation), drawn by the image tokenizer whose codes the
    model was trained on (the workdir of `data.image_codes`)."""
    if self.builder.image_codes is None:
      raise ValueError('this model was trained without image codes (config.data.image_codes): it cannot '
                       'generate pictures')
    if any(isinstance(h, NewItem) for h in history):
      raise ValueError('a new item has no image codes: generation takes catalogue items only')
    builder, _, tokens, images, lengths = self._example(generation.TASK.name, history,
                                                        formats.Interaction(item=0, query=query))
    codes = generation.generate_codes(self.graphdef, self.params, builder, tokens, images, lengths,
                                      decoding=decoding, rng=jax.random.key(seed))
    return generation.pictures(builder, codes)[0]

  def select(self, history: list, candidates: list[int]) -> list[int]:
    """The candidates (catalogue item ids) the model picks for this user."""
    if len(candidates) != self.builder.ids.num_slots:
      raise ValueError(f'selection takes exactly {self.builder.ids.num_slots} candidates, got {len(candidates)}')
    question = formats.Selection(tuple(int(c) for c in candidates), (int(candidates[0]),))
    builder, _, tokens, images, lengths = self._example(selection.TASK.name, history, formats.Interaction(item=0),
                                                        selections=(question,))
    mask = int(selection.chosen_slots(self.graphdef, self.params, builder, tokens, images, lengths)[0])
    return [c for s, c in enumerate(candidates) if mask >> s & 1]
