"""The functional Transformer: knows nothing about optimizers, data or files.

Array names end in their shape, one letter per axis (`q_BTNH` is [batch, time, heads, head_dim]):

  B  batch                          H  head_dim
  T  query time (positions)         h  H // 2, half a head (rope rotates the two halves)
  S  key/value time (cache slots)   F  d_ff, the MLP hidden width
  D  d_model                        V  vocab_size
  N  query heads (num_heads)        L  layers (the leading axis of scanned params)
  K  kv heads (num_kv_heads)
  G  query heads per kv head, N // K
  M  G * T: a kv head's queries stacked (attention.xla_attention)
  C  new tokens of a row (generate.py)
"""
from lepton_jax.model.config import ModelConfig
from lepton_jax.model.transformer import Transformer
