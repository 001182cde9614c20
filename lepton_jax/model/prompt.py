"""Prompt tuning (Lester et al. 2021): learned virtual-token embeddings before every row.

The Transformer prepends `prompt_embedding` [N, D] to each row's token embeddings at positions
0..N-1 (the row's own tokens follow from position N, as PEFT's PeftModel runs them), keeps them
in the KV cache from the prefill on, and returns logits for the row's tokens only.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lepton_jax.model.config import ModelConfig

PARAM = 'prompt_embedding'


def vocab_ids(cfg: ModelConfig) -> np.ndarray:
  """The tokens whose embeddings `prompt_init='vocab'` copies (PEFT's SAMPLE_VOCAB), a function of
  config.seed; with config.init_from the rows are the loaded table's (train_state.init_state
  creates new params with the loaded ones in place)."""
  return np.random.default_rng(cfg.peft.seed).integers(0, cfg.vocab_size,
                                                        cfg.peft.virtual_tokens)


def embedding(module: nn.Module, embed: nn.Module) -> jax.Array:
  """The `prompt_embedding` param of `module` (the Transformer), [N, D]; `embed` gives 'vocab'
  initialisation its rows."""
  cfg = module.cfg
  if cfg.peft.prompt_init == 'vocab':
    init = lambda key, shape, dtype: embed(jnp.asarray(vocab_ids(cfg))[None])[0].astype(dtype)
  else:
    init = nn.initializers.normal(0.02)  # The embedding table's own init.
  return module.param(PARAM, nn.with_logical_partitioning(init, (None, 'embed')),
                      (cfg.peft.virtual_tokens, cfg.d_model), cfg.param_dtype)
