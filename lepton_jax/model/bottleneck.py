"""Bottleneck adapters (Houlsby et al. 2019): h + up(act(down(h))) on a sublayer's output.

Two of the one Dense (model/layers.py) with biases: down [D, bottleneck] and up [bottleneck, D],
up zero-initialised so a fresh adapter is the identity. They carry no LoRA and stay float under
int8 quantization: they are what trains over a frozen (maybe int8) base.
"""
import flax.linen as nn
import jax

from lepton_jax.model import layers
from lepton_jax.model.config import ModelConfig

ACTIVATIONS = {'relu': nn.relu, 'gelu': lambda x: nn.gelu(x, approximate=True), 'silu': nn.silu}


class Adapter(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h_BTD: jax.Array) -> jax.Array:
    cfg = self.cfg
    dense = lambda features, in_axes, out_axes, name, **kw: layers.Dense(
        (features,), in_axes=in_axes, out_axes=out_axes, use_bias=True, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype, name=name, **kw)
    down_BTA = dense(cfg.peft.bottleneck, ('embed',), ('adapter',), 'down')(h_BTD)
    up = dense(cfg.d_model, ('adapter',), ('embed',), 'up', kernel_init=nn.initializers.zeros)
    return h_BTD + up(ACTIVATIONS[cfg.peft.activation](down_BTA))
