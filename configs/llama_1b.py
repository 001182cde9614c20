"""A ~1.2B-parameter Llama-3-style model for a TPU slice (v5e-16 or v5p-8), FSDP over all chips.

  python -m lepton_jax.train --config=configs/llama_1b.py:v5e-16 --workdir=gs://BUCKET/llama_1b

The argument names the slice; it sets the mesh and the global batch. The data default is a TFDS
dataset prepared as array_record (`tfds build` it once into data.tfds_data_dir).
"""
from lepton_jax import config_lib

# slice -> (mesh axis sizes, global batch in sequences of 2048 tokens, micro-batches per step).
# Sized with scripts/estimate_memory.py (docs/benchmarks.md): 16 sequences per v5e chip need
# 38 GiB of activations, 4 per micro-batch peak at 11 GiB of the chip's 15.75.
SLICES = {
    'v5e-16': (dict(data=1, fsdp=16, tensor=1), 256, 4),
    'v5p-8': (dict(data=1, fsdp=4, tensor=1), 128, 1),  # v5p-8 is 4 chips; peak 83 of 95 GiB.
    'v5e-256': (dict(data=16, fsdp=16, tensor=1), 1024, 1),  # 4 sequences per chip.
}


def get_config(arg='v5e-16'):
  mesh, batch_size, grad_accum_steps = SLICES[arg or 'v5e-16']
  config = config_lib.llama_c4_pretraining(mesh, batch_size, seq_len=2048)
  config.total_steps = 50_000
  config.grad_accum_steps = grad_accum_steps
  config.eval_every_steps = 1000
  config.model.update(d_model=2048, num_layers=22, num_heads=32, num_kv_heads=8, head_dim=64,
                      d_ff=5632, rope_theta=500_000.0, remat='dots_no_batch')
  return config
