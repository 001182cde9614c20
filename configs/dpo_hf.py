"""Direct Preference Optimization of a Hugging Face causal LM (or an SFT run) on preference pairs.

  python -m lepton_jax.train --config=configs/dpo_hf.py:/path/to/hf_dir --workdir=/tmp/dpo \
      --config.data.path=pairs.jsonl [--config.dpo.loss=ipo] \
      [--config.lora.targets="('all-linear',)"]

Each line is {"prompt": ..., "chosen": ..., "rejected": ...}, three strings or three message
lists (TRL's formats). The reference is the starting model, frozen: a copy of it, or with LoRA the
same base with the adapters switched off. TRL's defaults: beta 0.1, the sigmoid loss, lr 5e-7
for full fine-tuning (LoRA usually wants ~5e-6 and up).
"""
from lepton_jax import config_lib


def get_config(arg=None):
  if not arg:
    raise ValueError('configs/dpo_hf.py needs the model to start from: '
                     '--config=configs/dpo_hf.py:/path/to/hf_dir (or workdir:/path/to/sft_run)')
  config = config_lib.base_config()
  config.init_from = arg if arg.startswith(('hf:', 'workdir:')) else f'hf:{arg}'
  config.objective = 'dpo'
  config.dpo.update(loss='sigmoid', beta=0.1, label_smoothing=0.0)
  config.total_steps = 500
  config.batch_size = 8  # Pairs.
  config.seq_len = 512
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 250
  config.keep_checkpoints = 2
  config.data.update(source='jsonl', format='preference', path='', val_fraction=0.05)
  config.optimizer.update(learning_rate=5e-7, schedule='linear', warmup_steps=10,
                          min_lr_ratio=0.0, weight_decay=0.0)
  config.sample.num_tokens = 0
  return config
