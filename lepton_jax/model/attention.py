"""Causal self-attention with RoPE, GQA/MQA, optional qk-norm and sliding window.

Shape suffixes (`q_BTNH`) use the letters of the legend in lepton_jax/model/__init__.py.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lepton_jax.model import layers
from lepton_jax.model.config import ModelConfig

# config.model.attention: xla = xla_attention below; dot_product = jax.nn.dot_product_attention,
# which picks a fused kernel where the platform has one; cudnn = insist on cuDNN flash.
IMPLEMENTATIONS = ('xla', 'dot_product', 'cudnn')


# config.model.rope_scaling: how the inverse frequencies are rescaled for long contexts.
ROPE_SCALINGS = ('none', 'llama3')


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
  """[h] f32 inverse frequencies of the rotary embedding, rescaled as cfg.rope_scaling says.

  llama3 (Llama 3.1): wavelengths longer than original_max_len / low_freq_factor are stretched by
  `factor`, shorter than original_max_len / high_freq_factor kept, and those in between
  interpolated smoothly between the two.
  """
  half = cfg.head_dim // 2
  inv_freq_h = 1.0 / cfg.rope_theta ** (np.arange(half, dtype=np.float64) / half)
  if cfg.rope_scaling == 'llama3':
    factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen_h = 2 * np.pi / inv_freq_h
    smooth_h = np.clip((cfg.rope_original_max_len / wavelen_h - low) / (high - low), 0.0, 1.0)
    inv_freq_h = (1 - smooth_h) * inv_freq_h / factor + smooth_h * inv_freq_h
  return inv_freq_h.astype(np.float32)


def rope(x_BTNH: jax.Array, positions_BT: jax.Array, inv_freq_h: np.ndarray) -> jax.Array:
  """Rotary embedding, half-split layout (HF Llama `rotate_half`), angles in f32."""
  angles_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq_h
  sin, cos = jnp.sin(angles_BTh)[:, :, None, :], jnp.cos(angles_BTh)[:, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BTNH.dtype)


def causal_mask(q_len: int, kv_len: int, sliding_window: int) -> jax.Array:
  """[T, S] bool: query t (the last q_len of kv_len positions) sees keys s <= t (within window)."""
  q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len)
  k_pos = jnp.arange(kv_len)[None, :]
  mask = k_pos <= q_pos
  if sliding_window:
    mask &= k_pos > q_pos - sliding_window
  return mask


def xla_attention(q_BTNH, k_BSKH, v_BSKH, mask_TS, dropout: nn.Module, deterministic: bool):
  """Einsum attention; query heads N are grouped over K kv heads without repeating k/v.

  Heads go in front once (B, K, G*T, H) so that both matmuls are plain batched matmuls over
  (B, K) with the G query heads of a kv head stacked along M. XLA:CPU otherwise fuses a transpose
  into every operand and gradient of 5-D 'btkgh' einsums: this form runs attention fwd+bwd
  ~1.5-3x faster on CPU, for MHA (G=1) as for GQA.
  """
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  G = N // K
  # Head n = k * G + g, so (N, T) -> (K, G * T) is a reshape.
  q_BKMH = (q_BTNH * H ** -0.5).transpose(0, 2, 1, 3).reshape(B, K, G * T, H)
  k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
  logits_BKMS = jnp.einsum('bkmh,bksh->bkms', q_BKMH, k_BKSH).astype(jnp.float32)
  logits_BKMS = jnp.where(jnp.tile(mask_TS, (G, 1)), logits_BKMS, jnp.finfo(jnp.float32).min)
  probs_BKMS = jax.nn.softmax(logits_BKMS, axis=-1).astype(v_BSKH.dtype)
  probs_BKMS = dropout(probs_BKMS, deterministic=deterministic)
  out_BKMH = jnp.einsum('bkms,bksh->bkmh', probs_BKMS, v_BKSH)
  return out_BKMH.reshape(B, N, T, H).transpose(0, 2, 1, 3)


class Attention(nn.Module):
  """Multi-head causal self-attention; num_kv_heads < num_heads gives GQA (1 gives MQA)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, deterministic: bool) -> jax.Array:
    cfg = self.cfg
    dense = lambda features, in_axes, out_axes, bias, name: layers.Dense(
        features, in_axes=in_axes, out_axes=out_axes, use_bias=bias, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype, lora=cfg.lora, deterministic=deterministic, name=name)
    q_BTNH = dense((cfg.num_heads, cfg.head_dim), ('embed',), ('heads', 'head_dim'),
                   cfg.qkv_bias, 'query')(x_BTD)
    k_BTKH = dense((cfg.num_kv_heads, cfg.head_dim), ('embed',), ('kv_heads', 'head_dim'),
                   cfg.qkv_bias, 'key')(x_BTD)
    v_BTKH = dense((cfg.num_kv_heads, cfg.head_dim), ('embed',), ('kv_heads', 'head_dim'),
                   cfg.qkv_bias, 'value')(x_BTD)
    if cfg.qk_norm:
      norm = lambda name: layers.make_norm(cfg, name, axis_name='head_dim')
      q_BTNH, k_BTKH = norm('query_norm')(q_BTNH), norm('key_norm')(k_BTKH)
    if cfg.positions == 'rope':
      inv_freq_h = rope_frequencies(cfg)
      q_BTNH = rope(q_BTNH, positions_BT, inv_freq_h)
      k_BTKH = rope(k_BTKH, positions_BT, inv_freq_h)
    q_BTNH = nn.with_logical_constraint(q_BTNH, ('batch', 'length', 'act_heads', 'head_dim'))

    T = x_BTD.shape[1]
    mask_TS = causal_mask(T, T, cfg.sliding_window)
    if cfg.attention == 'xla':
      out_BTNH = xla_attention(q_BTNH, k_BTKH, v_BTKH, mask_TS, nn.Dropout(cfg.dropout),
                               deterministic)
    else:
      window = (cfg.sliding_window - 1, 0) if cfg.sliding_window else None
      out_BTNH = jax.nn.dot_product_attention(
          q_BTNH, k_BTKH, v_BTKH, is_causal=True, local_window_size=window,
          implementation='cudnn' if cfg.attention == 'cudnn' else None)
    return dense((x_BTD.shape[-1],), ('heads', 'head_dim'), ('embed',), cfg.out_bias,
                 'out')(out_BTNH)
