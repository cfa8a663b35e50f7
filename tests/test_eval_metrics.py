"""Rating, text and selection metrics against hand-computed values and direct sacrebleu / rouge-score calls."""

import math

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from unimp_jax.eval import metrics

# ---- rating -----------------------------------------------------------------------------------------------


def test_rating_hand_case():
  # Row 0: certain of 3, true 3. Row 1: 60% on 1, 40% on 5, true 5 -> argmax 1 (error -4), expected 2.6 (-2.4).
  probs = [[0, 0, 1, 0, 0], [0.6, 0, 0, 0, 0.4]]
  out = metrics.rating_metrics(probs, [3, 5])
  assert out['RMSE (argmax)'] == pytest.approx(math.sqrt(16 / 2))
  assert out['MAE (argmax)'] == pytest.approx(4 / 2)
  assert out['RMSE (expected)'] == pytest.approx(math.sqrt(2.4 ** 2 / 2))
  assert out['MAE (expected)'] == pytest.approx(2.4 / 2)
  # Unnormalised rows (a full-vocabulary softmax restricted to the five rating tokens) give the same numbers.
  assert metrics.rating_metrics(np.asarray(probs) * [[0.3], [0.01]], [3, 5]) == pytest.approx(out)


def test_rating_against_an_independent_loop():
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.ones(5), size=200)
  true = rng.integers(1, 6, size=200)
  sq_arg = abs_arg = sq_exp = abs_exp = 0.0
  for p, t in zip(probs, true):
    best = max(range(5), key=lambda k: p[k]) + 1
    mean = sum((k + 1) * p[k] for k in range(5))
    sq_arg, abs_arg = sq_arg + (best - t) ** 2, abs_arg + abs(best - t)
    sq_exp, abs_exp = sq_exp + (mean - t) ** 2, abs_exp + abs(mean - t)
  out = metrics.rating_metrics(probs, true)
  assert out == pytest.approx({'RMSE (argmax)': math.sqrt(sq_arg / 200), 'MAE (argmax)': abs_arg / 200,
                               'RMSE (expected)': math.sqrt(sq_exp / 200), 'MAE (expected)': abs_exp / 200})


@pytest.mark.parametrize('probs, true, message', [
    (np.ones((2, 4)), [1, 2], r'expected \[N, 5\]'),
    (np.ones((2, 5)), [1, 6], '1..5'),
    (np.ones((2, 5)), [1], 'match probs'),
    ([[1, -1, 0, 0, 0]], [1], 'not logits'),
    (np.zeros((0, 5)), [], 'empty'),
])
def test_rating_bad_input(probs, true, message):
  with pytest.raises(ValueError, match=message):
    metrics.rating_metrics(probs, np.asarray(true, np.int64))

# ---- text -------------------------------------------------------------------------------------------------


def test_identical_text_scores_perfectly():
  sentences = ['the fit is great and the colour is lovely', 'it arrived quickly']
  out = metrics.text_metrics(sentences, sentences)
  assert out == pytest.approx({'BLEU-4': 100.0, 'BLEU-1': 100.0, 'ROUGE-1': 1.0, 'ROUGE-2': 1.0, 'ROUGE-L': 1.0})


def test_text_hand_case_bleu1_carries_the_brevity_penalty():
  # 3 of 3 unigrams match, but the hypothesis is half the reference: BP = exp(1 - 6/3).
  out = metrics.text_metrics(['the cat sat'], ['the cat sat on the mat'])
  assert out['BLEU-1'] == pytest.approx(100 * math.exp(-1), abs=1e-2)
  assert out['ROUGE-1'] == pytest.approx(2 * 1 * 0.5 / 1.5)      # P 3/3, R 3/6
  assert out['ROUGE-2'] == pytest.approx(2 * 1 * 0.4 / 1.4)      # P 2/2, R 2/5
  assert out['ROUGE-L'] == pytest.approx(2 * 1 * 0.5 / 1.5)      # LCS 3


def test_text_matches_direct_library_calls_and_bleu_is_corpus_level():
  hyps = ['the cat sat on the mat', 'a dog', 'great shoes , very comfortable for running']
  refs = ['the cat sat on the mat today', 'a dog barked loudly at night', 'comfortable running shoes , great fit']
  out = metrics.text_metrics(hyps, refs)
  assert out['BLEU-4'] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize='13a').score)
  assert out['BLEU-1'] == pytest.approx(sacrebleu.metrics.BLEU(max_ngram_order=1).corpus_score(hyps, [refs]).score)
  # Corpus BLEU pools n-gram counts; the mean of sentence BLEUs is a different number.
  two = metrics.text_metrics(hyps[:2], refs[:2])['BLEU-4']
  sentence_mean = np.mean([sacrebleu.sentence_bleu(h, [r]).score for h, r in zip(hyps[:2], refs[:2])])
  assert two == pytest.approx(sacrebleu.corpus_bleu(hyps[:2], [refs[:2]]).score)
  assert abs(two - sentence_mean) > 1.0
  scorer = rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeL'], use_stemmer=True)
  direct = [scorer.score(r, h) for h, r in zip(hyps, refs)]
  for key, rouge_type in (('ROUGE-1', 'rouge1'), ('ROUGE-2', 'rouge2'), ('ROUGE-L', 'rougeL')):
    assert out[key] == pytest.approx(np.mean([d[rouge_type].fmeasure for d in direct]))


def test_text_bad_input():
  with pytest.raises(ValueError, match='empty'):
    metrics.text_metrics([], [])
  with pytest.raises(ValueError, match='2 hypotheses but 1 references'):
    metrics.text_metrics(['a', 'b'], ['a'])

# ---- selection --------------------------------------------------------------------------------------------
# Slots chosen / true: {0,1}/{0} P .5 R 1 F1 2/3; {}/{1} 0 0 0; {2}/{1,2} 1 .5 2/3; {0}/{0} 1 1 1 (exact).
PREDICTED_BITS, TRUE_BITS = [0b011, 0b000, 0b100, 0b001], [0b001, 0b010, 0b110, 0b001]
EXPECTED = {'precision': 2.5 / 4, 'recall': 2.5 / 4, 'F1': (7 / 3) / 4, 'exact-set accuracy': 1 / 4}


def _bools(bits):
  return np.asarray([[(b >> s) & 1 for s in range(3)] for b in bits], bool)


def test_selection_hand_case_bitmasks_and_booleans_agree():
  assert metrics.selection_metrics(PREDICTED_BITS, TRUE_BITS) == pytest.approx(EXPECTED)
  assert metrics.selection_metrics(_bools(PREDICTED_BITS), _bools(TRUE_BITS)) == pytest.approx(EXPECTED)
  assert metrics.selection_metrics(PREDICTED_BITS, _bools(TRUE_BITS)) == pytest.approx(EXPECTED)
  # Macro over examples: micro precision would be 3 hits / 4 chosen = 0.75.
  assert EXPECTED['precision'] != 0.75


def test_selection_bad_input():
  with pytest.raises(ValueError, match='example 1 has no true slot'):
    metrics.selection_metrics([1, 1], [1, 0])
  with pytest.raises(ValueError, match='at or above slot 3'):
    metrics.selection_metrics([0b1000], _bools([1]))
  with pytest.raises(ValueError, match='slots but true'):
    metrics.selection_metrics(_bools([1, 2]), _bools([1]))


def test_colour_agreement_counts_the_top_items_in_each_users_most_frequent_history_colour():
  colour = np.asarray([0, 0, 1, 1, 2, 2])
  histories = [np.asarray([0, 1, 2]), np.asarray([2, 3, 4, 5, 4])]  # favourites: 0, then 2 (beats 1 by count)
  top = np.asarray([[0, 2, 4], [4, 5, 3]])
  # user 0: 1 of 3 is colour 0; user 1: 2 of 3 are colour 2
  assert metrics.colour_agreement(top, histories, colour) == pytest.approx((1 / 3 + 2 / 3) / 2)


def test_paired_bootstrap_is_reproducible_and_centred_on_the_difference():
  rng = np.random.default_rng(0)
  a = (rng.random(500) < 0.3).astype(float)
  b = np.where(rng.random(500) < 0.8, a, 1 - a)  # paired: b mostly agrees with a
  one, again = metrics.paired_bootstrap(a, b, seed=1), metrics.paired_bootstrap(a, b, seed=1)
  assert one == again and one != metrics.paired_bootstrap(a, b, seed=2)
  assert one['difference'] == pytest.approx(a.mean() - b.mean())
  assert one['low'] < one['difference'] < one['high']
  # The interval has the paired standard error's width: 1.96 * std(a - b) / sqrt(n), within 15%.
  width = 2 * 1.96 * np.std(a - b) / np.sqrt(len(a))
  assert (one['high'] - one['low']) == pytest.approx(width, rel=0.15)
  with pytest.raises(ValueError, match='paired'):
    metrics.paired_bootstrap(a, b[:-1])
