"""Llama 2 7B exactly (32 layers, d 4096, 32 heads, SwiGLU 11008, RMSNorm 1e-5, rope 1e4, untied
32k vocabulary), for pretraining or continued training on a TPU v5p-128 slice (64 chips).

  python -m lepton_jax.train --config=configs/llama2_7b.py:v5p-128 --workdir=gs://BUCKET/llama2_7b \
      --config.data.tokenizer_path=gs://BUCKET/llama2_tokenizer.model

FSDP over the chips of a slice keeps 7B parameters with AdamW state at ~1.7 GB per chip; size other
slices with scripts/estimate_memory.py before renting them.
"""
from lepton_jax import config_lib

# slice -> (mesh axis sizes, global batch in sequences of 4096 tokens).
SLICES = {
    'v5p-128': (dict(data=1, fsdp=64, tensor=1), 256),
    'v5p-256': (dict(data=2, fsdp=64, tensor=1), 512),
    'v5e-256': (dict(data=1, fsdp=64, tensor=4), 256),  # 16 GB HBM per chip: add tensor.
}


def get_config(arg='v5p-128'):
  mesh, batch_size = SLICES[arg or 'v5p-128']
  config = config_lib.base_config()
  config.total_steps = 100_000
  config.batch_size = batch_size
  config.seq_len = 4096
  config.z_loss = 1e-4
  config.log_every_steps = 50
  config.eval_every_steps = 2000
  config.eval_batches = 16
  config.checkpoint_every_steps = 1000

  config.data.source = 'tfds'
  config.data.tfds_name = 'c4/en'
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.vocab_size = 32_000
  config.data.streaming = True  # C4 is far too big to tokenize up front.

  m = config.model
  m.vocab_size = 32_000
  m.d_model = 4096
  m.num_layers = 32
  m.num_heads = 32
  m.num_kv_heads = 32
  m.head_dim = 128
  m.d_ff = 11008
  m.norm_eps = 1e-5
  m.rope_theta = 10_000.0
  m.max_seq_len = 4096
  m.scan_layers = True
  m.remat = 'full'
  m.attention = 'dot_product'
  m.dtype = 'bfloat16'

  o = config.optimizer
  o.learning_rate = 3e-4
  o.warmup_steps = 2000
  o.weight_decay = 0.1
  o.min_lr_ratio = 0.1

  config.mesh.update(mesh)
  return config
