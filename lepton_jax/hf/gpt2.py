"""GPT-2 (GPT2LMHeadModel): LayerNorm, learned positions, gelu MLP, biases, tied head.

| config.json | ModelConfig |
|---|---|
| n_embd, n_layer, n_head, n_inner (default 4 n_embd) | d_model, num_layers, num_heads (= kv heads), d_ff |
| activation_function 'gelu_new' (tanh gelu) | mlp 'gelu' |
| layer_norm_epsilon | norm 'layernorm', norm_eps |
| n_positions | positions 'learned', max_seq_len |

Conv1D weights are stored [in, out] (no transpose); `attn.c_attn` packs q, k and v along its
output axis; the head is tied to `wte`.
"""
from lepton_jax.hf import family
from lepton_jax.hf.family import TensorMap
from lepton_jax.model import ModelConfig

NAME = 'GPT2LMHeadModel'


def read_config(hf: dict) -> dict:
  family.require(hf, 'activation_function', ('gelu_new', 'gelu_pytorch_tanh'), 'gelu_new')
  family.require(hf, 'scale_attn_weights', (True,), True)
  family.require(hf, 'scale_attn_by_inverse_layer_idx', (False,), False)
  family.require(hf, 'reorder_and_upcast_attn', (False,), False)  # Changes the numerics.
  family.require(hf, 'tie_word_embeddings', (True,), True)
  d_model, heads = hf['n_embd'], hf['n_head']
  return dict(
      vocab_size=hf['vocab_size'], d_model=d_model, num_layers=hf['n_layer'], num_heads=heads,
      num_kv_heads=heads, head_dim=d_model // heads, d_ff=hf.get('n_inner') or 4 * d_model,
      mlp='gelu', norm='layernorm', norm_eps=hf.get('layer_norm_epsilon', 1e-5),
      positions='learned', rope_theta=10_000.0, **family.NO_ROPE_SCALING,
      max_seq_len=hf['n_positions'], sliding_window=0, qkv_bias=True, out_bias=True,
      mlp_bias=True, tie_embeddings=True, qk_norm=False)


def write_config(cfg: ModelConfig) -> dict:
  family.require_fields(NAME, cfg, positions='learned', norm='layernorm', mlp='gelu',
                        num_kv_heads=cfg.num_heads, head_dim=cfg.d_model // cfg.num_heads,
                        qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True,
                        qk_norm=False, sliding_window=0)
  return dict(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.num_layers,
              n_head=cfg.num_heads, n_inner=cfg.d_ff, activation_function='gelu_new',
              layer_norm_epsilon=cfg.norm_eps, n_positions=cfg.max_seq_len,
              tie_word_embeddings=True)


def tensors(cfg: ModelConfig) -> dict[str, TensorMap]:
  layer, d = 'transformer.h.{i}.', cfg.d_model
  result = {'embed/embedding': TensorMap('transformer.wte.weight'),
            'pos_embedding': TensorMap('transformer.wpe.weight'),
            'final_norm/scale': TensorMap('transformer.ln_f.weight'),
            'final_norm/bias': TensorMap('transformer.ln_f.bias')}
  for lepton, hf_name in (('attn_norm', 'ln_1'), ('mlp_norm', 'ln_2')):
    for param, hf_param in (('scale', 'weight'), ('bias', 'bias')):
      result[f'layers/{lepton}/{param}'] = TensorMap(f'{layer}{hf_name}.{hf_param}')
  for index, name in enumerate(('query', 'key', 'value')):
    for param, hf_param in (('kernel', 'weight'), ('bias', 'bias')):
      result[f'layers/attn/{name}/{param}'] = TensorMap(
          f'{layer}attn.c_attn.{hf_param}', columns=(index * d, (index + 1) * d))
  for lepton, hf_name in (('attn/out', 'attn.c_proj'), ('mlp/up', 'mlp.c_fc'),
                          ('mlp/down', 'mlp.c_proj')):
    for param, hf_param in (('kernel', 'weight'), ('bias', 'bias')):
      result[f'layers/{lepton}/{param}'] = TensorMap(f'{layer}{hf_name}.{hf_param}')
  return result


FAMILY = family.Family('gpt2', NAME, read_config, write_config, tensors,
                       ('transformer.h.{i}.attn.bias', 'transformer.h.{i}.attn.masked_bias'))
