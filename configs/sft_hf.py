"""Supervised fine-tuning (SFT) of a Hugging Face causal LM on task records in JSONL.

  python -m lepton_jax.train --config=configs/sft_hf.py:/path/to/hf_dir --workdir=/tmp/sft \
      --config.data.path=chats.jsonl [--config.data.format=prompt_completion]

Each line is {"messages": [{"role": ..., "content": ...}, ...]} (or, with
data.format=prompt_completion, {"prompt": ..., "completion": ...}); chats render with the
directory's chat template, and the loss is on the assistant turns (the completions) only,
per loss token over the global batch. Examples are packed whole into rows (data.packing).
"""
from lepton_jax import config_lib


def get_config(arg=None):
  if not arg:
    raise ValueError('configs/sft_hf.py needs the Hugging Face directory: '
                     '--config=configs/sft_hf.py:/path/to/hf_dir')
  config = config_lib.base_config()
  config.init_from = f'hf:{arg}'
  config.objective = 'sft'
  config.total_steps = 500
  config.batch_size = 8
  config.seq_len = 1024
  config.log_every_steps = 10
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 250
  config.keep_checkpoints = 2

  config.data.update(source='jsonl', format='chat', path='', val_fraction=0.05, packing=True,
                     truncate='right')
  # TRL's SFT defaults: 2e-5, linear decay; a released model is already trained.
  config.optimizer.update(learning_rate=2e-5, schedule='linear', warmup_steps=20,
                          min_lr_ratio=0.0, weight_decay=0.0, clip_norm=1.0)
  config.sample.num_tokens = 0  # Chats are prompted through their template: scripts/sample.py.
  return config
