"""Model FLOPs utilisation (MFU): FLOPs per training token, and the peak FLOP/s of a device; and
for decoding, which is bound by memory rather than FLOPs, the memory bandwidth of a device.

MFU = achieved model FLOP/s / peak FLOP/s. "Model" FLOPs are the matmuls the architecture needs,
written out from the model's `ModelConfig` (PaLM, appendix B), not what the compiler happens to
execute: masked attention blocks, recomputation under remat and elementwise work (norms, softmax,
activations) do not count. Peaks are dense (no 2:4 sparsity) vendor figures per JAX device; on
CPU there is no meaningful spec sheet, so the peak is a measured f32 matmul rate.
"""
import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lepton_jax import tree
from lepton_jax.model import ModelConfig, transformer


# The backward pass costs two matmuls per forward matmul (gradients w.r.t. inputs and weights).
TRAIN_TO_FORWARD_FLOPS = 3


def attention_projection_params(model_config: ModelConfig) -> int:
  """Weights of q, k, v and the output projection in one layer."""
  d_model, head_dim = model_config.d_model, model_config.head_dim
  q_width = model_config.num_heads * head_dim
  kv_width = model_config.num_kv_heads * head_dim  # GQA/MQA: fewer k and v heads.
  return d_model * q_width + 2 * d_model * kv_width + q_width * d_model


def mlp_params(model_config: ModelConfig) -> int:
  """Weights of the MLP in one layer."""
  if model_config.mlp not in transformer.ACTIVATIONS:
    raise ValueError(f'Unknown mlp {model_config.mlp!r}; expected one of '
                     f'{tuple(transformer.ACTIVATIONS)}.')
  # Gated: up, gate and down projections; otherwise up and down.
  num_matrices = 3 if model_config.mlp in transformer.GATED_MLPS else 2
  return num_matrices * model_config.d_model * model_config.d_ff


def lora_params(model_config: ModelConfig) -> int:
  """Adapter weights (A and B, r * (in + out) per adapted Dense) that each token multiplies."""
  cfg = model_config
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  shapes = {'attn/query': (cfg.d_model, q), 'attn/key': (cfg.d_model, kv),
            'attn/value': (cfg.d_model, kv), 'attn/out': (q, cfg.d_model),
            'mlp/up': (cfg.d_model, cfg.d_ff), 'mlp/down': (cfg.d_ff, cfg.d_model)}
  if cfg.mlp in transformer.GATED_MLPS:
    shapes['mlp/gate'] = (cfg.d_model, cfg.d_ff)
  per_layer = sum(cfg.lora.rank * (d_in + d_out) for path, (d_in, d_out) in shapes.items()
                  if cfg.lora.adapts(f'layers_0/{path}'))
  head = (cfg.lora.rank * (cfg.d_model + cfg.vocab_size)
          if not cfg.tie_embeddings and cfg.lora.adapts('head') else 0)
  return cfg.num_layers * per_layer + head


def matmul_params(model_config: ModelConfig) -> int:
  """Weights that each token multiplies once per forward pass (LoRA adapters included).

  The LM head counts even when tied to the embedding: the lookup is a gather, the head a matmul.
  A classify head reads one position a row: next to the rest, nothing per token.
  """
  if model_config.vocab_size <= 0:
    raise ValueError('vocab_size must be resolved (from the tokenizer) before counting FLOPs.')
  per_layer = attention_projection_params(model_config) + mlp_params(model_config)
  lm_head = model_config.d_model * model_config.vocab_size if model_config.head == 'lm' else 0
  return model_config.num_layers * per_layer + lm_head + lora_params(model_config)


def frozen_matmul_params(variables, trainable_mask, tie_embeddings: bool) -> int:
  """Matmul weights among `variables` (abstract or real) that do not train: kernels (int8 ones
  of a QLoRA base included), and the embedding table when it is the tied head. Their weight
  gradients are never computed. `trainable_mask` is over variables['params']."""
  matmul = (r'(.*/)?kernel',) + ((r'(.*/)?embedding',) if tie_embeddings else ())
  params, int8 = variables['params'], variables.get('quant', {})
  frozen_float = sum(leaf.size for name, leaf, trains in zip(
      tree.names(params), jax.tree.leaves(params), jax.tree.leaves(trainable_mask))
                     if not trains and tree.matches(matmul, name))
  return frozen_float + sum(leaf.size for name, leaf in zip(tree.names(int8),
                                                           jax.tree.leaves(int8))
                            if tree.matches(matmul, name))


def mean_attended_keys(seq_len: int, sliding_window: int = 0) -> float:
  """Keys a query attends to, averaged over the positions of a sequence.

  Under a causal mask the query at position i (0-based) sees keys 0..i: i + 1 of them, so the
  mean over seq_len queries is (seq_len + 1) / 2, about half of the seq_len keys that a
  bidirectional model scores. PaLM's 12 * L * H * Q * T attention term is that non-causal figure;
  counting it for a causal LM would credit the model with the masked-out half.

  A sliding window W (Mistral: the last W positions, the query's own included) caps each query at
  min(i + 1, W) keys.
  """
  window = sliding_window if 0 < sliding_window < seq_len else seq_len
  # Queries 0..window-1 see 1..window keys; the remaining seq_len - window see window each.
  total_keys = window * (window + 1) / 2 + (seq_len - window) * window
  return total_keys / seq_len


def attention_flops_per_token(model_config: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs of QK^T and AV for one token, summed over heads and layers."""
  keys = mean_attended_keys(seq_len, model_config.sliding_window)
  # Per head and key: a head_dim dot product for the score, a head_dim axpy for the value; each
  # multiply-add is 2 FLOPs. k/v sharing under GQA does not shrink this: every query head scores.
  per_layer = 2 * (2 * model_config.head_dim * keys) * model_config.num_heads
  return model_config.num_layers * per_layer


def forward_flops_per_token(model_config: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs for one token: 2 FLOPs per weight (multiply-add), plus attention."""
  return 2 * matmul_params(model_config) + attention_flops_per_token(model_config, seq_len)


def train_flops_per_token(model_config: ModelConfig, seq_len: int,
                          frozen_matmul_params: int = 0) -> float:
  """Forward plus backward FLOPs for one token of a seq_len-long training sequence.

  A frozen weight (a LoRA base) still passes gradients to its input but gets none itself: 2 of
  its 6 FLOPs per token are never done.
  """
  full = TRAIN_TO_FORWARD_FLOPS * forward_flops_per_token(model_config, seq_len)
  return full - 2 * frozen_matmul_params


def objective_flops_per_token(config: ml_collections.ConfigDict, model_config: ModelConfig,
                              frozen_matmul_params: int = 0) -> float:
  """Train FLOPs per token of the batch_size x seq_len a step counts, for config.objective: a
  dpo row is a pair (chosen and rejected through the policy), with the frozen reference's
  forward pass over both unless its log-probs are precomputed."""
  train = train_flops_per_token(model_config, config.seq_len, frozen_matmul_params)
  if config.objective != 'dpo':
    return train
  reference = (0.0 if config.dpo.precompute_ref_log_probs
               else forward_flops_per_token(model_config, config.seq_len))
  return 2 * (train + reference)


# Dense peak FLOP/s per JAX device, as (bf16, f32). The f32 column is what a default-precision f32
# matmul reaches: TPUs run it as one bf16 MXU pass, so it equals bf16; NVIDIA (Ampere and newer)
# runs it on TF32 tensor cores under XLA's default precision. Keys are `device_kind` prefixes; the
# longest matching prefix wins, so 'TPU v5 lite' is not read as 'TPU v5' and one 'NVIDIA A100' row
# covers 'NVIDIA A100-SXM4-80GB' and 'NVIDIA A100 80GB PCIe' (same peak).
# Sources: jax/_src/pallas/mosaic/tpu_info.py and Google Cloud TPU docs; NVIDIA datasheets
# (sparse figures halved).
PEAK_FLOPS_BY_DEVICE_KIND = {
    'TPU v2': (45e12 / 2, 45e12 / 2),  # v2, v3: each of a chip's 2 cores is a device.
    'TPU v3': (123e12 / 2, 123e12 / 2),
    'TPU v4': (275e12, 275e12),  # Megacore: one device is the whole 2-core chip.
    'TPU v4 lite': (137e12, 137e12),
    'TPU v5 lite': (197e12, 197e12),  # v5e
    'TPU v5e': (197e12, 197e12),
    'TPU v5': (459e12, 459e12),  # v5p, megacore.
    'TPU v5p': (459e12, 459e12),
    'TPU v6 lite': (918e12, 918e12),  # v6e (Trillium)
    'TPU v6e': (918e12, 918e12),
    'TPU7x': (2307e12 / 2, 2307e12 / 2),  # Ironwood: no megacore, a device is half a chip.
    'NVIDIA A100': (312e12, 156e12),
    'NVIDIA H100': (989e12, 495e12),  # SXM: device_kind 'NVIDIA H100 80GB HBM3'.
    'NVIDIA H100 PCIe': (756e12, 378e12),
    'NVIDIA H100 NVL': (835e12, 418e12),
    'NVIDIA GH200': (989e12, 495e12),
    'NVIDIA H200': (989e12, 495e12),
    'NVIDIA H200 NVL': (835e12, 418e12),
    'NVIDIA B200': (2250e12, 1100e12),
}

_DTYPE_COLUMN = {'bfloat16': 0, 'float16': 0, 'float32': 1}


def device_peak_flops(device, dtype) -> float | None:
  """Dense peak FLOP/s of `device` for matmuls in `dtype`; None if the device is not in the table."""
  dtype_name = jnp.dtype(dtype).name
  if dtype_name not in _DTYPE_COLUMN:
    raise ValueError(f'No peak FLOP/s for dtype {dtype_name}; expected one of {list(_DTYPE_COLUMN)}.')
  matches = [kind for kind in PEAK_FLOPS_BY_DEVICE_KIND if device.device_kind.startswith(kind)]
  if not matches:
    return None
  return PEAK_FLOPS_BY_DEVICE_KIND[max(matches, key=len)][_DTYPE_COLUMN[dtype_name]]


@functools.cache
def measured_cpu_peak_flops(size: int = 1024, warmup: int = 1, repeats: int = 5) -> float:
  """Best observed FLOP/s of a jitted square f32 matmul on the CPU backend, all cores (~0.1 s,
  which every run pays before its first step).

  Best-of rather than mean: the machine's speed swings, and a peak is the rate reachable when it
  is quiet. Memoized so that every MFU figure in a process divides by the same number.
  """
  matmul = jax.jit(jnp.matmul)
  # Operands from the host: drawing them on the device would compile a random-number program
  # (~1 s on 2 cores) at the start of every run, for values that do not change the rate.
  rng = np.random.default_rng(0)
  lhs_NN, rhs_NN = (jax.device_put(rng.standard_normal((size, size), np.float32)) for _ in 'lr')
  for _ in range(warmup):
    matmul(lhs_NN, rhs_NN).block_until_ready()
  best_seconds = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(lhs_NN, rhs_NN).block_until_ready()
    best_seconds = min(best_seconds, time.perf_counter() - start)
  return 2 * size**3 / best_seconds


# A CPU-only train step of at most this many model FLOPs (the head's excluded) runs fastest on one
# JAX device per core, a larger one on one device. Measured on 2 cores (docs/benchmarks.md, "One
# CPU device or one per core"), 2 devices against 1: 1.35-1.46x at 3.8 GFLOP a step
# (shakespeare_char), 1.02-1.06x at 20.5 (stdlib_tiny), 0.97-0.99x at 53 and 163, 0.88x at 419.
CPU_SPLIT_MAX_STEP_FLOPS = 30e9


def default_cpu_devices(config: ml_collections.ConfigDict, cores: int) -> int:
  """The CPU devices a training run of `config` takes when --cpu_devices is not given.

  One XLA:CPU device runs a step's ops one after another, each spread over the cores; a small
  model's ops are too small to spread well, so one device per core (data parallel: each runs
  its share of the batch at once) wins for it, and loses for a large one, whose matmuls already
  fill the cores and which pays a gradient all-reduce. The split needs a batch that divides
  evenly over the cores and micro-batches, and the default mesh (every device on `data`).
  """
  mesh = config.mesh
  default_mesh = mesh.fsdp == mesh.tensor == 1 and mesh.data == -1
  body = ml_collections.ConfigDict(config.model.to_dict())
  body.vocab_size = 1  # Without the head: the vocabulary may be the tokenizer's, not built yet.
  body_config = ModelConfig.from_config(body, config.lora, config.quant, config.prune,
                                        config.peft, config.seed)
  step_flops = (train_flops_per_token(body_config, config.seq_len) *
                config.batch_size * config.seq_len)
  if (cores > 1 and default_mesh and step_flops <= CPU_SPLIT_MAX_STEP_FLOPS and
      config.batch_size % (cores * config.grad_accum_steps) == 0):
    return cores
  return 1


def peak_flops_per_device(dtype) -> float | None:
  """Peak FLOP/s of this process's first device: the table on accelerators, measured on CPU.

  On CPU the f32 rate serves every dtype: bf16 matmuls there are no faster than f32. The matmul
  uses every core of the host, so a host split into several CPU devices (--cpu_devices) gives
  each its share.
  """
  device = jax.devices()[0]
  if device.platform == 'cpu':
    return measured_cpu_peak_flops() / jax.local_device_count()
  return device_peak_flops(device, dtype)


def mfu(tokens_per_sec_per_device: float, flops_per_token: float, peak: float | None) -> float | None:
  """Model FLOPs utilisation in [0, 1]; None when the peak is unknown."""
  if peak is None:
    return None
  return tokens_per_sec_per_device * flops_per_token / peak


# HBM bandwidth per JAX device, bytes/s, for decoding (a step reads every weight and the KV cache).
# Keys are `device_kind` prefixes, the longest match wins, as for PEAK_FLOPS_BY_DEVICE_KIND.
# Sources: Google Cloud TPU docs (per chip; v3 and Ironwood chips are two devices), NVIDIA
# datasheets.
MEMORY_BANDWIDTH_BY_DEVICE_KIND = {
    'TPU v3': 900e9 / 2,
    'TPU v4': 1200e9,
    'TPU v5 lite': 819e9,  # v5e
    'TPU v5e': 819e9,
    'TPU v5': 2765e9,  # v5p
    'TPU v5p': 2765e9,
    'TPU v6 lite': 1640e9,  # v6e (Trillium)
    'TPU v6e': 1640e9,
    'TPU7x': 7370e9 / 2,
    'Tesla T4': 320e9,
    'NVIDIA L4': 300e9,
    'NVIDIA A10G': 600e9,
    'NVIDIA A100': 1555e9,  # 40 GB, SXM4 and PCIe.
    'NVIDIA A100-SXM4-80GB': 2039e9,
    'NVIDIA A100 80GB PCIe': 1935e9,
    'NVIDIA H100': 3350e9,  # SXM
    'NVIDIA H100 PCIe': 2000e9,
    'NVIDIA H100 NVL': 3900e9,
    'NVIDIA GH200': 4000e9,
    'NVIDIA H200': 4800e9,
    'NVIDIA B200': 8000e9,
}


def device_memory_bandwidth(device) -> float | None:
  """HBM bytes/s of `device`; None if the device is not in the table."""
  matches = [kind for kind in MEMORY_BANDWIDTH_BY_DEVICE_KIND
             if device.device_kind.startswith(kind)]
  return MEMORY_BANDWIDTH_BY_DEVICE_KIND[max(matches, key=len)] if matches else None


@functools.cache
def measured_cpu_read_bandwidth(num_bytes: int, repeats: int = 5) -> float:
  """Best observed bytes/s at which jitted f32 matrix-vector products stream a matrix of
  `num_bytes` on the CPU backend, its rows split over every local device as a decode step's
  weights may be: the most a batch-1 step reading that many bytes can reach here. Sized as the
  step is, because caches hold a small model but not a large one."""
  devices, columns = jax.local_devices(), 4096
  rows = max(num_bytes // (4 * columns) // len(devices), 1) * len(devices)
  split = jax.sharding.NamedSharding(jax.sharding.Mesh(devices, ('rows',)),
                                     jax.sharding.PartitionSpec('rows'))
  matrix_NK = jax.jit(lambda: jnp.ones((rows, columns), jnp.float32), out_shardings=split)()
  vector_K = jnp.ones((columns,), jnp.float32)
  gemv = jax.jit(lambda m, v: m @ v)
  gemv(matrix_NK, vector_K).block_until_ready()
  best_seconds = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    gemv(matrix_NK, vector_K).block_until_ready()
    best_seconds = min(best_seconds, time.perf_counter() - start)
  return matrix_NK.nbytes / best_seconds


def memory_bandwidth_per_device(num_bytes: int) -> float | None:
  """Memory bytes/s of this process's first device: the table on accelerators; on CPU, measured
  streaming `num_bytes` (what a decode step reads, all devices together: they share the host's
  memory) and divided among the host's devices."""
  device = jax.devices()[0]
  if device.platform == 'cpu':
    return measured_cpu_read_bandwidth(num_bytes) / jax.local_device_count()
  return device_memory_bandwidth(device)
