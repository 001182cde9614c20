"""Character-level Shakespeare with the shape of nanoGPT's CPU baseline.

4 layers, 4 heads, d_model 128, context 64, batch 12, 2000 steps, no dropout, GPT-2 style
blocks and nanoGPT's optimizer settings, so the validation loss compares with its published 1.88.
The text is tokenized as bytes, which for ASCII text is one token per character.

  python -m lepton_jax.train --config=configs/shakespeare_char.py \
      --config.data.path=/path/to/tinyshakespeare.txt --workdir=/tmp/shakespeare
"""
from lepton_jax import config_lib


def get_config(arg=None):
  del arg
  config = config_lib.base_config()
  config.total_steps = 2000
  config.batch_size = 12
  config.seq_len = 64
  config.log_every_steps = 50
  config.eval_every_steps = 250
  config.eval_batches = 20
  config.checkpoint_every_steps = 1000

  config.data.source = 'text'
  config.data.path = ''  # Required: --config.data.path=.../tinyshakespeare.txt
  config.data.tokenizer = 'bytes'
  config.data.val_fraction = 0.1

  m = config.model
  m.num_layers = 4
  m.num_heads = 4
  m.num_kv_heads = 4
  m.d_model = 128
  m.head_dim = 32
  m.d_ff = 512
  m.mlp = 'gelu'
  m.norm = 'layernorm'
  m.positions = 'learned'
  m.max_seq_len = 64
  m.tie_embeddings = True

  o = config.optimizer
  o.learning_rate = 1e-3
  o.warmup_steps = 100
  o.min_lr_ratio = 0.1
  o.b2 = 0.99
  o.weight_decay = 0.1

  config.sample.prompt = 'ROMEO:'
  config.sample.num_tokens = 56  # What the 64 positions leave after the prompt and its boundary.
  return config
