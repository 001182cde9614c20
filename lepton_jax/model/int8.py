"""int8 arithmetic of the model: symmetric absmax quantization and the matmuls over int8 weights.

Every int8 value here is round(x / scale) clipped to [-127, 127] with scale = max|x| / 127 over
the values sharing it (zero-point free: weights and activations of a Transformer are centred).
The matmuls call lepton_jax/kernels/int8_matmul.py, which picks the Pallas kernel or XLA.
Shape suffixes as in lepton_jax/model/__init__.py, plus M (rows: every batch position), K (the
contracted input dims, flattened) and N (the output dims, flattened) of a Dense.
"""
import math

import jax
import jax.numpy as jnp

from lepton_jax.kernels import int8_matmul
from lepton_jax.model.config import QuantConfig

QMAX = 127


def absmax_scale(x: jax.Array, axis) -> jax.Array:
  """float32 max|x| / 127 over `axis` (kept as size-1 dims); 1 where all are zero (they stay 0)."""
  absmax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axis, keepdims=True)
  return jnp.where(absmax > 0, absmax / QMAX, 1.0)


def to_int8(x: jax.Array, scale: jax.Array) -> jax.Array:
  return jnp.clip(jnp.round(x.astype(jnp.float32) / scale), -QMAX, QMAX).astype(jnp.int8)


def rotate_axes(x: jax.Array, k: int) -> jax.Array:
  """x with its first k axes moved to the end: a kernel [*in, *out] to [*out, *in] (k = the
  number of input dims), and back (k = the number of output dims)."""
  return x.transpose(*range(k, x.ndim), *range(k))


def group_shape(shape_out_in: tuple[int, ...], num_in: int, group_size: int) -> tuple[int, ...]:
  """A weight's shape [*out, *in] as [*out, groups, group_size]: its inputs, flattened, cut into
  groups (so a group may span heads of an attention output)."""
  out_shape = shape_out_in[:len(shape_out_in) - num_in]
  return (*out_shape, math.prod(shape_out_in[len(out_shape):]) // group_size, group_size)


def quantize_weight(w_out_in: jax.Array, num_in: int,
                    quant: QuantConfig) -> tuple[jax.Array, jax.Array]:
  """(int8 weight [*out, *in], float32 scale) of a float weight [*out, *in], the scale shaped as
  QuantConfig says for quant.granularity."""
  if quant.granularity == 'group':
    w_grouped = w_out_in.reshape(group_shape(w_out_in.shape, num_in, quant.group_size))
    scale = absmax_scale(w_grouped, axis=-1)
    return to_int8(w_grouped, scale).reshape(w_out_in.shape), scale[..., 0]
  axis = None if quant.granularity == 'tensor' else tuple(
      range(w_out_in.ndim - num_in, w_out_in.ndim))
  scale = absmax_scale(w_out_in, axis=axis)
  return to_int8(w_out_in, scale), jnp.squeeze(scale, axis=axis)


def dequantize_weight(w_int8: jax.Array, scale: jax.Array, num_in: int, quant: QuantConfig,
                      dtype) -> jax.Array:
  """The float weight [*out, *in] an int8 one stands for."""
  if quant.granularity == 'group':
    w_grouped = w_int8.reshape(group_shape(w_int8.shape, num_in, quant.group_size))
    return (w_grouped * scale[..., None]).reshape(w_int8.shape).astype(dtype)
  scale = scale if quant.granularity == 'tensor' else scale.reshape(
      *scale.shape, *(1,) * num_in)
  return (w_int8 * scale).astype(dtype)


def quantize_rows(x_MK: jax.Array, granularity: str) -> tuple[jax.Array, jax.Array]:
  """Dynamic activation quantization: (int8 x_MK, float32 scale [M, 1] per token or [1, 1] per
  tensor). Per tensor, a row's values depend on the other rows of the batch (LLM.int8()'s
  absmax baseline does the same)."""
  scale = absmax_scale(x_MK, axis=None if granularity == 'tensor' else -1)
  return to_int8(x_MK, scale), scale.reshape(-1, 1)


def matmul(x: jax.Array, w_int8: jax.Array, scale: jax.Array, num_in: int, quant: QuantConfig,
           dtype) -> jax.Array:
  """x [..., *in] times an int8 weight [*out, *in] (quantize_weight's) -> [..., *out] in dtype.

  Channel and tensor scales factor out of the contraction and apply after it; group scales do
  not, so group-wise weights are dequantized first (weight-only: with int8 activations too the
  int32 sums would have to be split per group).
  """
  batch_shape, out_shape = x.shape[:x.ndim - num_in], w_int8.shape[:w_int8.ndim - num_in]
  x_MK = x.reshape(math.prod(batch_shape), -1)
  w_NK = w_int8.reshape(math.prod(out_shape), -1)
  if quant.granularity == 'group':
    w_NK = dequantize_weight(w_int8, scale, num_in, quant, dtype).reshape(w_NK.shape)
    y_MN = jax.lax.dot_general(x_MK, w_NK, (((1,), (1,)), ((), ())))
  elif quant.activations == 'int8':
    x_int8_MK, x_scale_M1 = quantize_rows(x_MK, quant.activation_granularity)
    y_MN = int8_matmul.int8_matmul(x_int8_MK, w_NK, x_scale_M1, scale.reshape(-1),
                                   out_dtype=dtype, implementation=quant.kernel)
  else:
    y_MN = int8_matmul.int8_weight_matmul(x_MK, w_NK, scale.reshape(-1), out_dtype=dtype,
                                          implementation=quant.kernel)
  return y_MN.reshape(*batch_shape, *out_shape)


def fake_quantize_weight(w_out_in: jax.Array, num_in: int, quant: QuantConfig) -> jax.Array:
  """A float weight [*out, *in] as its int8 weight computes (quantize_weight, then
  dequantize_weight), with a straight-through gradient: what quantization-aware training uses."""
  w_int8, scale = quantize_weight(w_out_in, num_in, quant)
  return straight_through(w_out_in, dequantize_weight(w_int8, scale, num_in, quant,
                                                      w_out_in.dtype))


def fake_quantize_kernel(kernel: jax.Array, num_in: int, quant: QuantConfig) -> jax.Array:
  """fake_quantize_weight of a Dense kernel, laid out [*in, *out]."""
  w_out_in = fake_quantize_weight(rotate_axes(kernel, num_in), num_in, quant)
  return rotate_axes(w_out_in, kernel.ndim - num_in)


def fake_quantize_rows(x: jax.Array, num_in: int, granularity: str) -> jax.Array:
  """x [..., *in] as W8A8 quantizes it (quantize_rows over its last num_in dims), with a
  straight-through gradient."""
  x_MK = x.reshape(-1, math.prod(x.shape[x.ndim - num_in:]))
  x_int8_MK, scale_M1 = quantize_rows(x_MK, granularity)
  return straight_through(x, (x_int8_MK * scale_M1).reshape(x.shape).astype(x.dtype))


def straight_through(x: jax.Array, quantized: jax.Array) -> jax.Array:
  """`quantized` forward, the identity backward (the straight-through estimator)."""
  return x + jax.lax.stop_gradient(quantized - x)


def quantize_kv(x_BTKH: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(int8 keys or values [B, T, K, H], float32 scale [B, T, K]: one per token and kv head)."""
  scale_BTK1 = absmax_scale(x_BTKH, axis=-1)
  return to_int8(x_BTKH, scale_BTK1), scale_BTK1[..., 0]
