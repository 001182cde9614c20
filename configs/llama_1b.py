"""A ~1.2B-parameter Llama-3-style model for a TPU slice (v5e-16 or v5p-8), FSDP over all chips.

  python -m lepton_jax.train --config=configs/llama_1b.py:v5e-16 --workdir=gs://BUCKET/llama_1b

The argument names the slice; it sets the mesh and the global batch. The data default is a TFDS
dataset prepared as array_record (`tfds build` it once into data.tfds_data_dir).
"""
from lepton_jax import config_lib

# slice -> (mesh axis sizes, global batch in sequences of 2048 tokens, micro-batches per step,
# remat policy). Sized with scripts/estimate_memory.py (docs/benchmarks.md, splash attention, the
# TPU default): 16 sequences per v5e chip in one micro-batch fit with remat='full' (peak 10.0 of
# 15.75 GiB); 'dots_no_batch' keeps more and needs 4 micro-batches there (9.0 GiB).
SLICES = {
    'v5e-16': (dict(data=1, fsdp=16, tensor=1), 256, 1, 'full'),
    'v5p-8': (dict(data=1, fsdp=4, tensor=1), 128, 1, 'dots_no_batch'),  # 4 chips; 65 of 95 GiB.
    # 4 sequences per chip: as v5e-16 with 4 micro-batches.
    'v5e-256': (dict(data=16, fsdp=16, tensor=1), 1024, 1, 'dots_no_batch'),
}


def get_config(arg='v5e-16'):
  mesh, batch_size, grad_accum_steps, remat = SLICES[arg or 'v5e-16']
  config = config_lib.llama_c4_pretraining(mesh, batch_size, seq_len=2048)
  config.total_steps = 50_000
  config.grad_accum_steps = grad_accum_steps
  config.eval_every_steps = 1000
  config.model.update(d_model=2048, num_layers=22, num_heads=32, num_kv_heads=8, head_dim=64,
                      d_ff=5632, rope_theta=500_000.0, remat=remat)
  return config
