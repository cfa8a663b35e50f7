"""Metrics for the generative tasks: preference (rating), explanation (text) and image selection.

Pure functions, numpy / Python lists in, a dict of floats out. Recommendation and search ranking
metrics live in unimp_jax.eval.ranking.

Conventions, stated once because papers differ on them:
- Rating: the model's distribution over `rate_1..rate_5` gives two point predictions, the most likely
  rating (argmax) and the expected rating sum(r * p_r); both are reported.
- Text: BLEU on the 0-100 scale as sacrebleu reports it, corpus level (n-gram counts summed over all
  sentences before the precisions are taken, one brevity penalty for the corpus), sacrebleu's default
  '13a' tokenisation and 'exp' smoothing, one reference per hypothesis. BLEU-1 is the same with
  max_ngram_order=1 (so it still carries the brevity penalty: it is not bare unigram precision).
  ROUGE on the 0-1 scale: rouge-score's F-measure per sentence, with its Porter stemmer, averaged over
  sentences. The two scales are the libraries' own, so numbers compare with their documentation.
- Selection: per-example precision, recall and F1 of the chosen slot set, then the mean over examples
  (macro over examples, not micro over slots), so every question counts once whatever its number of
  positives. An empty prediction has precision 0 (it chose nothing right); every question must have at
  least one true slot.
"""

from __future__ import annotations

import numpy as np
import sacrebleu

RATINGS = np.arange(1, 6)
BLEU_TOKENIZE = '13a'
ROUGE_TYPES = ('rouge1', 'rouge2', 'rougeL')
ROUGE_USE_STEMMER = True


def rating_metrics(probs, true) -> dict[str, float]:
  """probs: [N, 5] non-negative scores of ratings 1..5 (e.g. the softmax of the rate_1..rate_5 logits, or a
  full-vocabulary softmax restricted to those five tokens); rows need not sum to 1: each row is divided by its
  sum before the expectation (the argmax is unchanged). true: [N] integer ratings 1..5.

  Returns RMSE and MAE of the argmax rating and of the expected rating sum(r * p_r).
  """
  probs = np.asarray(probs, np.float64)
  true = np.asarray(true)
  if probs.ndim != 2 or probs.shape[1] != len(RATINGS):
    raise ValueError(f'probs has shape {list(probs.shape)}; expected [N, {len(RATINGS)}] over ratings 1..5')
  if true.shape != (len(probs),):
    raise ValueError(f'true has shape {list(true.shape)}; expected [{len(probs)}] to match probs')
  if len(probs) == 0:
    raise ValueError('no examples: rating metrics of an empty set are undefined')
  if not np.isin(true, RATINGS).all():
    raise ValueError(f'true ratings must be integers 1..5; got {sorted(set(true[~np.isin(true, RATINGS)].tolist()))}')
  totals = probs.sum(1)
  if (probs < 0).any() or not np.isfinite(probs).all() or (totals <= 0).any():
    raise ValueError('every row of probs must be finite, non-negative and not all zero (pass probabilities, '
                     'not logits)')
  return rating_errors(true, argmax=RATINGS[probs.argmax(1)], expected=(probs / totals[:, None]) @ RATINGS)


def rating_errors(true, **predictions) -> dict[str, float]:
  """{'RMSE (name)', 'MAE (name)'} of each named prediction [N] against the true ratings [N]."""
  out = {}
  for name, predicted in predictions.items():
    error = np.asarray(predicted, np.float64) - true
    out[f'RMSE ({name})'] = float(np.sqrt(np.mean(error ** 2)))
    out[f'MAE ({name})'] = float(np.mean(np.abs(error)))
  return out


def text_metrics(hypotheses: list[str], references: list[str]) -> dict[str, float]:
  """Corpus BLEU-4 and BLEU-1 (0-100, sacrebleu) and sentence-averaged ROUGE-1/2/L F-measure (0-1, rouge-score)
  of generated explanations against one reference each."""
  hypotheses, references = list(hypotheses), list(references)
  if not hypotheses:
    raise ValueError('no hypotheses: text metrics of an empty set are undefined')
  if len(hypotheses) != len(references):
    raise ValueError(f'{len(hypotheses)} hypotheses but {len(references)} references; pass one reference each')
  out = {}
  for name, order in (('BLEU-4', 4), ('BLEU-1', 1)):
    bleu = sacrebleu.metrics.BLEU(max_ngram_order=order, tokenize=BLEU_TOKENIZE)
    out[name] = float(bleu.corpus_score(hypotheses, [references]).score)
  from rouge_score import rouge_scorer  # here, not at the top: it imports nltk and scipy.stats (2 s per process)
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=ROUGE_USE_STEMMER)
  scores = [scorer.score(ref, hyp) for hyp, ref in zip(hypotheses, references)]  # score(target, prediction)
  for rouge_type in ROUGE_TYPES:
    out[f'ROUGE-{rouge_type[5:]}'] = float(np.mean([s[rouge_type].fmeasure for s in scores]))
  return out


def _as_slot_sets(x: np.ndarray, name: str, num_slots: int) -> np.ndarray:
  """[N] int bitmasks (bit s set = slot s chosen) or [N, S] bools -> [N, num_slots] bool."""
  if x.ndim == 2:
    if not (x.dtype == bool or np.isin(x, (0, 1)).all()):
      raise ValueError(f'{name}: a [N, S] slot array must hold booleans (or 0/1)')
    return x.astype(bool)
  if x.ndim != 1 or not (x.size == 0 or np.issubdtype(x.dtype, np.integer)) or (x < 0).any():
    raise ValueError(f'{name}: expected [N] non-negative integer bitmasks or [N, S] booleans, got '
                     f'{x.dtype}{list(x.shape)}')
  x = x.astype(np.int64)
  if (x >> num_slots).any():
    raise ValueError(f'{name}: a bitmask sets a bit at or above slot {num_slots}, the other array\'s slot count')
  return ((x[:, None] >> np.arange(num_slots)) & 1).astype(bool)


def selection_metrics(predicted, true) -> dict[str, float]:
  """Precision, recall, F1 (per-example, then averaged over examples) and exact-set accuracy of the chosen
  slots. predicted, true: [N] integer bitmasks (bit s set = slot s_s chosen) or [N, S] booleans."""
  predicted, true = np.asarray(predicted), np.asarray(true)
  widths = [a.shape[1] for a in (predicted, true) if a.ndim == 2]
  num_slots = widths[0] if widths else max(1, *(int(a.max(initial=0)).bit_length() for a in (predicted, true)))
  predicted, true = _as_slot_sets(predicted, 'predicted', num_slots), _as_slot_sets(true, 'true', num_slots)
  if predicted.shape != true.shape:
    raise ValueError(f'predicted is {list(predicted.shape)} slots but true is {list(true.shape)}')
  if len(true) == 0:
    raise ValueError('no examples: selection metrics of an empty set are undefined')
  num_true = true.sum(1)
  if (num_true == 0).any():
    raise ValueError(f'example {int(np.argmin(num_true))} has no true slot; every question needs a positive')
  hits, num_predicted = (predicted & true).sum(1), predicted.sum(1)
  precision = np.where(num_predicted > 0, hits / np.maximum(num_predicted, 1), 0.0)
  recall = hits / num_true
  f1 = np.where(hits > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
  return {'precision': float(precision.mean()), 'recall': float(recall.mean()), 'F1': float(f1.mean()),
          'exact-set accuracy': float((predicted == true).all(1).mean())}


def colour_agreement(top_items: np.ndarray, histories: list[np.ndarray], item_colour: np.ndarray) -> float:
  """Share of recommended items (`top_items` [users, K]) in each user's most frequent history colour
  (ties: the lowest colour index), averaged over users: "colour agreement@K". It reads the embedded
  dataset's hidden colours (`extra.item_colour`), so it shows whether a ranker follows what only the
  pictures show; a ranker blind to colour scores about the catalogue share of that colour."""
  item_colour = np.asarray(item_colour)
  return float((item_colour[np.asarray(top_items)] == favourite_colours(histories, item_colour)[:, None]).mean())


def favourite_colours(histories: list[np.ndarray], item_colour: np.ndarray) -> np.ndarray:
  """Each history's most frequent item colour (ties: the lowest colour index)."""
  item_colour = np.asarray(item_colour)
  return np.asarray([np.bincount(item_colour[np.asarray(h, np.int64)], minlength=item_colour.max() + 1).argmax()
                     for h in histories])


def paired_bootstrap(a, b, *, samples: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
  """Mean of a - b over paired per-user values (e.g. hit@10 indicators of two methods on the same
  users, in the same order) and its percentile bootstrap interval: users are resampled with
  replacement, the same resample for both methods, so what the users share cancels out."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1 or not len(a):
    raise ValueError(f'paired values need two equal, non-empty 1-D shapes, got {a.shape} and {b.shape}')
  diff = a - b
  picks = np.random.default_rng(seed).integers(0, len(diff), size=(samples, len(diff)))
  means = diff[picks].mean(1)
  tail = (1 - level) / 2 * 100
  low, high = np.percentile(means, [tail, 100 - tail])
  return {'difference': float(diff.mean()), 'low': float(low), 'high': float(high)}
