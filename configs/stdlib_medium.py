"""A larger stdlib model than the default: 6 layers, d 384, for studies that need one (int8
quality in docs/quantization.md). About 14M parameters; ~25 min on a quiet 2-core CPU.

  python -m lepton_jax.train --config=configs/stdlib_medium.py --workdir=/tmp/stdlib_medium
"""
from lepton_jax import config_lib


def get_config(arg=None):
  del arg
  config = config_lib.base_config()
  config.total_steps = 600
  config.batch_size = 16
  config.seq_len = 128
  config.log_every_steps = 50
  config.eval_every_steps = 300
  config.eval_batches = 8
  config.checkpoint_every_steps = 300

  config.data.source = 'stdlib'
  config.data.tokenizer = 'sentencepiece'
  config.data.vocab_size = 1024

  config.model.update(num_layers=6, d_model=384, num_heads=6, num_kv_heads=2, head_dim=64,
                      d_ff=1536, max_seq_len=128)
  config.sample.num_tokens = 120

  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 100
  return config
