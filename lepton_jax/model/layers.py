"""Leaf layers: the one dense layer, norms, token and position embeddings.

Every parameter is created through `nn.with_logical_partitioning`, so it carries logical axis
names ('embed', 'mlp', ...) that config rules map to mesh axes (see lepton_jax/sharding.py).
Shape suffixes (`x_BTD`) use the letters of the legend in lepton_jax/model/__init__.py.
"""
import dataclasses
import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lepton_jax.model import int8
from lepton_jax.model.config import LoraConfig, ModelConfig, PruneConfig, QuantConfig

Dtype = jnp.dtype
default_kernel_init = nn.initializers.normal(stddev=0.02)


def matmul_2d(x: jax.Array, w: jax.Array, num_contracted: int) -> jax.Array:
  """Contracts the last `num_contracted` dims of x with the first of w, as one 2D matmul.

  Same math as a dot_general over those dims, but the weight gradient is then a plain 2D
  x^T @ dy. Autodiff of the N-D form contracts two dims at once (batch and length), and XLA:CPU
  lowers that by materialising a transposed copy of dy fused with the elementwise backward
  before it (about 2x slower for the MLP fwd+bwd at d 128); the 2D form needs no copy.
  """
  batch_shape, out_shape = x.shape[:x.ndim - num_contracted], w.shape[num_contracted:]
  x_2d = x.reshape(math.prod(batch_shape), -1)
  w_2d = w.reshape(x_2d.shape[1], -1)
  return (x_2d @ w_2d).reshape(*batch_shape, *out_shape)


def rowwise_matmul(x: jax.Array, w: jax.Array, num_contracted: int) -> jax.Array:
  """matmul_2d with a weight per batch row: x [B, ..., *in] times w [B, *in, *out]."""
  rows, contracted = x.shape[0], x.shape[x.ndim - num_contracted:]
  x_BMK = x.reshape(rows, -1, math.prod(contracted))
  w_BKN = w.reshape(rows, x_BMK.shape[-1], -1)
  return (x_BMK @ w_BKN).reshape(*x.shape[:x.ndim - num_contracted],
                                 *w.shape[1 + num_contracted:])


# Adapters per batch row (lora.per_row): where a Dense finds lora_a and lora_b [B, ...] in this
# collection, row b of the batch computes with adapter b (a server's batch of mixed adapters).
LORA_ROWS = 'lora_rows'


class Dense(nn.Module):
  """The single weight matmul of the model: contracts the last `len(in_axes)` input dims.

  The kernel has shape (*contracted input dims, *features) and logical names
  (*in_axes, *out_axes). LoRA adapters (when `lora` targets this layer's path), int8 weights
  (when `quant` quantizes it) and pruning masks (when `prune` masks it) hook in here and nowhere
  else.
  """
  features: Sequence[int]
  _: dataclasses.KW_ONLY
  in_axes: Sequence[str]
  out_axes: Sequence[str]
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = default_kernel_init
  lora: LoraConfig = LoraConfig()
  quant: QuantConfig = QuantConfig()
  prune: PruneConfig = PruneConfig()
  deterministic: bool = True  # False: the adapter's dropout is on (training).

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    num_in, path = len(self.in_axes), '/'.join(self.path)
    in_shape = x.shape[-num_in:]
    x = x.astype(self.dtype)
    quantized = self.quant.quantizes(path)
    if quantized and self.quant.stores_int8:
      w_int8, scale = self._int8_weight(in_shape)
      y = int8.matmul(x, w_int8, scale, num_in, self.quant, self.dtype)
      kernel = lambda: int8.rotate_axes(  # [*out, *in] -> [*in, *out]
          int8.dequantize_weight(w_int8, scale, num_in, self.quant, self.dtype),
          len(self.features))
    else:
      float_kernel = self.param(
          'kernel',
          nn.with_logical_partitioning(self.kernel_init, (*self.in_axes, *self.out_axes)),
          (*in_shape, *self.features), self.param_dtype).astype(self.dtype)
      if self.prune.masks(path):
        float_kernel = jnp.where(self._mask(in_shape).reshape(float_kernel.shape), float_kernel, 0)
      x_quantized = x
      if quantized:  # Quantization-aware training: the int8 model's values, float gradients.
        float_kernel = int8.fake_quantize_kernel(float_kernel, num_in, self.quant)
        if self.quant.activations == 'int8':
          x_quantized = int8.fake_quantize_rows(x, num_in, self.quant.activation_granularity)
      y = matmul_2d(x_quantized, float_kernel, num_in)
      kernel = lambda: float_kernel
    if self.lora.adapts(path):
      y = self._adapted(x, y, kernel, in_shape)
    if self.use_bias:
      bias = self.param(
          'bias', nn.with_logical_partitioning(nn.initializers.zeros, tuple(self.out_axes)),
          tuple(self.features), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y

  def _mask(self, in_shape) -> jax.Array:
    """The `prune` collection's bool mask [prod(in), prod(out)], all True until pruned
    (lepton_jax/prune.py): sharded as the kernel's first input and first output axes."""
    shape = (math.prod(in_shape), math.prod(self.features))
    return self.variable('prune', 'kernel', nn.with_logical_partitioning(
        lambda: jnp.ones(shape, jnp.bool_), (self.in_axes[0], self.out_axes[0]))).value

  def _int8_weight(self, in_shape) -> tuple[jax.Array, jax.Array]:
    num_in = len(in_shape)
    return int8_variables(self, 'kernel', lambda kernel: int8.rotate_axes(kernel, num_in),
                          (*self.features, *in_shape), (*self.out_axes, *self.in_axes), num_in,
                          self.quant)

  def _adapted(self, x, y, kernel, in_shape) -> jax.Array:
    """y + scale (dropout(x) A) B, or DoRA's rescaled form (see model/config.py LoraConfig);
    y = x W, and `kernel()` gives W [*in, *out] (DoRA's column norms need it)."""
    lora, num_in = self.lora, len(in_shape)
    if self.has_variable(LORA_ROWS, 'lora_a'):  # Each batch row with its own adapter.
      a_BIR, b_BRO = (self.get_variable(LORA_ROWS, name).astype(self.dtype)
                      for name in ('lora_a', 'lora_b'))
      return y + lora.scale * rowwise_matmul(rowwise_matmul(x, a_BIR, num_in), b_BRO, 1)
    a_init = _lora_a_init(lora, math.prod(in_shape))
    a = self.param('lora_a', nn.with_logical_partitioning(a_init, (*self.in_axes, 'lora_rank')),
                   (*in_shape, lora.rank), self.param_dtype).astype(self.dtype)
    b_init = nn.initializers.normal(0.02) if lora.svd else nn.initializers.zeros
    b = self.param('lora_b', nn.with_logical_partitioning(b_init, ('lora_rank', *self.out_axes)),
                   (lora.rank, *self.features), self.param_dtype).astype(self.dtype)
    x_dropped = nn.Dropout(lora.dropout)(x, deterministic=self.deterministic)
    h = matmul_2d(x_dropped, a, num_in)  # [..., r]
    if lora.svd:  # AdaLoRA's singular values: zero, so a fresh adapter changes nothing.
      h = h * self.param('lora_e', nn.with_logical_partitioning(nn.initializers.zeros,
                                                                ('lora_rank',)),
                         (lora.rank,), self.param_dtype).astype(self.dtype)
    delta = lora.scale * matmul_2d(h, b, 1)
    if not lora.dora:
      return y + delta
    in_dims, w = tuple(range(num_in)), kernel()
    column_norms = lambda _: jnp.linalg.norm(w.astype(jnp.float32), axis=in_dims).astype(
        self.param_dtype)
    magnitude = self.param('lora_magnitude',
                           nn.with_logical_partitioning(column_norms, tuple(self.out_axes)))
    adapted_kernel = w + lora.scale * matmul_2d(a, b, 1).astype(w.dtype)
    norm = jax.lax.stop_gradient(jnp.linalg.norm(adapted_kernel.astype(jnp.float32), axis=in_dims))
    rescale = (magnitude.astype(jnp.float32) / norm).astype(self.dtype)
    return rescale * (y + delta)


def int8_variables(module: nn.Module, name: str, to_out_in, shape_out_in: tuple[int, ...],
                   names_out_in: tuple[str, ...], num_in: int,
                   quant: QuantConfig) -> tuple[jax.Array, jax.Array]:
  """A module's int8 weight [*out, *in] and its scale (int8.quantize_weight's): `quant` variables
  `name` and 'scale', in place of the float param `name`.

  Created from that float param (`to_out_in` puts it in [*out, *in] order) when the variables
  applied hold it and `quant` is mutable (lepton_jax/quant.py quantizes a model so); from zeros
  otherwise (init, whose values a checkpoint replaces).
  """
  num_out = len(shape_out_in) - num_in
  if quant.granularity == 'group' and math.prod(shape_out_in[num_out:]) % quant.group_size:
    inputs = ' x '.join(f'{name}={size}' for name, size in
                        zip(names_out_in[num_out:], shape_out_in[num_out:]))
    raise ValueError(f'config.quant.group_size={quant.group_size} does not divide the inputs of '
                     f'{"/".join(module.path)} ({inputs})')

  @functools.cache  # Runs once, and only where the variables are created.
  def quantized():
    if module.has_variable('params', name):
      w_out_in = to_out_in(module.get_variable('params', name))
    else:
      w_out_in = jnp.zeros(shape_out_in, jnp.float32)
    return int8.quantize_weight(w_out_in, num_in, quant)

  scale_names = {'channel': names_out_in[:num_out], 'tensor': (),
                 'group': (*names_out_in[:num_out], None)}[quant.granularity]
  w_int8 = module.variable('quant', name, nn.with_logical_partitioning(
      lambda: quantized()[0], names_out_in)).value
  scale = module.variable('quant', 'scale', nn.with_logical_partitioning(
      lambda: quantized()[1], scale_names)).value
  return w_int8, scale


def _lora_a_init(lora: LoraConfig, fan_in: int) -> nn.initializers.Initializer:
  if lora.svd:  # PEFT's AdaLoRA: A and B N(0, 0.02), the singular values zero.
    return nn.initializers.normal(0.02)
  if lora.init == 'kaiming':  # PEFT's kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = fan_in ** -0.5
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
  return nn.initializers.normal(1 / lora.rank)  # PEFT's 'gaussian'.


class Norm(nn.Module):
  """RMSNorm, x / rms(x) * scale (Llama); with `center`, LayerNorm, (x - mean) / std * scale + bias
  (GPT-2). Statistics in f32, the result cast back before the scale (Llama's order of operations).
  """
  eps: float
  _: dataclasses.KW_ONLY
  center: bool = False
  axis_name: str = 'embed'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def param(name, init):
      return self.param(name, nn.with_logical_partitioning(init, (self.axis_name,)),
                        (x.shape[-1],), self.param_dtype).astype(self.dtype)

    x32 = x.astype(jnp.float32)
    if self.center:
      x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    y = normed.astype(self.dtype) * param('scale', nn.initializers.ones)
    return y + param('bias', nn.initializers.zeros) if self.center else y


NORMS = {'rmsnorm': False, 'layernorm': True}  # ModelConfig.norm -> Norm's `center`


def make_norm(cfg: ModelConfig, name: str, axis_name: str = 'embed') -> Norm:
  """The norm the model config names, over its last axis (logical name `axis_name`)."""
  return Norm(cfg.norm_eps, center=NORMS[cfg.norm], axis_name=axis_name, dtype=cfg.dtype,
              param_dtype=cfg.param_dtype, name=name)


class Embed(nn.Module):
  """Token embedding table (V, D); `attend` is the tied output head. With quant.embed the table
  is int8 (rows are the head's output channels), in the `quant` collection (with quant.qat, a
  float param used as its int8 rows compute)."""
  vocab_size: int
  _: dataclasses.KW_ONLY
  d_model: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  quant: QuantConfig = QuantConfig()

  def setup(self):
    shape, names = (self.vocab_size, self.d_model), ('vocab', 'embed')
    self.stores_int8 = self.quant.embeds and self.quant.stores_int8
    if self.stores_int8:
      self.table_int8_VD, self.scale = int8_variables(self, 'embedding', lambda table: table,
                                                      shape, names, 1, self.quant)
    else:
      self.embedding = self.param(
          'embedding', nn.with_logical_partitioning(default_kernel_init, names), shape,
          self.param_dtype)

  def _float_table(self) -> jax.Array:
    if self.quant.embeds:  # Quantization-aware training.
      return int8.fake_quantize_weight(self.embedding, 1, self.quant)
    return self.embedding

  def __call__(self, tokens_BT: jax.Array) -> jax.Array:
    if self.stores_int8:
      rows_BTD = jnp.take(self.table_int8_VD, tokens_BT, axis=0)
      scale = self.scale if self.quant.granularity == 'tensor' else jnp.take(
          self.scale, tokens_BT, axis=0)
      return int8.dequantize_weight(rows_BTD, scale, 1, self.quant, self.dtype)
    return jnp.take(self._float_table(), tokens_BT, axis=0).astype(self.dtype)

  def attend(self, x_BTD: jax.Array) -> jax.Array:
    x_BTD = x_BTD.astype(self.dtype)
    if self.stores_int8:
      return int8.matmul(x_BTD, self.table_int8_VD, self.scale, 1, self.quant, self.dtype)
    if self.quant.embeds and self.quant.activations == 'int8':
      x_BTD = int8.fake_quantize_rows(x_BTD, 1, self.quant.activation_granularity)
    return matmul_2d(x_BTD, self._float_table().astype(self.dtype).T, 1)
