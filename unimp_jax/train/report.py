"""A run's Markdown report: summary, evaluation tables and the loss curves from `metrics.jsonl`.

Loss series are the keys `loss` (the total training loss) and `loss/<task>` (per-task losses) of the
records `train/metrics.MetricsWriter` appends. Plotting uses matplotlib's object API on an Agg canvas,
never pyplot, so it needs no display and touches no global figure state.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

TOTAL_LOSS = 'loss'
TASK_LOSS_PREFIX = 'loss/'
_AT_K = re.compile(r'^(?P<name>.+)@(?P<k>\d+)$')


def read_metrics(path: str) -> list[dict]:
  """Records of a metrics.jsonl, sorted by step; a step written twice (a resumed run) keeps its last."""
  by_step: dict[int, dict] = {}
  with open(path) as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{line_number}: not a JSON object: {e}') from None
      by_step[int(record['step'])] = record
  return [by_step[step] for step in sorted(by_step)]


def loss_series(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
  """{'loss': (steps, values), 'loss/<task>': ...}: the total first, then tasks alphabetically."""
  names = sorted({k for r in records for k in r if k == TOTAL_LOSS or k.startswith(TASK_LOSS_PREFIX)},
                 key=lambda k: (k != TOTAL_LOSS, k))
  series = {}
  for name in names:
    points = [(r['step'], r[name]) for r in records if name in r and r[name] is not None]
    series[name] = ([s for s, _ in points], [v for _, v in points])
  return series


def plot_losses(series: Mapping[str, tuple[list[int], list[float]]], path: str) -> Figure:
  """Draws one line per series to a PNG at `path`; returns the figure (one axes, one line each)."""
  fig = Figure(figsize=(8, 4.5), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for name, (steps, values) in series.items():
    total = name == TOTAL_LOSS
    ax.plot(steps, values, label=name, linewidth=2.0 if total else 1.0, color='black' if total else None)
  ax.set_xlabel('step')
  ax.set_ylabel('loss')
  ax.grid(alpha=0.3)
  if series:
    ax.legend(fontsize='small')
  fig.tight_layout()
  fig.savefig(path, format='png')
  return fig


def _format(value) -> str:
  if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
    value = float(value)
    if math.isfinite(value) and value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
      return f'{value:.4g}'
    return f'{value:.4f}'
  return str(value).replace('|', '\\|')


def table(header: list[str], rows: list[list]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(_format(v) for v in row) + ' |' for row in rows]
  return '\n'.join(lines)


def metrics_table(metrics: Mapping[str, float]) -> str:
  """A two-column table; metrics that all read `NAME@K` (HR@1, NDCG@10, ...) become NAME x K instead."""
  matches = [_AT_K.match(k) for k in metrics]
  if metrics and all(matches):
    names = list(dict.fromkeys(m['name'] for m in matches))
    ks = sorted({int(m['k']) for m in matches})
    rows = [[name] + [metrics.get(f'{name}@{k}', '') for k in ks] for name in names]
    return table(['metric'] + [f'@{k}' for k in ks], rows)
  return table(['metric', 'value'], [[k, v] for k, v in metrics.items()])


def write_report(workdir: str, *, title: str, summary: Mapping[str, object],
                 eval_tables: Mapping[str, Mapping[str, float]], extra_sections: Sequence[str] = ()) -> str:
  """Writes `workdir/report.md` (and `workdir/loss.png` when losses were logged); returns the .md path."""
  sections = [f'# {title}', '## Summary', table(['setting', 'value'], [[k, v] for k, v in summary.items()])]
  for name, values in eval_tables.items():
    sections += [f'## {name}', metrics_table(values)]
  sections += list(extra_sections)

  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  series = loss_series(read_metrics(metrics_path)) if os.path.exists(metrics_path) else {}
  sections.append('## Training loss')
  if series:
    plot_losses(series, os.path.join(workdir, 'loss.png'))
    last = [[name, steps[-1], values[-1]] for name, (steps, values) in series.items() if steps]
    sections += ['![training loss](loss.png)', table(['series', 'last step', 'last value'], last)]
  else:
    sections.append(f'No `{TOTAL_LOSS}` or `{TASK_LOSS_PREFIX}<task>` values in {metrics_path}.')

  path = os.path.join(workdir, 'report.md')
  with open(path, 'w') as f:
    f.write('\n\n'.join(sections) + '\n')
  return path


# ---- unimp_jax.benchmark ------------------------------------------------------------------------------

BENCHMARK_METRICS = ('HR@1', 'HR@5', 'HR@10', 'HR@20', 'NDCG@10', 'MRR@10')


def plot_benchmark(path: str, results: dict[str, dict], ceilings: dict[str, float]) -> None:
  """Bar chart of recommendation HR@10 and NDCG@10 per method, the dataset's ceilings as lines."""
  names = [n for n in results if 'recommendation' in results[n]]
  hr = [results[n]['recommendation']['HR@10'] for n in names]
  ndcg = [results[n]['recommendation']['NDCG@10'] for n in names]
  fig = Figure(figsize=(1.4 * len(names) + 2, 3.6))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  x = np.arange(len(names))
  ax.bar(x - 0.2, hr, 0.4, label='HR@10')
  ax.bar(x + 0.2, ndcg, 0.4, label='NDCG@10')
  for label, value in ceilings.items():
    ax.axhline(value, linestyle='--', color='grey', linewidth=1)
    ax.text(len(names) - 0.5, value, label, ha='right', va='bottom', fontsize=8)
  ax.set_xticks(x, names, rotation=20, ha='right', fontsize=8)
  ax.set_ylabel('recommendation, test users')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, format='png', dpi=120)


def benchmark_markdown(dataset_name: str, cfg, results: dict[str, dict], ceilings: dict[str, float],
             speed: dict[str, float], command: str, intervals: dict[str, dict] | None = None) -> str:
  """unimp_jax.benchmark's report: one table per task (methods x metrics), ceilings, throughput."""
  sections = [f'# Benchmark: {dataset_name}', f'Produced by `{command}`.',
              f'UniMP preset: {cfg.train.steps} steps, batch {cfg.data.batch_size}, seq_len {cfg.data.seq_len}, '
              f'split `{cfg.data.split}`, test users. The recommendation baselines see item IDs only (no '
              f'queries, pictures or text); the rating baselines see ratings only: they are scored on '
              f'recommendation and on the rating columns of preference.']
  ranked_tasks = [f'{task}{kind}' for task in ('recommendation', 'search')
                  for kind in ('', ', warm targets', ', cold targets')]
  for task in (*ranked_tasks, 'preference', 'selection', 'generation'):
    scored = [(n, r[task]) for n, r in results.items() if task in r]
    if not scored:
      continue
    ranked = task in ranked_tasks
    keys = BENCHMARK_METRICS if ranked else [k for k in scored[0][1] if k != 'users']
    rows = [[n, m['users'], *[m.get(k, '') for k in keys]] for n, m in scored]
    header = ['method', 'users', *keys]
    if ranked:  # binomial standard error of HR@10: what a difference between two rows has to beat
      header.append('HR@10 s.e.')
      for row, (_, m) in zip(rows, scored):
        row.append(math.sqrt(m['HR@10'] * (1 - m['HR@10']) / m['users']))
    if task == 'recommendation':
      rows += [[f'*{label}*', '', *[value if k == 'HR@10' else '' for k in keys], ''] for label, value in ceilings.items()]
    sections += [f'## {task}', table(header, rows)]
  if intervals:
    sections += ['## UniMP against each method: HR@10 difference with its paired 95% bootstrap interval', table(
        ['method', 'UniMP minus method', 'low', 'high', '0 outside the interval'],
        [[n, v['difference'], v['low'], v['high'], 'yes' if v['low'] > 0 or v['high'] < 0 else 'no']
         for n, v in intervals.items()])]
  if speed:
    sections += [f'## Evaluation throughput ({speed["model"]}, recommendation, same users, one process)', table(
        ['method', 'users/s'], [['full-catalogue ranking (one forward pass)', speed['full']],
                                ['paper protocol (10-beam generation)', speed['paper']],
                                ['ratio full / 10-beam', speed['full'] / speed['paper']]])]
  sections.append('![HR@10 and NDCG@10](hr10.png)')
  return '\n\n'.join(sections) + '\n'
