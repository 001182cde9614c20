"""The splash attention kernel (config.model.attention='splash') equals the XLA path: forward and
gradients, in Pallas interpret mode on CPU, for causal, sliding-window, GQA and segment-masked
attention; under a mesh (shard_map over batch and heads) inside the Transformer; and the model
lowers for TPU with the Pallas custom call, without a TPU."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_jax import config_lib, sharding
from lepton_jax.kernels import attention as attention_kernels
from lepton_jax.model import ModelConfig, Transformer, attention

from tests.conftest import override, tiny_config

# One block of 128 (the kernel's smallest) keeps interpret mode fast; the masks still cut
# through the block, which is where the kernel applies them element by element.
B, T, H = 2, 128, 32
# f32: the kernel's online softmax reorders the sums, nothing else. bf16: q, k, v and the
# probabilities are rounded to bf16 in both paths, at different points.
TOLERANCES = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def segments_BT() -> jax.Array:
  """Three packed documents in row 0 (lengths 50, 40, 38), two in row 1 (100, 28)."""
  return jnp.asarray([[1] * 50 + [2] * 40 + [3] * 38, [1] * 100 + [2] * 28], jnp.int32)


def qkv(num_heads, num_kv_heads, dtype):
  keys = jax.random.split(jax.random.key(0), 3)
  return tuple(jax.random.normal(key, (B, T, heads, H), jnp.float32).astype(dtype)
               for key, heads in zip(keys, (num_heads, num_kv_heads, num_kv_heads)))


@pytest.mark.parametrize('num_heads, num_kv_heads, window, segmented, dtype', [
    (4, 2, 40, False, jnp.float32),
    (2, 1, 0, True, jnp.float32),
    (4, 2, 24, True, jnp.bfloat16),
], ids=['window-gqa-f32', 'causal-segments-mqa-f32', 'window-segments-gqa-bf16'])
def test_splash_equals_xla_forward_and_gradients(num_heads, num_kv_heads, window, segmented,
                                                 dtype):
  q, k, v = qkv(num_heads, num_kv_heads, dtype)
  segment_ids_BT = segments_BT() if segmented else None
  mask_BTT = jnp.broadcast_to(attention.causal_mask(T, T, window), (B, T, T))
  if segmented:
    mask_BTT &= segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  no_dropout = lambda x, deterministic: x
  xla = lambda q, k, v: attention.xla_attention(q, k, v, mask_BTT, no_dropout, True)
  splash = lambda q, k, v: attention_kernels.splash_attention(
      q, k, v, segment_ids_BT, sliding_window=window, block_q=128, block_kv=128)
  cotangent = jax.random.normal(jax.random.key(1), (B, T, num_heads, H)).astype(dtype)
  results = []
  for fn in (xla, splash):
    def forward_backward(q, k, v, fn=fn):
      out, vjp = jax.vjp(fn, q, k, v)
      return out, *vjp(cotangent)
    results.append(jax.jit(forward_backward)(q, k, v))  # Jitted, interpret mode runs faster.
  for name, expected, got in zip(('out', 'dq', 'dk', 'dv'), *results):
    assert got.dtype == expected.dtype
    scale = float(jnp.abs(expected.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32),
                               atol=TOLERANCES[dtype] * scale, err_msg=name)


def tiny_model(attention_impl: str, **fields) -> Transformer:
  cfg = ModelConfig.from_config(config_lib.model_config())
  return Transformer(dataclasses.replace(
      cfg, vocab_size=64, d_model=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
      d_ff=128, max_seq_len=T, attention=attention_impl, **fields))


def test_splash_under_a_mesh_equals_xla_in_the_transformer():
  """Batch over data x fsdp and heads over tensor, as the rules split the activations."""
  config = tiny_config()
  override(config, **{'mesh.data': 1, 'mesh.fsdp': 2, 'mesh.tensor': 2})
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:4])
  tokens_BT = jax.random.randint(jax.random.key(2), (B, T), 0, 64)
  segment_ids_BT = segments_BT()
  xla_model, splash_model = tiny_model('xla'), tiny_model('splash')
  params = xla_model.init(jax.random.key(0), tokens_BT)
  with sharding.use_mesh(mesh, config.mesh.rules):
    logits = [jax.jit(model.apply)(params, tokens_BT,
                                        segment_ids_BT=segment_ids_BT)
              for model in (xla_model, splash_model)]
  np.testing.assert_allclose(logits[1], logits[0], atol=1e-4, rtol=1e-4)


def tpu_mesh() -> jax.sharding.AbstractMesh:
  """A one-chip v5e mesh to trace for: what compiling for a TPU topology traces under."""
  return jax.sharding.AbstractMesh(
      (1, 1, 1), sharding.MESH_AXES,
      abstract_device=jax.sharding.AbstractDevice('TPU v5 lite', None, 'tpu'))


@pytest.mark.parametrize('attention_impl, kernels', [('splash', 3), ('auto', 3), ('xla', 0)])
def test_training_gradients_lower_for_tpu_with_the_pallas_kernel(attention_impl, kernels):
  """Forward, dq and dkv kernels per layer; 'auto' is splash on TPU."""
  model = tiny_model(attention_impl, remat='dots_no_batch_attention')
  tokens_BT = jnp.zeros((B, T), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens_BT)
  loss = lambda params: model.apply(params, tokens_BT, segment_ids_BT=segments_BT()).sum()
  with jax.sharding.use_abstract_mesh(tpu_mesh()), nn.logical_axis_rules(
      list(config_lib.DEFAULT_RULES)):
    hlo = jax.jit(jax.grad(loss)).trace(params).lower(lowering_platforms=('tpu',)).as_text()
  assert hlo.count('tpu_custom_call') == kernels


def test_auto_is_xla_on_cpu_and_prompts_of_any_length_run_xla():
  assert attention.resolve('auto') == 'xla'
  tokens_BT = jax.random.randint(jax.random.key(3), (B, 20), 0, 64)  # 20: no whole block.
  params = tiny_model('xla').init(jax.random.key(0), tokens_BT)
  np.testing.assert_array_equal(tiny_model('splash').apply(params, tokens_BT),
                                tiny_model('xla').apply(params, tokens_BT))


def test_block_sizes_must_be_multiples_of_128():
  config = override(tiny_config(), **{'model.attention': 'splash', 'model.attention_block_q': 96})
  with pytest.raises(ValueError, match=r'config.model.attention_block_q=96 .* multiples of 128'):
    config_lib.validate(config)
