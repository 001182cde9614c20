"""LoRA on a trained lepton run (default: the stdlib_tiny quickstart), adapted to new text.

  python -m lepton_jax.train --config=configs/lora_stdlib.py:/tmp/stdlib_tiny \
      --workdir=/tmp/stdlib_lora --config.data.source=text --config.data.path='new_corpus/*.txt'

The argument is the trained run's workdir (its latest checkpoint; `DIR:STEP` for another): the
model and tokenizer come from it, adapters on q and v train while the base stays frozen.
"""
from lepton_jax import config_lib


def get_config(arg=None):
  if not arg:
    raise ValueError('configs/lora_stdlib.py needs the trained run: '
                     '--config=configs/lora_stdlib.py:/path/to/workdir[:STEP]')
  config = config_lib.base_config()
  config.init_from = f'workdir:{arg}'
  config.total_steps = 300
  config.batch_size = 16
  config.seq_len = 128
  config.log_every_steps = 20
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 100
  config.data.source = 'stdlib'
  config.lora.update(targets=('q', 'v'), rank=8, alpha=16.0)
  config.optimizer.update(learning_rate=2e-3, warmup_steps=20, weight_decay=0.0)
  config.sample.prompt = 'def '
  return config
