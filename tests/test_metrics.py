"""Analytic FLOPs against two independent counts, MFU arithmetic, the metrics writer and the run report."""

import functools
import glob
import json
import math
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jax_core
from tensorboardX.proto import event_pb2

from unimp_jax import config as config_lib
from unimp_jax.model import unimp
from unimp_jax.train import metrics, report

BATCH = 2


def _config(**lm_overrides):
  cfg = config_lib.base_config()
  cfg.model.lm.update(lm_overrides)
  return cfg


def _one_layer_config():
  """Every scanned stack of length 1 (see test_forward_flops_match_xla_cost_analysis for why)."""
  cfg = _config(num_layers=1, cross_attn_every=1)
  cfg.model.vision.depth = 1
  cfg.model.connector.depth = 1
  return cfg


def _forward_and_inputs(cfg):
  """The model's forward pass over split state and abstract inputs of the config's batch shape.

  Shapes are all that FLOP counting needs, so the state is `unimp.abstract_model` (the graph and
  shapes `create_sharded` initialises) rather than real weights: it saves a 20 s jitted init on CPU.
  """
  graphdef, state = unimp.abstract_model(cfg.model)
  v, t, n = cfg.model.vision, cfg.data.seq_len, cfg.data.num_images
  inputs = (jax.ShapeDtypeStruct((BATCH, t), jnp.int32),
            jax.ShapeDtypeStruct((BATCH, n, v.image_size, v.image_size, v.channels), jnp.float32),
            jax.ShapeDtypeStruct((BATCH, t), jnp.bool_))

  def forward(state, tokens, images, mask):
    return nnx.merge(graphdef, state)(tokens, images, mask)

  return forward, state, inputs


def _jaxpr_matmul_flops(jaxpr, multiplier=1) -> int:
  """2 x multiply-adds of every dot_general in a jaxpr, a scan's body counted `length` times."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += multiplier * 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
    assert eqn.primitive.name not in ('while', 'cond'), 'trip counts and branches are not modelled here'
    length = eqn.params['length'] if eqn.primitive.name == 'scan' else 1
    for sub in jax_core.jaxprs_in_params(eqn.params):
      total += _jaxpr_matmul_flops(sub, multiplier * length)
  return total


@pytest.mark.parametrize('lm_overrides', [
    {},  # the tiny preset: two decoder layers per cross-attention group
    dict(num_kv_heads=2, cross_attn_every=4, tie_embeddings=True, added_vocab_size=40),  # GQA, one group
], ids=['tiny', 'gqa_tied'])
def test_forward_flops_equal_the_traced_matmuls(lm_overrides):
  # Exact: the analytic formulas count precisely the matmuls the traced program performs, including
  # how many times each scanned layer runs, which XLA's cost analysis cannot check (below).
  cfg = _config(**lm_overrides)
  forward, state, inputs = _forward_and_inputs(cfg)
  traced = _jaxpr_matmul_flops(jax.make_jaxpr(forward)(state, *inputs).jaxpr)
  analytic = metrics.forward_flops(cfg.model, cfg.data.seq_len, cfg.data.num_images)
  assert BATCH * analytic['total'] == traced
  assert analytic['total'] == sum(v for k, v in analytic.items() if k != 'total')


@functools.cache
def _xla_flops():
  """XLA's FLOP counts of the compiled forward pass and of a cross-entropy gradient, one-layer config."""
  cfg = _one_layer_config()
  forward, state, inputs = _forward_and_inputs(cfg)
  labels = jax.ShapeDtypeStruct(inputs[0].shape, jnp.int32)

  def loss(state, tokens, images, mask, labels):
    # A real (nonlinear) loss: with a loss linear in the logits, XLA would drop the forward head matmul.
    logp = jax.nn.log_softmax(forward(state, tokens, images, mask))
    return -jnp.take_along_axis(logp, labels[..., None], axis=-1).mean()

  def flops(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)['flops']

  return cfg, flops(forward, state, *inputs), flops(jax.grad(loss), state, *inputs, labels)


def test_forward_flops_match_xla_cost_analysis():
  # XLA's HloCostAnalysis counts a while loop's body once, whatever its trip count, so a scanned
  # stack of depth L would be under-counted L-fold; with every stack at length 1 its count is the
  # whole forward pass. It also counts elementwise work (norms, softmax, rotary, activations, the
  # mask select), which the analytic count leaves out, so analytic <= XLA. At these tiny widths
  # elementwise work is relatively largest (per attention score ~7 elementwise FLOPs against 4 x
  # head_dim = 64..128 matmul FLOPs; per token O(width) against O(width^2)), and still measures under
  # 1% here (ratio 0.9916); 0.9 leaves room for XLA versions that count transcendentals differently,
  # while a missing projection, head or attention term (>= 0.5% each) is caught exactly above.
  cfg, xla_forward, _ = _xla_flops()
  analytic = BATCH * metrics.forward_flops(cfg.model, cfg.data.seq_len, cfg.data.num_images)['total']
  assert 0.9 <= analytic / xla_forward <= 1.0, (analytic, xla_forward)


def test_training_flops_are_three_forward_passes():
  # The gradient program runs the forward pass and, per matmul, two backward matmuls (input and weight
  # gradients): XLA should count about 3x forward. It runs slightly less matmul work than the
  # convention (the pixels need no gradient, so the patch embedding has no input-gradient matmul:
  # 0.25% here) and adds elementwise work (softmax cross-entropy over the vocabulary, norm and
  # activation backward), so the convention must sit within a few percent of XLA's count.
  cfg, xla_forward, xla_grad = _xla_flops()
  per_example = metrics.flops_per_example(cfg.model, cfg.data.seq_len, cfg.data.num_images)
  forward = metrics.forward_flops(cfg.model, cfg.data.seq_len, cfg.data.num_images)
  assert per_example == {k: 3 * v for k, v in forward.items()}
  assert 2.8 <= xla_grad / xla_forward <= 3.2, xla_grad / xla_forward
  assert 0.9 <= BATCH * per_example['total'] / xla_grad <= 1.02, (BATCH * per_example['total'], xla_grad)


def test_peak_flops_and_mfu():
  # 4e15 FLOPs in 2 s on 4 H100 SXM (989 TFLOP/s each): 4e15 / (2 * 4 * 989e12) = 0.50556.
  assert metrics.mfu(4e15, 2.0, 4, 'NVIDIA H100 80GB HBM3') == pytest.approx(0.505561, rel=1e-5)
  # 197 TFLOP/s per v5e chip: 1.97e14 FLOPs in 1 s on one chip is exactly 100%.
  assert metrics.mfu(1.97e14, 1.0, 1, 'TPU v5 lite') == pytest.approx(1.0)
  assert metrics.peak_flops('TPU v5') == 459e12  # v5p reports 'TPU v5'; 'TPU v5 lite' must not match it
  assert metrics.peak_flops('TPU v5p') == 459e12
  assert metrics.peak_flops('TPU v6 lite') == 918e12
  assert metrics.peak_flops('TPU v4') == 275e12
  assert metrics.peak_flops('NVIDIA H100 PCIe') == 756e12
  assert metrics.peak_flops('NVIDIA H200') == 989e12
  assert metrics.peak_flops('NVIDIA A100-SXM4-80GB') == 312e12
  assert metrics.mfu(1e12, 1.0, 8, jax.devices()[0].device_kind) is None  # CPU: MFU not reported
  assert metrics.mfu(1e12, 1.0, 1, 'some future accelerator') is None


def _tensorboard_scalars(workdir):
  """{tag: [(step, value)]} from the TFRecord event files (uint64 length, crc, payload, crc)."""
  scalars = {}
  (path,) = glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
  with open(path, 'rb') as f:
    data = f.read()
  offset = 0
  while offset < len(data):
    (length,) = struct.unpack('<Q', data[offset:offset + 8])
    event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
    offset += 12 + length + 4
    for value in event.summary.value:
      scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def _write_run(workdir, steps=range(0, 50, 10)):
  tasks = ('recommendation', 'search')
  with metrics.MetricsWriter(str(workdir)) as writer:
    for step in steps:
      writer.write(step, {'loss': jnp.float32(3.0 / (1 + step)), 'learning_rate': np.float64(1e-4),
                          **{f'loss/{t}': 2.0 / (i + 1 + step) for i, t in enumerate(tasks)}})
    writer.flush()


def test_metrics_writer_writes_jsonl_and_tensorboard(tmp_path):
  _write_run(tmp_path)
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records] == [0, 10, 20, 30, 40]
  assert set(records[0]) == {'step', 'loss', 'learning_rate', 'loss/recommendation', 'loss/search'}
  assert records[1]['loss'] == pytest.approx(3.0 / 11)
  scalars = _tensorboard_scalars(tmp_path)
  assert [s for s, _ in scalars['loss']] == [0, 10, 20, 30, 40]
  assert scalars['loss/search'][2][1] == pytest.approx(2.0 / 22)

  # A resumed run appends; the report keeps the last record of a step written twice.
  with metrics.MetricsWriter(str(tmp_path)) as writer:
    writer.write(40, {'loss': 0.5})
  assert len((tmp_path / 'metrics.jsonl').read_text().splitlines()) == 6
  assert report.read_metrics(str(tmp_path / 'metrics.jsonl'))[-1] == {'step': 40, 'loss': 0.5}


def test_write_report(tmp_path):
  _write_run(tmp_path)
  rec = {f'{m}@{k}': 0.1 * k for m in ('HR', 'NDCG') for k in (1, 5, 10)}
  path = report.write_report(str(tmp_path), title='tiny run', summary={'steps': 40, 'mfu': 0.4123},
                             eval_tables={'recommendation': rec, 'preference': {'RMSE': 1.0234, 'MAE': 0.8}})
  assert path == str(tmp_path / 'report.md')
  text = open(path).read()
  assert text.startswith('# tiny run\n')
  assert '| steps | 40 |' in text and '| mfu | 0.4123 |' in text
  assert '| metric | @1 | @5 | @10 |' in text and '| NDCG | 0.1000 | 0.5000 | 1.0000 |' in text
  assert '| RMSE | 1.0234 |' in text and '| MAE | 0.8000 |' in text
  assert '![training loss](loss.png)' in text
  png = (tmp_path / 'loss.png').read_bytes()
  assert png[:8] == b'\x89PNG\r\n\x1a\n'
  assert (tmp_path / 'loss.png').stat().st_size > 1000

  series = report.loss_series(report.read_metrics(str(tmp_path / 'metrics.jsonl')))
  assert list(series) == ['loss', 'loss/recommendation', 'loss/search']  # not the learning rate
  figure = report.plot_losses(series, str(tmp_path / 'again.png'))
  lines = figure.axes[0].get_lines()
  assert [line.get_label() for line in lines] == list(series)
  np.testing.assert_allclose(lines[0].get_ydata(), [3.0 / (1 + s) for s in range(0, 50, 10)], rtol=1e-6)


def test_report_without_losses(tmp_path):
  path = report.write_report(str(tmp_path), title='eval only', summary={}, eval_tables={})
  assert 'No `loss`' in open(path).read()
  assert not (tmp_path / 'loss.png').exists()
