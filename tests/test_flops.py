"""Tests of the MFU accounting: the FLOPs formula against independent counts, and the peak table."""
import dataclasses
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_jax import config_lib
from lepton_jax import flops
from lepton_jax import lora, train_state
from lepton_jax.model import ModelConfig, Transformer
from lepton_jax.model.config import LoraConfig, QuantConfig


def make_model_config(**overrides) -> ModelConfig:
  """The default model with a 1000-token vocabulary; keyword arguments override its fields."""
  default = ModelConfig.from_config(config_lib.model_config())
  return dataclasses.replace(default, **{'vocab_size': 1000, **overrides})


def abstract_params(model_config: ModelConfig):
  """Shapes of a decoder's weights, written out by hand independently of flops.py."""
  d, h, kv, hd, ff = (model_config.d_model, model_config.num_heads, model_config.num_kv_heads,
                      model_config.head_dim, model_config.d_ff)
  gated = model_config.mlp in ('swiglu', 'geglu')

  def init():
    layer = dict(
        attn_norm=jnp.zeros((d,)),
        q=jnp.zeros((d, h, hd)), k=jnp.zeros((d, kv, hd)), v=jnp.zeros((d, kv, hd)),
        out=jnp.zeros((h, hd, d)),
        mlp_norm=jnp.zeros((d,)),
        up=jnp.zeros((d, ff)), down=jnp.zeros((ff, d)),
    )
    if gated:
      layer['gate'] = jnp.zeros((d, ff))
    return dict(
        embedding=jnp.zeros((model_config.vocab_size, d)),
        layers=[layer] * model_config.num_layers,
        final_norm=jnp.zeros((d,)),
        lm_head=jnp.zeros((d, model_config.vocab_size)),
    )

  return jax.eval_shape(init)


def counted_matmul_params(model_config: ModelConfig) -> int:
  """Weights of rank >= 2 except the embedding table (a gather, not a matmul)."""
  params = abstract_params(model_config)
  del params['embedding']
  return sum(leaf.size for leaf in jax.tree.leaves(params) if leaf.ndim >= 2)


def brute_force_attention_flops(model_config: ModelConfig, seq_len: int) -> float:
  """Forward QK^T + AV FLOPs per token from an explicit mask of the (query, key) pairs scored."""
  query_T1 = np.arange(seq_len)[:, None]
  key_1S = np.arange(seq_len)[None, :]
  mask_TS = key_1S <= query_T1
  if model_config.sliding_window:
    mask_TS &= query_T1 - key_1S < model_config.sliding_window
  pairs_per_token = mask_TS.sum() / seq_len
  flops_per_pair = 2 * 2 * model_config.head_dim  # two dot products of head_dim multiply-adds.
  return model_config.num_layers * model_config.num_heads * flops_per_pair * pairs_per_token


@pytest.mark.parametrize('overrides', [
    dict(),
    dict(num_kv_heads=1),
    dict(num_kv_heads=2, mlp='gelu', sliding_window=48),
    dict(mlp='geglu', tie_embeddings=True, d_ff=768, head_dim=32),
])
def test_train_flops_match_independent_count(overrides):
  model_config = make_model_config(**overrides)
  seq_len = 128
  assert flops.matmul_params(model_config) == counted_matmul_params(model_config)
  expected = 3 * (2 * counted_matmul_params(model_config)
                  + brute_force_attention_flops(model_config, seq_len))
  assert flops.train_flops_per_token(model_config, seq_len) == pytest.approx(expected, rel=1e-12)


def test_gpt2_small_against_known_numbers():
  gpt2 = make_model_config(vocab_size=50257, d_model=768, num_layers=12, num_heads=12,
                           num_kv_heads=12, head_dim=64, d_ff=3072, mlp='gelu',
                           tie_embeddings=True)
  seq_len = 1024
  # 124.44M parameters = 123.53M matmul weights + 0.79M learned positions + biases and norms.
  assert flops.matmul_params(gpt2) == 123_532_032
  # PaLM/nanoGPT count 6N + 12*L*H*Q*T for attention; causal masking leaves (T+1)/2T of it.
  non_causal_attention = 12 * 12 * 12 * 64 * seq_len
  expected = 6 * 123_532_032 + non_causal_attention * (seq_len + 1) / (2 * seq_len)
  assert flops.train_flops_per_token(gpt2, seq_len) == pytest.approx(expected)
  assert flops.train_flops_per_token(gpt2, seq_len) == pytest.approx(797_870_592)


def test_fewer_kv_heads_remove_only_kv_projection_flops():
  seq_len = 256
  mha, gqa, mqa = (make_model_config(num_heads=8, num_kv_heads=kv) for kv in (8, 2, 1))
  mha_flops, gqa_flops, mqa_flops = (flops.train_flops_per_token(c, seq_len) for c in (mha, gqa, mqa))
  assert mha_flops > gqa_flops > mqa_flops
  kv_flops_per_head = 3 * 2 * mha.num_layers * 2 * mha.d_model * mha.head_dim  # k and v.
  assert mha_flops - gqa_flops == pytest.approx(6 * kv_flops_per_head)
  assert mha_flops - mqa_flops == pytest.approx(7 * kv_flops_per_head)
  # Attention scores stay per query head.
  assert flops.attention_flops_per_token(mqa, seq_len) == flops.attention_flops_per_token(mha, seq_len)


def test_gated_mlp_has_three_matrices_plain_has_two():
  seq_len = 64
  by_mlp = {mlp: flops.train_flops_per_token(make_model_config(mlp=mlp), seq_len)
            for mlp in ('swiglu', 'geglu', 'gelu', 'relu')}
  model_config = make_model_config()
  one_matrix = 3 * 2 * model_config.num_layers * model_config.d_model * model_config.d_ff
  assert by_mlp['swiglu'] == by_mlp['geglu']
  assert by_mlp['gelu'] == by_mlp['relu']
  assert by_mlp['swiglu'] - by_mlp['gelu'] == pytest.approx(one_matrix)


def test_unknown_mlp_and_unresolved_vocab_raise():
  with pytest.raises(ValueError, match='mlp'):
    flops.train_flops_per_token(make_model_config(mlp='moe'), 64)
  with pytest.raises(ValueError, match='vocab_size'):
    flops.train_flops_per_token(make_model_config(vocab_size=0), 64)


def test_a_classify_head_counts_no_vocabulary_matmul():
  lm, classify = make_model_config(), make_model_config(head='classify', num_labels=12)
  assert (flops.matmul_params(lm) - flops.matmul_params(classify) ==
          lm.d_model * lm.vocab_size)


@pytest.mark.parametrize('precompute', [False, True])
def test_a_dpo_row_is_a_pair_with_its_reference_forward_unless_precomputed(precompute):
  config = config_lib.base_config()
  config.objective, config.dpo.precompute_ref_log_probs = 'dpo', precompute
  model_config = make_model_config()
  train = flops.train_flops_per_token(model_config, config.seq_len)
  reference = 0 if precompute else flops.forward_flops_per_token(model_config, config.seq_len)
  assert flops.objective_flops_per_token(config, model_config) == 2 * (train + reference)
  config.objective = 'lm'
  assert flops.objective_flops_per_token(config, model_config) == train


def test_sliding_window_reduces_attention_flops():
  seq_len = 512
  full = flops.attention_flops_per_token(make_model_config(), seq_len)
  windowed = flops.attention_flops_per_token(make_model_config(sliding_window=64), seq_len)
  wider_than_sequence = flops.attention_flops_per_token(make_model_config(sliding_window=4096), seq_len)
  assert windowed < full
  assert wider_than_sequence == full
  assert flops.mean_attended_keys(seq_len) == (seq_len + 1) / 2
  assert flops.mean_attended_keys(seq_len, sliding_window=1) == 1


@pytest.mark.parametrize('device_kind, dtype, expected', [
    ('TPU v4', 'bfloat16', 275e12),
    ('TPU v5 lite', 'bfloat16', 197e12),
    ('TPU v5', 'bfloat16', 459e12),
    ('TPU v6 lite', jnp.bfloat16, 918e12),
    ('TPU v6 lite', 'float32', 918e12),
    ('NVIDIA A100-SXM4-80GB', 'bfloat16', 312e12),
    ('NVIDIA A100 80GB PCIe', 'float32', 156e12),
    ('NVIDIA H100 80GB HBM3', 'bfloat16', 989e12),
    ('NVIDIA H100 80GB HBM3', jnp.float32, 495e12),
    ('NVIDIA H100 PCIe', 'bfloat16', 756e12),
    ('NVIDIA H200', 'bfloat16', 989e12),
    ('NVIDIA B200', 'bfloat16', 2250e12),
])
def test_device_peak_flops_by_device_kind(device_kind, dtype, expected):
  device = types.SimpleNamespace(device_kind=device_kind)
  assert flops.device_peak_flops(device, dtype) == expected


@pytest.mark.parametrize('device_kind', ['cpu', 'TPU v99', 'NVIDIA GeForce RTX 4090', 'Tesla T4'])
def test_unknown_device_has_no_peak(device_kind):
  assert flops.device_peak_flops(types.SimpleNamespace(device_kind=device_kind), 'bfloat16') is None


def test_unsupported_dtype_raises():
  with pytest.raises(ValueError, match='int8'):
    flops.device_peak_flops(types.SimpleNamespace(device_kind='TPU v4'), 'int8')


@pytest.mark.parametrize('device_kind, expected', [
    ('TPU v5 lite', 819e9), ('TPU v5', 2765e9), ('NVIDIA H100 80GB HBM3', 3350e9),
    ('NVIDIA H100 PCIe', 2000e9), ('NVIDIA A100-SXM4-80GB', 2039e9), ('NVIDIA A100-SXM4-40GB', 1555e9),
    ('Tesla T4', 320e9), ('Some Future Chip', None)])
def test_memory_bandwidth_by_device_kind(device_kind, expected):
  device = types.SimpleNamespace(device_kind=device_kind)
  assert flops.device_memory_bandwidth(device) == expected


def test_cpu_peak_is_measured_once():
  if jax.devices()[0].platform != 'cpu':
    pytest.skip('CPU backend only')
  peak = flops.peak_flops_per_device('float32')
  assert 1e9 < peak < 1e14
  assert flops.peak_flops_per_device('bfloat16') == peak
  assert flops.measured_cpu_peak_flops.cache_info().misses == 1


def test_mfu():
  assert flops.mfu(1000.0, 6e9, 12e12) == pytest.approx(0.5)
  assert flops.mfu(1000.0, 6e9, None) is None


def test_lora_on_a_frozen_base_counts_adapters_and_no_base_weight_gradients():
  base = make_model_config()
  adapted = dataclasses.replace(base, lora=LoraConfig(targets=('all-linear',), rank=4))
  variables = nn.unbox(train_state.boxed_variables(Transformer(adapted), 8))
  params = variables['params']
  adapters = sum(x.size for x in jax.tree.leaves(lora.adapter_of(params)))
  assert flops.lora_params(adapted) == adapters  # Every adapter weight, counted from shapes.
  mask = train_state.trainable_mask(params, lora.ADAPTERS)
  frozen = flops.frozen_matmul_params(variables, mask, adapted.tie_embeddings)
  assert frozen == flops.matmul_params(base)  # Every base matmul weight (the head included).
  # Over an int8 base (QLoRA) the same weights are frozen, as int8 kernels.
  qlora = dataclasses.replace(adapted, quant=QuantConfig(weights='int8'))
  int8_variables = nn.unbox(train_state.boxed_variables(Transformer(qlora), 8))
  int8_mask = train_state.trainable_mask(int8_variables['params'], lora.ADAPTERS)
  assert flops.frozen_matmul_params(int8_variables, int8_mask, qlora.tie_embeddings) == frozen
  seq_len = 64
  full = flops.train_flops_per_token(base, seq_len)
  expected = full + 6 * adapters - 2 * frozen
  assert flops.train_flops_per_token(adapted, seq_len, frozen) == pytest.approx(expected)
