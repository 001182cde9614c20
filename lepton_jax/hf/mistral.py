"""Mistral (MistralForCausalLM): the Llama decoder with a sliding attention window.

`sliding_window` (null: none) -> model.sliding_window (0: none); no biases.
"""
from lepton_jax.hf import family, llama
from lepton_jax.model import ModelConfig


def read_config(hf: dict) -> dict:
  return dict(llama.read_decoder_config(hf), sliding_window=hf.get('sliding_window') or 0)


def write_config(cfg: ModelConfig) -> dict:
  family.require_fields('MistralForCausalLM', cfg, qk_norm=False, qkv_bias=False, out_bias=False,
                        mlp_bias=False)
  return dict(llama.write_decoder_config('MistralForCausalLM', cfg),
              sliding_window=cfg.sliding_window or None)


FAMILY = family.Family('mistral', 'MistralForCausalLM', read_config, write_config,
                       llama.decoder_tensors, llama.BUFFERS)
