"""The KV-cache decoder: cached logits equal the full forward pass for every model variant, padded
batches equal their rows alone, sampling, stopping, slots, meshes, one-line errors, and parity with
transformers' generate."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_jax import generate
from lepton_jax.model import ModelConfig, Transformer, attention
from tests.conftest import tiny_config

VOCAB = 61
LENGTHS = (3, 9, 14)  # Prompts of unequal lengths: one shorter, two longer than WINDOW.
STEPS = 6  # Decode steps after the prefill.
WINDOW = 5
# Every attention and position feature, three models (each variant costs three compilations).
VARIANTS = {
    # Original context 8: the llama3 rescaled frequencies change logits well within 32 positions.
    'llama3_rope_gqa_qk_norm_qkv_bias': dict(
        num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True, qkv_bias=True,
        rope_scaling='llama3', rope_scaling_factor=4.0, rope_original_max_len=8,
        attention='dot_product'),
    'gpt2_learned_positions_mha': dict(
        num_kv_heads=2, positions='learned', norm='layernorm', mlp='gelu', qkv_bias=True,
        out_bias=True, mlp_bias=True, tie_embeddings=True),
    'mistral_window_ring_mqa_scanned': dict(sliding_window=WINDOW, scan_layers=True, remat='full'),
}


def tiny_model(**fields) -> Transformer:
  config = tiny_config(**{f'model.{k}': v for k, v in {'vocab_size': VOCAB, **fields}.items()})
  return Transformer(ModelConfig.from_config(config.model))


def init(model: Transformer, seed: int = 0) -> dict:
  return nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32)))


def random_tokens(shape, seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int32)


def cached_logits(model, variables, tokens_BT, lengths_B, cache_len: int) -> list[jax.Array]:
  """[B, V] logits of the prefill (each row's last prompt token), then of each decode step that
  feeds row b its tokens_BT[b, lengths_B[b] + step]."""
  @jax.jit
  def prefill(tokens_BT):
    return model.apply(variables, tokens_BT, cache=attention.Prefill(lengths_B, cache_len),
                       mutable=['cache'])

  @jax.jit
  def decode(cache, tokens_B1, positions_B1):
    return model.apply({**variables, 'cache': cache}, tokens_B1, positions_B1,
                       cache=attention.Decode(), mutable=['cache'])

  logits_B1V, mutated = prefill(tokens_BT[:, :lengths_B.max()])
  logits = [logits_B1V[:, 0]]
  for step in range(tokens_BT.shape[1] - lengths_B.max()):
    positions_B = lengths_B + step
    logits_B1V, mutated = decode(mutated['cache'],
                                 tokens_BT[np.arange(len(lengths_B)), positions_B][:, None],
                                 positions_B[:, None])
    logits.append(logits_B1V[:, 0])
  return logits


@pytest.mark.parametrize('variant', VARIANTS)
def test_logits_at_every_decode_step_equal_the_full_forward_pass(variant):
  model = tiny_model(**VARIANTS[variant])
  variables = init(model)
  lengths_B = np.array(LENGTHS, np.int32)
  tokens_BT = random_tokens((len(LENGTHS), max(LENGTHS) + STEPS))  # Past a row's length: padding.
  full_BTV = jax.jit(model.apply)(variables, tokens_BT)
  rows_B = np.arange(len(LENGTHS))
  # A windowed model also runs with a cache as long as the sequence (as a server's may be), where
  # the mask, not the ring, must hide what left the window.
  cache_lengths = {generate.cache_length(model.cfg, tokens_BT.shape[1]), tokens_BT.shape[1]}
  assert min(cache_lengths) == (WINDOW if model.cfg.sliding_window else tokens_BT.shape[1])
  for cache_len in cache_lengths:
    logits = cached_logits(model, variables, tokens_BT, lengths_B, cache_len)
    for step, logits_BV in enumerate(logits):
      np.testing.assert_allclose(logits_BV, full_BTV[rows_B, lengths_B - 1 + step], atol=1e-5,
                                 rtol=1e-5, err_msg=f'{cache_len} slots, step {step}')
