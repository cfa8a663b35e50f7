"""Training throughput accounting (analytic FLOPs, peak FLOP/s, MFU) and the per-step metrics writer.

FLOPs are counted from the architecture's formulas, independently of the module code, the same way
`config.num_params_analytic` counts parameters; tests/test_metrics.py checks them against XLA's own
count of the compiled forward pass. Conventions (those of Kaplan et al. 2020 and PaLM's MFU):

- a multiply-add is 2 FLOPs; only matrix multiplications are counted (norms, softmax, activations,
  rotary and residual adds are a few percent at these shapes and are not what the MXU/tensor cores do);
- training = 3 x forward (the backward pass computes gradients for both a matmul's input and its
  weight). This is the convention even for frozen towers: a frozen vision tower at the bottom of the
  graph needs no backward at all, so with frozen towers the true work is lower and the reported MFU
  is an upper-bound-style figure, comparable across runs and with other codebases, not a profile;
- self-attention scores are counted over the *full* seq_len x seq_len square, not the causal half:
  `layers.attention` computes every logit and masks afterwards (no causal-skipping kernel), so the full
  square is what the hardware executes. The same holds for cross-attention, which scores every text
  token against every image latent and masks by the media rule;
- the vision tower and resampler run on every image slot, padding slots included, so `num_images` is
  the slot count of the batch (`data.num_images`), not the number of real pictures.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import numpy as np


def _dense(tokens: int, d_in: int, d_out: int) -> int:
  return 2 * tokens * d_in * d_out


def _attention_scores(queries: int, keys: int, inner: int) -> int:
  """QK^T plus probs @ V, summed over heads: each is queries x keys x head_dim MACs per head."""
  return 2 * (2 * queries * keys * inner)


def forward_flops(model_cfg, seq_len: int, num_images: int) -> dict[str, float]:
  """Matmul FLOPs of one example's forward pass, by tower, plus 'total'.

  Keys: 'vision' (patch embedding and ViT blocks), 'connector' (perceiver resampler), 'cross_attention'
  (the gated cross-attention blocks, their SwiGLU MLPs included), 'lm' (decoder layers and the output
  head over base + added vocabulary; unlike `num_params_analytic`, *without* cross-attention, so that the
  parts sum to 'total'). The token embedding is a gather and costs no FLOPs.
  """
  v, c, lm = model_cfg.vision, model_cfg.connector, model_cfg.lm

  # Vision tower, per image: patch embedding, then `depth` pre-LN blocks over [class; patches].
  d = v.width
  patches = (v.image_size // v.patch_size) ** 2
  tokens_v = patches + 1
  vision_layer = (4 * _dense(tokens_v, d, d) + _attention_scores(tokens_v, tokens_v, d)
                  + _dense(tokens_v, d, v.mlp_dim) + _dense(tokens_v, v.mlp_dim, d))
  vision = _dense(patches, v.patch_size ** 2 * v.channels, d) + v.depth * vision_layer

  # Resampler, per image: latents query, keys/values over [image tokens; latents].
  lat, inner, hidden = c.num_latents, c.num_heads * c.head_dim, c.mlp_ratio * d
  context = tokens_v + lat
  connector_block = (_dense(lat, d, inner) + 2 * _dense(context, d, inner) + _dense(lat, inner, d)
                     + _attention_scores(lat, context, inner)
                     + _dense(lat, d, hidden) + _dense(lat, hidden, d))
  connector = c.depth * connector_block

  # Language model over seq_len tokens; grouped-query attention shrinks only the k/v projections.
  w, head_dim = lm.width, lm.width // lm.num_heads
  q_dim, kv_dim = lm.num_heads * head_dim, lm.num_kv_heads * head_dim
  swiglu = 3 * _dense(seq_len, w, lm.mlp_dim)
  decoder_layer = (_dense(seq_len, w, q_dim) + 2 * _dense(seq_len, w, kv_dim) + _dense(seq_len, q_dim, w)
                   + _attention_scores(seq_len, seq_len, q_dim) + swiglu)
  head = _dense(seq_len, w, lm.vocab_size + lm.added_vocab_size)
  language = lm.num_layers * decoder_layer + head

  # Gated cross-attention, once per group: text queries, keys/values projected from all image latents
  # (vision width -> LM heads).
  media = num_images * lat
  cross_block = (_dense(seq_len, w, q_dim) + 2 * _dense(media, d, q_dim) + _dense(seq_len, q_dim, w)
                 + _attention_scores(seq_len, media, q_dim) + swiglu)
  cross = (lm.num_layers // lm.cross_attn_every) * cross_block

  out = dict(vision=float(num_images * vision), connector=float(num_images * connector),
             cross_attention=float(cross), lm=float(language))
  out['total'] = sum(out.values())
  return out


def flops_per_example(model_cfg, seq_len: int, num_images: int) -> dict[str, float]:
  """Training FLOPs (forward + backward = 3 x forward) of one example, by tower, plus 'total'."""
  return {k: 3.0 * value for k, value in forward_flops(model_cfg, seq_len, num_images).items()}


# Peak dense bf16 FLOP/s of one JAX device, matched against `device.device_kind` by substring in this
# order (more specific names first: 'TPU v5 lite' before 'TPU v5', 'H100 PCIe' before 'H100').
# On TPU v4 and v5p one JAX device is one chip (megacore), so the per-chip figure is the right one.
PEAK_FLOPS: dict[str, float | None] = {
    # cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16 per chip; device_kind 'TPU v5 lite'.
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    # cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16 per chip; device_kind 'TPU v5' or 'TPU v5p'.
    'TPU v5p': 459e12,
    'TPU v5': 459e12,
    # cloud.google.com/tpu/docs/v6e (Trillium): 918 TFLOP/s bf16 per chip; device_kind 'TPU v6 lite'.
    'TPU v6 lite': 918e12,
    'TPU v6e': 918e12,
    'Trillium': 918e12,
    # cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16 per chip.
    'TPU v4': 275e12,
    # NVIDIA H100 datasheet: dense BF16 tensor core 756 TFLOP/s (PCIe), 835 (NVL), 989 (SXM); the
    # datasheet's headline 1,979 / 1,671 / 1,513 figures assume 2:4 sparsity.
    'H100 PCIe': 756e12,
    'H100 NVL': 835e12,
    'H100': 989e12,
    # NVIDIA H200 datasheet: 1,979 TFLOP/s BF16 with sparsity, i.e. 989 dense (same tensor cores as
    # H100 SXM). GH200's GPU is the same chip.
    'H200': 989e12,
    # NVIDIA A100 datasheet: 312 TFLOP/s dense BF16 (624 with sparsity).
    'A100': 312e12,
    # CPU: no meaningful peak (it depends on cores, SIMD width and clocks), so MFU is not reported.
    'cpu': None,
}


def peak_flops(device_kind: str) -> float | None:
  """Peak dense bf16 FLOP/s of one device of this kind; None when unknown (MFU is then not reported)."""
  lowered = device_kind.lower()
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in lowered:
      return flops
  return None


def mfu(flops_per_step: float, step_seconds: float, num_devices: int, device_kind: str) -> float | None:
  """Model FLOPs utilisation: achieved FLOP/s over the devices' combined peak; None without a peak."""
  peak = peak_flops(device_kind)
  if peak is None or step_seconds <= 0:
    return None
  return flops_per_step / (step_seconds * num_devices * peak)


def _scalar(value) -> float:
  return float(np.asarray(value))


class MetricsWriter:
  """Per-step scalars to TensorBoard event files and to `workdir/metrics.jsonl`.

  metrics.jsonl holds one JSON object per write, `{"step": ..., name: value, ...}`, and is opened for
  appending: a resumed run continues the same file, and readers (train/report.py) keep the last
  record of a step written twice. Only process 0 writes; elsewhere every method is a no-op, so callers
  need no process checks.
  """

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self._tb = self._jsonl = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # only process 0 needs it
      self._tb = SummaryWriter(logdir=workdir)
      # Line-buffered: a killed run keeps every step it logged.
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', buffering=1)

  def write(self, step: int, scalars: Mapping[str, object]):
    """Writes `scalars` (Python numbers, numpy or 0-d jax arrays) for `step`."""
    if not self.active:
      return
    values = {name: _scalar(value) for name, value in scalars.items()}
    for name, value in values.items():
      self._tb.add_scalar(name, value, global_step=int(step))
    self._jsonl.write(json.dumps({'step': int(step), **values}) + '\n')

  def flush(self):
    if self.active:
      self._tb.flush()
      self._jsonl.flush()

  def close(self):
    if self.active and self._jsonl is not None:
      self._tb.close()
      self._jsonl.close()
      self._tb = self._jsonl = None
      self.active = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
