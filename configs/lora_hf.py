"""LoRA on a downloaded Hugging Face causal LM: adapters on every linear layer, base frozen.

  python -m lepton_jax.train --config=configs/lora_hf.py:/path/to/hf_dir --workdir=/tmp/lora \
      [--config.data.source=text --config.data.path=my_corpus/] [--config.lora.rank=16]

The base comes from the directory (config.init_from) and is never copied: checkpoints hold the
adapters and their optimizer state, and name the base with a fingerprint. Export the adapters for
PEFT with `hf.save_adapter`, or merge them (`lora.merge`) and export the model (README).
"""
from lepton_jax import config_lib


def get_config(arg=None):
  if not arg:
    raise ValueError('configs/lora_hf.py needs the Hugging Face directory: '
                     '--config=configs/lora_hf.py:/path/to/hf_dir')
  config = config_lib.base_config()
  config.init_from = f'hf:{arg}'
  config.total_steps = 500
  config.batch_size = 8
  config.seq_len = 512
  config.log_every_steps = 10
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 250
  config.data.source = 'stdlib'  # Any text source: --config.data.source=text --config.data.path=...

  config.lora.update(targets=('all-linear',), rank=8, alpha=16.0)
  # LoRA trains well at rates ~10x full fine-tuning's (Hu et al. 2021 used 2e-4 to 5e-4).
  config.optimizer.update(learning_rate=3e-4, warmup_steps=20, weight_decay=0.0)
  config.sample.prompt = 'def '
  config.sample.num_tokens = 64
  return config
