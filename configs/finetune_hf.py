"""Full fine-tuning of a downloaded Hugging Face causal LM (Llama, Mistral, Qwen2/3, GPT-2).

  python -m lepton_jax.train --config=configs/finetune_hf.py:/path/to/hf_dir \
      --workdir=/tmp/finetune [--config.data.source=text --config.data.path=my_corpus/]

The model and tokenizer come from the directory (config.init_from); the text source, steps and
learning rate are this file's, small enough for a first try. Export the result with
scripts/export_hf.py.
"""
from lepton_jax import config_lib


def get_config(arg=None):
  if not arg:
    raise ValueError('configs/finetune_hf.py needs the Hugging Face directory: '
                     '--config=configs/finetune_hf.py:/path/to/hf_dir')
  config = config_lib.base_config()
  config.init_from = f'hf:{arg}'
  config.total_steps = 500
  config.batch_size = 8
  config.seq_len = 512
  config.log_every_steps = 10
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 250
  config.keep_checkpoints = 2

  config.data.source = 'stdlib'  # Any text source: --config.data.source=text --config.data.path=...

  # Fine-tuning rates: a released model is already trained; large steps undo it.
  config.optimizer.update(learning_rate=2e-5, warmup_steps=20, min_lr_ratio=0.1,
                          weight_decay=0.0, clip_norm=1.0)
  config.sample.prompt = 'def '
  config.sample.num_tokens = 64
  return config
