"""What a task is: how its examples are written, how it is scored, and what the main job shows of it.

A task is one object (`Task` subclass, one module each) in the registry `unimp_jax.tasks.TASKS`. The
prompt builder (unimp_jax.data.prompts) assembles the chunks every task shares and asks the task for
what differs: the answer a history chunk carries, what follows the history, the final answer and its
length. Evaluation (unimp_jax.eval.evaluate) batches held-out users and asks the task for one row per
user and for the metrics of those rows. The main job asks it for extra tables and a gallery.

The name is the key of the task's proportion (`data.tasks`) and loss weight (`data.task_weights`) in
the config; its position in the registry is the `task` index batches carry and the loss sums per task.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimp_jax.data import formats
from unimp_jax.eval import generate


@dataclasses.dataclass(frozen=True)
class EvalContext:
  """What every task's evaluation reads: the model, the prompt builder and the protocol options."""
  graphdef: object
  params: dict
  builder: object           # unimp_jax.data.prompts.TaskBuilder
  ranking: str = 'full'     # unimp_jax.eval.evaluate.RANKINGS
  negatives: int = 0        # sampled-negatives protocol (0: the whole catalogue)
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class EvalBatch:
  """A fixed-size batch of held-out prompts (padded by repeating the last one); the first `real` rows
  are the `examples` of `users` at interaction `targets`."""
  examples: list            # unimp_jax.data.prompts.Example, real rows only
  users: list[formats.User]
  user_ids: np.ndarray
  targets: np.ndarray
  tokens: np.ndarray        # int32 [B, T]
  images: np.ndarray | None  # normalised [B, N, H, W, C]
  lengths: np.ndarray       # int32 [B]: prompt lengths
  real: int


class Task(abc.ABC):
  """One kind of example. Subclasses set the class attributes and implement the abstract methods."""
  name: str
  instruction: str            # after the history and tail; '{query}' is the interaction's query
  answers_items = False       # final answers are catalogue items: ranked, reported for warm and cold targets
  history_answers_ids = False  # history chunks answer with the item's id (written once with `ids` content)
  shows_item_text = True      # history chunks show the item's text (`data.item_content` permitting)
  evaluated = True            # False: trained only; `evaluate` says why it is not scored

  def available(self, builder, user: formats.User) -> bool:
    """Whether `user` has what this task's examples need (e.g. ratings)."""
    del builder, user
    return True

  @abc.abstractmethod
  def answer_length(self, builder) -> int:
    """Tokens of the longest final answer, end-of-sequence not counted."""

  @abc.abstractmethod
  def history_answer(self, builder, inter: formats.Interaction) -> list[int]:
    """The answer span of a history chunk; [] when the history does not know it."""

  @abc.abstractmethod
  def tail(self, builder, user: formats.User, target: int, inter: formats.Interaction, rng):
    """(chunks after the history, the final answer's token ids, the evaluation target int32 [4]:
    item id | rating | positive-slot bitmask | unused, -1 where not used)."""

  @abc.abstractmethod
  def evaluate(self, ctx: EvalContext, batch: EvalBatch) -> dict[str, np.ndarray]:
    """Columns of one row per real example of `batch`."""

  @abc.abstractmethod
  def summarise(self, rows: dict[str, np.ndarray], builder) -> dict[str, float]:
    """Metrics of all users' rows (`evaluate`'s columns plus 'user' and 'target')."""

  def report_tables(self, predictor, split: str, rows: dict[str, np.ndarray] | None) -> dict[str, dict]:
    """Extra tables for the main job's report, {title: {name: value}}, beyond the task's metrics
    (`rows`: the evaluation's, None for a task that is not evaluated)."""
    del predictor, split, rows
    return {}

  def gallery(self, predictor, split: str, workdir: str, num_users: int) -> list[str]:
    """Writes this task's gallery into `workdir` and returns its report section; [] if it has none."""
    del predictor, split, workdir, num_users
    return []


@functools.partial(jax.jit, static_argnames=('graphdef', 'pad_id'))
def answer_logits(graphdef, params, tokens_bt, images, prompt_length_b, *, pad_id: int) -> jax.Array:
  """Logits [B, V] of the first answer token (one forward pass)."""
  logits = nnx.merge(graphdef, params)(tokens_bt, images, tokens_bt != pad_id)
  return jnp.take_along_axis(logits, (prompt_length_b - 1)[:, None, None], axis=1)[:, 0]


_TRIES = weakref.WeakKeyDictionary()


def item_trie(builder) -> generate.ItemTrie:
  """The builder's item-id trie, built once: beam search compiles once per trie (a static argument)."""
  if builder not in _TRIES:
    _TRIES[builder] = generate.ItemTrie.build(builder.item_tokens)
  return _TRIES[builder]


def item_answer(builder, inter: formats.Interaction) -> list[int]:
  """The item's id tokens; [] for an item without an id (a prediction's new item)."""
  return list(builder.item_tokens[inter.item]) if inter.item < len(builder.item_tokens) else []


def decode_text(builder, tokens: np.ndarray) -> str:
  """Generated tokens up to end-of-sequence as text (added tokens dropped)."""
  end = np.flatnonzero(tokens == builder.eos)
  return builder.tokenizer.decode(tokens[:end[0] if len(end) else len(tokens)], skip_special_tokens=True).strip()
