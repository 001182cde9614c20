"""Causal self-attention with RoPE, GQA/MQA, optional qk-norm and sliding window, and its KV cache.

Shape suffixes (`q_BTNH`) use the letters of the legend in lepton_jax/model/__init__.py.

The KV cache is the `cache` variable collection: per layer `cached_key` and `cached_value`, each
[B, S, K, H] with logical axes CACHE_AXES. Position p of a row lives in slot p % S, so a cache of
S slots holds each row's last S positions: with S >= every position it holds them all, with
S = the sliding window it is a ring buffer that holds exactly the keys a query can still see.
`Prefill` fills a fresh cache from whole prompts; `Decode` runs one token per row against it.
With cfg.quant.kv_cache='int8' the cached keys and values are int8, each beside a float32
`cached_key_scale` / `cached_value_scale` [B, S, K]: one scale per token and kv head.
"""
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lepton_jax.kernels import attention as attention_kernels
from lepton_jax.model import hooks, int8, layers
from lepton_jax.model.config import ModelConfig

# config.model.attention: xla = xla_attention below; dot_product = jax.nn.dot_product_attention,
# which picks a fused kernel where the platform has one; cudnn = insist on cuDNN flash; splash =
# the TPU Pallas kernel (kernels/attention.py); auto = `resolve`'s pick for the platform.
# The kernels serve the full-sequence path (training, evaluation, prefill); decoding runs XLA's.
IMPLEMENTATIONS = ('xla', 'dot_product', 'cudnn', *attention_kernels.KERNELS, 'auto')
# What 'auto' means per platform: splash on TPU, cuDNN through dot_product on GPU, XLA elsewhere.
AUTO = {'tpu': 'splash', 'gpu': 'dot_product'}


def resolve(implementation: str) -> str:
  """The implementation that config.model.attention means for the platform being traced for."""
  if implementation != 'auto':
    return implementation
  return AUTO.get(attention_kernels.target_platform(), 'xla')


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


# Logical axes of a cached key or value [B, S, K, H]: split like the activations they come from.
CACHE_AXES = ('batch', 'length', 'kv_heads', 'head_dim')


@flax.struct.dataclass
class Prefill:
  """Run whole right-padded prompts and fill a fresh cache of `cache_len` slots.

  Row b's prompt is its first lengths_B[b] tokens. Attention runs within the tokens, as in
  training; the cache keeps each row's last cache_len prompt positions.
  """
  lengths_B: jax.Array
  cache_len: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class Decode:
  """Run one token per row, at that row's own position: its key and value join the cache, its
  query attends to the cache."""


def slot_positions(positions_BT: jax.Array, cache_len: int) -> jax.Array:
  """[B, T, S]: the position each slot holds once a row's newest token at position t is written:
  the latest p <= t in the slot (p % S == s); negative for a slot not yet written."""
  t_BT1 = positions_BT[..., None]
  return t_BT1 - (t_BT1 - jnp.arange(cache_len)) % cache_len


def cache_mask(positions_BT: jax.Array, cache_len: int, sliding_window: int) -> jax.Array:
  """[B, T, S] bool: the slots a query at each position sees, as causal_mask would unpadded."""
  key_pos_BTS = slot_positions(positions_BT, cache_len)
  mask_BTS = key_pos_BTS >= 0
  if sliding_window:
    mask_BTS &= key_pos_BTS > positions_BT[..., None] - sliding_window
  return mask_BTS


def fill_slots(x_BTKH: jax.Array, lengths_B: jax.Array, cache_len: int) -> jax.Array:
  """[B, S, K, H]: each row's last cache_len positions before lengths_B, each in its slot."""
  key_pos_BS = slot_positions(lengths_B[:, None] - 1, cache_len)[:, 0]
  index_BS11 = jnp.clip(key_pos_BS, 0, x_BTKH.shape[1] - 1)[:, :, None, None]
  return jnp.take_along_axis(x_BTKH, index_BS11, axis=1)  # Unwritten slots: masked, any value.


def write_slots(cache_BSKH: jax.Array, x_BTKH: jax.Array, positions_BT: jax.Array) -> jax.Array:
  """The cache with each row's new keys (or values, or their scales [B, T, K]) written to their
  slots, in place."""
  slots_BT = positions_BT % cache_BSKH.shape[1]
  return jax.vmap(lambda cache_SKH, x_TKH, slots_T: cache_SKH.at[slots_T].set(x_TKH))(
      cache_BSKH, x_BTKH, slots_BT)


def xla_attention(q_BTNH, k_BSKH, v_BSKH, mask, dropout: nn.Module, deterministic: bool,
                  k_scale_BSK=None, v_scale_BSK=None, hook=None):
  """Einsum attention; query heads N are grouped over K kv heads without repeating k/v.

  `mask` is [T, S], the same for every row, or [B, T, S]. With scales, k and v are an int8
  cache (int8.quantize_kv's): a key's scale multiplies its logits and a value's its
  probabilities, exactly as dequantizing first would, without a float copy of the cache.
  `hook` (hooks.bind's) sees the masked scaled logits and the probabilities as [B, N, T, S].

  Heads go in front once (B, K, G*T, H) so that both matmuls are plain batched matmuls over
  (B, K) with the G query heads of a kv head stacked along M. XLA:CPU otherwise fuses a transpose
  into every operand and gradient of 5-D 'btkgh' einsums: this form runs attention fwd+bwd
  ~1.5-3x faster on CPU, for MHA (G=1) as for GQA.
  """
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  G = N // K
  dtype = q_BTNH.dtype
  # Head n = k * G + g, so (N, T) -> (K, G * T) is a reshape.
  q_BKMH = (q_BTNH * H ** -0.5).transpose(0, 2, 1, 3).reshape(B, K, G * T, H)
  k_BKSH = k_BSKH.astype(dtype).transpose(0, 2, 1, 3)
  v_BKSH = v_BSKH.astype(dtype).transpose(0, 2, 1, 3)
  logits_BKMS = jnp.einsum('bkmh,bksh->bkms', q_BKMH, k_BKSH).astype(jnp.float32)
  if k_scale_BSK is not None:
    logits_BKMS = logits_BKMS * k_scale_BSK.transpose(0, 2, 1)[:, :, None, :]
  mask_bMS = jnp.tile(mask, (G, 1))[..., None, :, :]  # b: B, or 1 for a [T, S] mask.
  logits_BKMS = jnp.where(mask_bMS, logits_BKMS, jnp.finfo(jnp.float32).min)
  if hook is not None:  # (K, G * T) -> (N, T) is a reshape, as for q above.
    logits_BKMS = hook('hook_attn_scores', logits_BKMS.reshape(B, N, T, -1)).reshape(
        logits_BKMS.shape)
  probs_BKMS = jax.nn.softmax(logits_BKMS, axis=-1)
  if hook is not None:
    probs_BKMS = hook('hook_pattern', probs_BKMS.reshape(B, N, T, -1)).reshape(probs_BKMS.shape)
  if v_scale_BSK is not None:
    probs_BKMS = probs_BKMS * v_scale_BSK.transpose(0, 2, 1)[:, :, None, :]
  probs_BKMS = dropout(probs_BKMS.astype(dtype), deterministic=deterministic)
  out_BKMH = jnp.einsum('bkms,bksh->bkmh', probs_BKMS, v_BKSH)
  return out_BKMH.reshape(B, N, T, H).transpose(0, 2, 1, 3)


class Attention(nn.Module):
  """Multi-head causal self-attention; num_kv_heads < num_heads gives GQA (1 gives MQA).

  Hook points (model/hooks.py): hook_q, hook_k, hook_v (the projections, before qk-norm and
  rope), hook_rot_q, hook_rot_k (after rope), hook_attn_scores, hook_pattern (xla attention
  only), hook_z (the heads' outputs before the output projection).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, deterministic: bool,
               cache: Prefill | Decode | None = None,
               segment_ids_BT: jax.Array | None = None) -> jax.Array:
    cfg = self.cfg
    dense = lambda features, in_axes, out_axes, bias, name: layers.Dense(
        features, in_axes=in_axes, out_axes=out_axes, use_bias=bias, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype, lora=cfg.lora, quant=cfg.quant, prune=cfg.prune,
        deterministic=deterministic, name=name)
    hook = lambda name, x: hooks.point(self, name, x)
    q_BTNH = hook('hook_q', dense((cfg.num_heads, cfg.head_dim), ('embed',), ('heads', 'head_dim'),
                                  cfg.qkv_bias, 'query')(x_BTD))
    k_BTKH = hook('hook_k', dense((cfg.num_kv_heads, cfg.head_dim), ('embed',),
                                  ('kv_heads', 'head_dim'), cfg.qkv_bias, 'key')(x_BTD))
    v_BTKH = hook('hook_v', dense((cfg.num_kv_heads, cfg.head_dim), ('embed',),
                                  ('kv_heads', 'head_dim'), cfg.qkv_bias, 'value')(x_BTD))
    if cfg.qk_norm:
      norm = lambda name: layers.make_norm(cfg, name, axis_name='head_dim')
      q_BTNH, k_BTKH = norm('query_norm')(q_BTNH), norm('key_norm')(k_BTKH)
    if cfg.positions == 'rope':
      inv_freq_h = rope_frequencies(cfg)
      q_BTNH = hook('hook_rot_q', rope(q_BTNH, positions_BT, inv_freq_h))
      k_BTKH = hook('hook_rot_k', rope(k_BTKH, positions_BT, inv_freq_h))
    q_BTNH = nn.with_logical_constraint(q_BTNH, ('batch', 'length', 'act_heads', 'head_dim'))

    if isinstance(cache, Decode):
      k_BSKH, v_BSKH, scales = self.decode_cache(k_BTKH, v_BTKH, positions_BT)
      mask_BTS = cache_mask(positions_BT, k_BSKH.shape[1], cfg.sliding_window)
      out_BTNH = xla_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, nn.Dropout(cfg.dropout),
                               deterministic, *scales)
    else:
      if isinstance(cache, Prefill):
        self.fill_cache(k_BTKH, v_BTKH, cache)
      out_BTNH = self.self_attention(q_BTNH, k_BTKH, v_BTKH, deterministic, segment_ids_BT)
    out_BTNH = hook('hook_z', out_BTNH)
    return dense((x_BTD.shape[-1],), ('heads', 'head_dim'), ('embed',), cfg.out_bias,
                 'out')(out_BTNH)

  def self_attention(self, q_BTNH, k_BTKH, v_BTKH, deterministic: bool,
                     segment_ids_BT: jax.Array | None = None) -> jax.Array:
    """Attention of the tokens to each other (training, evaluation, prefill).

    With segment ids (packed examples, 0 for padding) a token attends only within its segment.
    """
    cfg = self.cfg
    T = q_BTNH.shape[1]
    implementation = resolve(cfg.attention)
    if implementation in attention_kernels.KERNELS:
      if T % attention_kernels.LANES == 0:
        return attention_kernels.splash_attention(
            q_BTNH, k_BTKH, v_BTKH, segment_ids_BT,
            sliding_window=cfg.sliding_window, block_q=cfg.attention_block_q,
            block_kv=cfg.attention_block_kv)
      implementation = 'xla'  # The kernels tile T in whole blocks: a prompt of any length.
    if segment_ids_BT is not None:
      mask_BTT = causal_mask(T, T, cfg.sliding_window) & (
          segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
      if implementation == 'cudnn':
        raise ValueError("segment ids (packed examples) need config.model.attention 'xla' or "
                         "'dot_product': the cuDNN kernel takes no such mask")
      if implementation == 'dot_product':
        return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask=mask_BTT[:, None])
      return xla_attention(q_BTNH, k_BTKH, v_BTKH, mask_BTT, nn.Dropout(cfg.dropout),
                           deterministic, hook=hooks.bind(self))
    if implementation == 'xla':
      return xla_attention(q_BTNH, k_BTKH, v_BTKH, causal_mask(T, T, cfg.sliding_window),
                           nn.Dropout(cfg.dropout), deterministic, hook=hooks.bind(self))
    window = (cfg.sliding_window - 1, 0) if cfg.sliding_window else None
    return jax.nn.dot_product_attention(
        q_BTNH, k_BTKH, v_BTKH, is_causal=True, local_window_size=window,
        implementation='cudnn' if implementation == 'cudnn' else None)

  def fill_cache(self, k_BTKH, v_BTKH, prefill: Prefill) -> None:
    """Creates this layer's cache from the prompts' keys and values (int8 with a scale per
    token and kv head when cfg.quant.kv_cache is int8)."""
    for name, x_BTKH in (('cached_key', k_BTKH), ('cached_value', v_BTKH)):
      x_BSKH = fill_slots(x_BTKH, prefill.lengths_B, prefill.cache_len)
      entries = {name: (x_BSKH, CACHE_AXES)}
      if self.cfg.quant.kv_cache == 'int8':
        x_BSKH, scale_BSK = int8.quantize_kv(x_BSKH)
        entries = {name: (x_BSKH, CACHE_AXES), f'{name}_scale': (scale_BSK, CACHE_AXES[:3])}
      for entry, (value, axes) in entries.items():
        variable = self.variable('cache', entry, nn.with_logical_partitioning(jnp.zeros, axes),
                                 value.shape, value.dtype)
        variable.value = nn.with_logical_constraint(value, axes)

  def decode_cache(self, k_BTKH, v_BTKH, positions_BT):
    """Writes the new tokens' keys and values into this layer's cache; returns the cache
    (keys, values, and their scales: () for a float cache)."""
    if k_BTKH.shape[1] != 1:  # A ring would overwrite keys that earlier queries of a step see.
      raise ValueError(f'Decode runs one token per row; got {k_BTKH.shape[1]}')
    quantized = self.cfg.quant.kv_cache == 'int8'
    cached, scales = [], []
    for name, x_BTKH in (('cached_key', k_BTKH), ('cached_value', v_BTKH)):
      entries = [(name, x_BTKH, CACHE_AXES)]
      if quantized:
        x_BTKH, scale_BTK = int8.quantize_kv(x_BTKH)
        entries = [(name, x_BTKH, CACHE_AXES), (f'{name}_scale', scale_BTK, CACHE_AXES[:3])]
      for (entry, value, axes), into in zip(entries, (cached, scales)):
        variable = self.variable('cache', entry)
        variable.value = nn.with_logical_constraint(
            write_slots(variable.value, value, positions_BT), axes)
        into.append(variable.value)
    return (*cached, tuple(scales))
