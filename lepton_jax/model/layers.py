"""Leaf layers: the one dense layer, norms, token and position embeddings.

Every parameter is created through `nn.with_logical_partitioning`, so it carries logical axis
names ('embed', 'mlp', ...) that config rules map to mesh axes (see lepton_jax/sharding.py).
Shape suffixes (`x_BTD`) use the letters of the legend in lepton_jax/model/__init__.py.
"""
import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lepton_jax.model.config import LoraConfig, ModelConfig

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


class Dense(nn.Module):
  """The single weight matmul of the model: contracts the last `len(in_axes)` input dims.

  The kernel has shape (*contracted input dims, *features) and logical names
  (*in_axes, *out_axes). LoRA adapters (when `lora` targets this layer's path) and int8 weights
  hook in here and nowhere else.
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
  deterministic: bool = True  # False: the adapter's dropout is on (training).

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    num_in = len(self.in_axes)
    in_shape = x.shape[-num_in:]
    kernel = self.param(
        'kernel',
        nn.with_logical_partitioning(self.kernel_init, (*self.in_axes, *self.out_axes)),
        (*in_shape, *self.features), self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if self.lora.adapts('/'.join(self.path)):
      y = self._adapted(x, kernel, num_in)
    else:
      y = matmul_2d(x, kernel, num_in)
    if self.use_bias:
      bias = self.param(
          'bias', nn.with_logical_partitioning(nn.initializers.zeros, tuple(self.out_axes)),
          tuple(self.features), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y

  def _adapted(self, x, kernel, num_in: int) -> jax.Array:
    """x W + scale (dropout(x) A) B, or DoRA's rescaled form (see model/config.py LoraConfig)."""
    lora, in_shape = self.lora, kernel.shape[:num_in]
    a_init = _lora_a_init(lora, math.prod(in_shape))
    a = self.param('lora_a', nn.with_logical_partitioning(a_init, (*self.in_axes, 'lora_rank')),
                   (*in_shape, lora.rank), self.param_dtype).astype(self.dtype)
    b = self.param('lora_b', nn.with_logical_partitioning(nn.initializers.zeros,
                                                          ('lora_rank', *self.out_axes)),
                   (lora.rank, *self.features), self.param_dtype).astype(self.dtype)
    x_dropped = nn.Dropout(lora.dropout)(x, deterministic=self.deterministic)
    delta = lora.scale * matmul_2d(matmul_2d(x_dropped, a, num_in), b, 1)
    if not lora.dora:
      return matmul_2d(x, kernel, num_in) + delta
    in_dims = tuple(range(num_in))
    column_norms = lambda _: jnp.linalg.norm(kernel.astype(jnp.float32), axis=in_dims).astype(
        self.param_dtype)
    magnitude = self.param('lora_magnitude',
                           nn.with_logical_partitioning(column_norms, tuple(self.out_axes)))
    adapted_kernel = kernel + lora.scale * matmul_2d(a, b, 1).astype(kernel.dtype)
    norm = jax.lax.stop_gradient(jnp.linalg.norm(adapted_kernel.astype(jnp.float32), axis=in_dims))
    rescale = (magnitude.astype(jnp.float32) / norm).astype(self.dtype)
    return rescale * (matmul_2d(x, kernel, num_in) + delta)


def _lora_a_init(lora: LoraConfig, fan_in: int) -> nn.initializers.Initializer:
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
  """Token embedding table (V, D); `attend` is the tied output head."""
  vocab_size: int
  _: dataclasses.KW_ONLY
  d_model: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = self.param(
        'embedding', nn.with_logical_partitioning(default_kernel_init, ('vocab', 'embed')),
        (self.vocab_size, self.d_model), self.param_dtype)

  def __call__(self, tokens_BT: jax.Array) -> jax.Array:
    return jnp.take(self.embedding, tokens_BT, axis=0).astype(self.dtype)

  def attend(self, x_BTD: jax.Array) -> jax.Array:
    return matmul_2d(x_BTD.astype(self.dtype), self.embedding.astype(self.dtype).T, 1)
