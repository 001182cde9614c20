"""Qwen2 and Qwen2.5 (Qwen2ForCausalLM): the Llama decoder with biases on q, k and v.

Qwen2's sliding window applies only to some layers (`use_sliding_window`, `max_window_layers`);
lepton has one window for all layers, so a checkpoint that enables it is refused.
"""
from lepton_jax.hf import family, llama
from lepton_jax.model import ModelConfig


def read_config(hf: dict) -> dict:
  family.require(hf, 'use_sliding_window', (False,), False)
  return dict(llama.read_decoder_config(hf), qkv_bias=True)


def write_config(cfg: ModelConfig) -> dict:
  family.require_fields('Qwen2ForCausalLM', cfg, qkv_bias=True, out_bias=False, mlp_bias=False,
                        qk_norm=False, sliding_window=0)
  return dict(llama.write_decoder_config('Qwen2ForCausalLM', cfg), use_sliding_window=False)


FAMILY = family.Family('qwen2', 'Qwen2ForCausalLM', read_config, write_config,
                       llama.decoder_tensors, llama.BUFFERS)
