"""Qwen3 (Qwen3ForCausalLM): the Llama decoder with a per-head RMSNorm on q and k.

`q_norm`/`k_norm` weights [head_dim] -> attn/query_norm, attn/key_norm (model.qk_norm);
`attention_bias` -> qkv_bias and out_bias; `head_dim` is explicit and may differ from
hidden_size / heads. A checkpoint with `use_sliding_window` is refused (as for Qwen2).
"""
from lepton_jax.hf import family, llama
from lepton_jax.model import ModelConfig


def read_config(hf: dict) -> dict:
  family.require(hf, 'use_sliding_window', (False,), False)
  bias = bool(hf.get('attention_bias', False))
  return dict(llama.read_decoder_config(hf), qk_norm=True, qkv_bias=bias, out_bias=bias)


def write_config(cfg: ModelConfig) -> dict:
  family.require_fields('Qwen3ForCausalLM', cfg, qk_norm=True, out_bias=cfg.qkv_bias,
                        mlp_bias=False, sliding_window=0)
  return dict(llama.write_decoder_config('Qwen3ForCausalLM', cfg), attention_bias=cfg.qkv_bias,
              use_sliding_window=False)


FAMILY = family.Family('qwen3', 'Qwen3ForCausalLM', read_config, write_config,
                       llama.decoder_tensors, llama.BUFFERS)
