"""Adapt a trained stdlib run to a package family it never saw (email/ and xml/): the base of the
LoRA study in docs/lora.md (configs/sweeps/lora.py varies the method).

  python -m lepton_jax.train --config=configs/stdlib_tiny.py --workdir=/tmp/lora_base \
      --config.data.exclude="('email/*', 'xml/*')"
  python -m lepton_jax.train --config=configs/lora_adapt.py:/tmp/lora_base --workdir=/tmp/adapt

Full fine-tuning as given; the sweep sets config.lora for the adapter variants. 200 steps of
16 x 128 tokens on email/ and xml/, evaluated on their held-out files (a fifth, by path hash).
"""
from lepton_jax import config_lib


def get_config(arg=None):
  if not arg:
    raise ValueError('configs/lora_adapt.py needs the base run: '
                     '--config=configs/lora_adapt.py:/path/to/base_workdir')
  config = config_lib.base_config()
  config.init_from = f'workdir:{arg}'
  config.total_steps = 200
  config.batch_size = 16
  config.seq_len = 128
  config.log_every_steps = 20
  config.eval_every_steps = 50
  config.eval_batches = 8
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 1
  config.data.update(source='stdlib', include=('email/*', 'xml/*'), val_fraction=0.2)
  config.optimizer.update(learning_rate=1e-3, warmup_steps=20, weight_decay=0.0)
  config.sample.num_tokens = 0
  return config
