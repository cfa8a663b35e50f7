"""The benchmark report: every method and task in the tables, ceilings and throughput ratio, the plot."""

import os

import numpy as np
import pytest
from PIL import Image

from unimp_jax import benchmark, config as config_lib
from unimp_jax.eval import ranking
from unimp_jax.train import report


def _ranked(hr10):
  return {'users': 200, **{k: hr10 for k in ranking.ranking_metrics([0]).keys()}}


def test_markdown_and_plot(tmp_path):
  results = {'UniMP': {'recommendation': _ranked(0.3), 'recommendation, cold targets': _ranked(0.25),
                       'search': _ranked(0.2),
                       'preference': {'users': 200, 'RMSE (argmax)': 1.1, 'BLEU-4': 3.0},
                       'selection': {'users': 200, 'F1': 0.5},
                       'generation': {'SSIM': 0.2, "user's colour shown": 0.44, 'users': 200}},
             'generation: tokenizer reconstruction of the target (ceiling)': {
                 'generation': {'SSIM': 0.7, "user's colour shown": 0.88, 'users': 200}},
             'UniMP text only': {'recommendation': _ranked(0.1)},
             'popularity': {'recommendation': _ranked(0.02), 'recommendation, cold targets': _ranked(0.0)}}
  ceilings = {'oracle HR@10': 0.44}
  text = report.benchmark_markdown('fashion', config_lib.base_config(), results, ceilings,
                                   {'model': 'UniMP', 'full': 50.0, 'paper': 5.0},
                                   'python -m unimp_jax.benchmark --dataset fashion --workdir W',
                                   {'popularity': {'difference': 0.28, 'low': 0.2, 'high': 0.36},
                                    'UniMP text only': {'difference': 0.01, 'low': -0.02, 'high': 0.04}})
  assert '| popularity | 0.2800 | 0.2000 | 0.3600 | yes |' in text
  assert '| UniMP text only | 0.0100 | -0.0200 | 0.0400 | no |' in text
  cold = text[text.index('## recommendation, cold targets'):text.index('## search')]
  assert '| UniMP | 200 | 0.2500 |' in cold and '| popularity | 200 | 0.0000 |' in cold
  assert 'UniMP text only' not in cold  # only methods scored on cold targets
  assert "| method | users | SSIM | user's colour shown |" in text
  assert '| generation: tokenizer reconstruction of the target (ceiling) | 200 | 0.7000 | 0.8800 |' in text
  for needle in ('## recommendation', '## search', '## preference', '## selection', '| UniMP text only |',
                 '| popularity |', '*oracle HR@10*', '| 10.0000 |', 'HR@10 s.e.',
                 '| 0.0324 |', 'BLEU-4', 'hr10.png'):  # 0.0324 = sqrt(0.3 * 0.7 / 200), HR@10's s.e.
    assert needle in text, needle
  path = str(tmp_path / 'hr10.png')
  report.plot_benchmark(path, results, ceilings)
  assert Image.open(path).size[0] > 300 and os.path.getsize(path) > 5000


def test_variants_are_chosen_by_name_and_unimp_always_runs():
  assert list(benchmark.chosen_variants('fashion', None)) == list(benchmark.VARIANTS['fashion'])
  assert list(benchmark.chosen_variants('fashion', ['UniMP text only'])) == ['UniMP', 'UniMP text only']
  with pytest.raises(config_lib.ConfigError, match="--variants: \\['UniMP text'\\]"):
    benchmark.chosen_variants('fashion', ['UniMP text'])


def test_selection_chance_rows_are_the_user_blind_answers_f1():
  # Positives as slot bitmasks over 3 slots: answering "every slot" scores precision 1/3 or 2/3, recall 1.
  positives = np.array([0b001, 0b011])
  rows = benchmark.selection_chance_rows(positives, 3)
  assert list(rows) == ['selection: random slot set F1 (chance)', 'selection: every slot', 'selection: first slot']
  assert rows['selection: every slot'] == {'selection': {'users': 2, 'F1': pytest.approx((0.5 + 0.8) / 2)}}
  assert rows['selection: first slot']['selection']['F1'] == pytest.approx((1 + 2 / 3) / 2)
