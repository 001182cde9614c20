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
  config = config_lib.llama_c4_pretraining(mesh, batch_size, seq_len=4096)
  config.total_steps = 100_000
  config.eval_every_steps = 2000
  config.model.update(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                      d_ff=11008, norm_eps=1e-5, rope_theta=10_000.0, remat='full')
  return config
