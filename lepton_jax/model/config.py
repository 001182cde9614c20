"""The model's configuration: the plain values every module of the model is built from."""
import dataclasses

import ml_collections

# The ModelConfig fields a checkpoint determines: what the model computes. The others (attention
# implementation, scan, remat, dtypes, dropout) say how lepton runs it.
ARCHITECTURE_FIELDS = (
    'vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim', 'd_ff', 'mlp',
    'norm', 'norm_eps', 'positions', 'rope_theta', 'rope_scaling', 'rope_scaling_factor',
    'rope_low_freq_factor', 'rope_high_freq_factor', 'rope_original_max_len', 'max_seq_len',
    'sliding_window', 'qkv_bias', 'out_bias', 'mlp_bias', 'tie_embeddings', 'qk_norm')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Plain values for the model; `from_config` reads them from `config.model`."""
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  d_ff: int
  mlp: str
  norm: str
  norm_eps: float
  positions: str
  rope_theta: float
  rope_scaling: str
  rope_scaling_factor: float
  rope_low_freq_factor: float
  rope_high_freq_factor: float
  rope_original_max_len: int
  max_seq_len: int
  sliding_window: int
  qkv_bias: bool
  out_bias: bool
  mlp_bias: bool
  tie_embeddings: bool
  qk_norm: bool
  dropout: float
  attention: str
  scan_layers: bool
  remat: str
  param_dtype: str
  dtype: str

  @classmethod
  def from_config(cls, model_config: ml_collections.ConfigDict) -> 'ModelConfig':
    return cls(**model_config.to_dict())
