"""Default experiment: a small Llama-style LM on the Python standard library.

Trains in a few minutes on a 2-core CPU and learns to write plausible Python.

  python -m lepton_jax.train --config=configs/stdlib_tiny.py --workdir=/tmp/stdlib_tiny
"""
from lepton_jax import config_lib


def get_config(arg=None):
  del arg
  config = config_lib.base_config()
  config.total_steps = 600
  config.batch_size = 16
  config.seq_len = 128
  config.log_every_steps = 20
  config.eval_every_steps = 200
  config.eval_batches = 8
  config.checkpoint_every_steps = 200

  config.data.source = 'stdlib'
  config.data.tokenizer = 'sentencepiece'
  config.data.vocab_size = 1024

  m = config.model
  m.num_layers = 4
  m.d_model = 192
  m.num_heads = 6
  m.num_kv_heads = 2
  m.head_dim = 32
  m.d_ff = 512
  m.max_seq_len = 128

  config.sample.num_tokens = 120  # Within the 128 positions, after a short prompt.

  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 60
  return config
