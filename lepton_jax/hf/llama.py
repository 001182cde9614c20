"""Llama 2 and Llama 3.x (LlamaForCausalLM), and the decoder layout Mistral and Qwen share.

| config.json | ModelConfig |
|---|---|
| hidden_size, intermediate_size | d_model, d_ff |
| num_hidden_layers, num_attention_heads, num_key_value_heads | num_layers, num_heads, num_kv_heads |
| head_dim (default hidden_size / heads) | head_dim |
| hidden_act 'silu' | mlp 'swiglu' |
| rms_norm_eps | norm 'rmsnorm', norm_eps |
| rope_parameters / rope_theta, rope_scaling (default, llama3) | rope_theta, rope_scaling* |
| max_position_embeddings | max_seq_len |
| attention_bias, mlp_bias | qkv_bias and out_bias, mlp_bias |
| tie_word_embeddings | tie_embeddings |
"""
from lepton_jax.hf import family
from lepton_jax.hf.family import TensorMap
from lepton_jax.model import ModelConfig


def read_decoder_config(hf: dict) -> dict:
  """The fields every Llama-style decoder (Llama, Mistral, Qwen2, Qwen3) reads alike."""
  family.require(hf, 'hidden_act', ('silu',), 'silu')
  heads = hf['num_attention_heads']
  return dict(
      vocab_size=hf['vocab_size'], d_model=hf['hidden_size'], num_layers=hf['num_hidden_layers'],
      num_heads=heads, num_kv_heads=hf.get('num_key_value_heads') or heads,
      head_dim=hf.get('head_dim') or hf['hidden_size'] // heads, d_ff=hf['intermediate_size'],
      mlp='swiglu', norm='rmsnorm', norm_eps=hf.get('rms_norm_eps', 1e-6), positions='rope',
      max_seq_len=hf.get('max_position_embeddings', 2048), sliding_window=0,
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)), qk_norm=False,
      qkv_bias=False, out_bias=False, mlp_bias=False, **family.read_rope(hf))


def write_decoder_config(name: str, cfg: ModelConfig) -> dict:
  family.require_fields(name, cfg, positions='rope', norm='rmsnorm', mlp='swiglu')
  return dict(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_act='silu',
      rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len,
      tie_word_embeddings=cfg.tie_embeddings, **family.write_rope(cfg))


def decoder_tensors(cfg: ModelConfig) -> dict[str, TensorMap]:
  layer = 'model.layers.{i}.'
  linears = {'attn/query': 'self_attn.q_proj', 'attn/key': 'self_attn.k_proj',
             'attn/value': 'self_attn.v_proj', 'attn/out': 'self_attn.o_proj',
             'mlp/gate': 'mlp.gate_proj', 'mlp/up': 'mlp.up_proj', 'mlp/down': 'mlp.down_proj'}
  biases = {'attn/query': cfg.qkv_bias, 'attn/key': cfg.qkv_bias, 'attn/value': cfg.qkv_bias,
            'attn/out': cfg.out_bias, 'mlp/gate': cfg.mlp_bias, 'mlp/up': cfg.mlp_bias,
            'mlp/down': cfg.mlp_bias}
  tensors = {'embed/embedding': TensorMap('model.embed_tokens.weight'),
             'final_norm/scale': TensorMap('model.norm.weight'),
             'layers/attn_norm/scale': TensorMap(layer + 'input_layernorm.weight'),
             'layers/mlp_norm/scale': TensorMap(layer + 'post_attention_layernorm.weight')}
  for path, hf_name in linears.items():
    tensors[f'layers/{path}/kernel'] = TensorMap(f'{layer}{hf_name}.weight', transpose=True)
    if biases[path]:
      tensors[f'layers/{path}/bias'] = TensorMap(f'{layer}{hf_name}.bias')
  if cfg.qk_norm:
    tensors['layers/attn/query_norm/scale'] = TensorMap(layer + 'self_attn.q_norm.weight')
    tensors['layers/attn/key_norm/scale'] = TensorMap(layer + 'self_attn.k_norm.weight')
  if not cfg.tie_embeddings:
    tensors['head/kernel'] = TensorMap('lm_head.weight', transpose=True)
  return tensors


BUFFERS = ('model.layers.{i}.self_attn.rotary_emb.inv_freq', 'model.rotary_emb.inv_freq')


def read_config(hf: dict) -> dict:
  fields = read_decoder_config(hf)
  fields['mlp_bias'] = bool(hf.get('mlp_bias', False))
  fields['qkv_bias'] = fields['out_bias'] = bool(hf.get('attention_bias', False))
  return fields


def write_config(cfg: ModelConfig) -> dict:
  family.require_fields('LlamaForCausalLM', cfg, sliding_window=0, qk_norm=False,
                        out_bias=cfg.qkv_bias)
  return dict(write_decoder_config('LlamaForCausalLM', cfg), attention_bias=cfg.qkv_bias,
              mlp_bias=cfg.mlp_bias)


FAMILY = family.Family('llama', 'LlamaForCausalLM', read_config, write_config, decoder_tensors,
                       BUFFERS)
